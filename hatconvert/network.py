"""The converted network: a rewritten graph module plus the task lifecycle around it."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from .calls import CallRouting
from .distributed import on_training_forward, state_without_wrapper
from .errors import InputError, TaskError
from .example import ExampleCall
from .gates import HATGate
from .inputs import VariantGraphs
from .layers import updates_statistics
from .layout import Layout
from .mixed import MixedRunner, mixed_forward
from .lifecycle import TaskLifecycle
from .options import ConversionOptions
from .penalty import KEEP_OPEN, sparsity_penalty
from .protection import Guard
from .report import ConversionReport
from .statistics import update_statistics
from .steps import watch
from .usage import layer_capacity, mask_usage, overall_capacity

__all__ = ['HATNetwork', 'check_mask_scale']


class HATNetwork(TaskLifecycle, CallRouting, nn.Module):
    """A HAT network: ``net(x, task_id, mask_scale=None)``.

    ``mask_scale=None`` gives hard 0/1 gates (inference); a positive mask scale gives the soft
    gates ``sigmoid(s * e)`` used while training. ``net.model`` is the rewritten graph module;
    its submodules keep the original paths, so ``net.model.layer1[0].conv1`` is the same layer.
    Train task ``t`` between ``begin_task(t)`` and ``end_task()``; earlier tasks stay bit-exact.
    """

    def __init__(self, model: fx.GraphModule, layout: Layout, report: ConversionReport,
                 options: ConversionOptions, source: dict[str, Any],
                 variants: dict[tuple[str, ...], fx.Graph] | None = None):
        super().__init__()
        self.model = model
        self.layout = layout
        self.options = options  # with the head the conversion found (None: no head)
        self.source = source  # how a checkpoint rebuilds the model: a timm name, or custom
        num_tasks = self.num_tasks = options.num_tasks
        self._report = report
        self.register_buffer("trained", torch.zeros(num_tasks, dtype=torch.bool))
        self.active_task: int | None = None
        self._options: dict[str, Any] = {}
        self._guard: Guard | None = None
        self._needs_arming = False
        self._variants = VariantGraphs(variants)  # a graph per set of optional inputs given
        self._mixed = MixedRunner()  # the graphs' mixed-task twins (net(x, task_id=ids))
        self._examples: dict[tuple[str, ...], ExampleCall] = {}  # per graph: shapes to propagate
        self._protected_once = False  # trained tasks were protected: no new kind of call
        self._last_scale: float | None = None
        self._task_start: dict[str, torch.Tensor] | None = None  # embedding rows at begin_task
        self._task_trained_on = False  # a forward of the active task with gradients ran
        self._warned_optimizers: set[int] = set()
        self._distributed_task: int | None = None  # the task whose DDP wrapper was checked
        self._sharding_checked: int | None = None  # the task whose parameters were checked
        self._ddp: Any = None  # a weak reference to the DDP training the active task
        self._redrawn = False  # begin_task(reinit_free=True) drew this rank's free units
        watch(self)

    # -- copies and pickling ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """A copy or pickle holds no armed protection; an active task is armed again in the
        copy before its first forward or optimizer step (protected entries are unchanged
        since begin_task, so the copy protects the same values)."""
        if self._guard is not None:
            self._guard.restore()  # the copy protects the values begin_task saw
        state = super().__getstate__()
        state["_guard"] = None
        state["_needs_arming"] = self.active_task is not None
        state["_warned_optimizers"] = set()
        return state_without_wrapper(state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_mixed", MixedRunner())
        self.__dict__.setdefault("_redrawn", False)
        for name in ("_ddp", "_distributed_task", "_sharding_checked"):  # older pickles
            self.__dict__.setdefault(name, None)
        watch(self)

    @property
    def config(self) -> dict[str, Any]:
        """The conversion options and the source, as plain values (checkpoint metadata)."""
        return {**self.options.to_config(), "source": self.source}

    def parameter_ids(self) -> set[int]:
        """Ids of the network's parameters (the step hooks match optimizers with them)."""
        return {id(p) for p in self.parameters()}

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Any = None, task_id: int | torch.Tensor | None = None,
                mask_scale: float | torch.Tensor | None = None, **inputs: Any) -> Any:
        """Task ``task_id``'s output: soft gates with a mask scale, hard 0/1 gates without.

        The first input may be given by its name instead (``net(**batch, task_id=t)``). In eval
        mode ``task_id`` may be a ``(batch,)`` tensor: each sample runs with its own task
        (mixed.py); heads of different class counts are padded with -inf to the widest."""
        if x is None:
            x = self._first_input(inputs)
        if isinstance(task_id, torch.Tensor) and task_id.ndim == 1:
            return mixed_forward(self, x, task_id, mask_scale, inputs)
        t = self.check_task_id(task_id)
        if mask_scale is not None:
            check_mask_scale(mask_scale)
        if self.training:
            self._check_training_forward(t, mask_scale)
            self._last_scale = None if mask_scale is None else float(mask_scale)
            if t == self.active_task and torch.is_grad_enabled():
                on_training_forward(self, t)  # under DDP: its options, rank 0's embeddings
        elif bool(self.trained[t]) and t != self.active_task:
            self._check_statistics_kept(t)
        if self._guard is not None and t != self.active_task:
            self._guard.restore()  # undo changes made outside a hooked optimizer step
        graph, inputs = self._route(x, inputs)
        if self._needs_arming:
            self._arm_or_abort()
        if t == self.active_task and torch.is_grad_enabled():
            self._task_trained_on = True
        return graph(x, **inputs, task_id=t, mask_scale=mask_scale)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "HATNetwork":
        """``.to()``, ``.half()`` and the like may replace tensors: rebuild the variants."""
        self._variants.invalidate()
        self._mixed.invalidate()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict``; graphs of optional inputs are rebuilt afterwards."""
        self._variants.invalidate()
        self._mixed.invalidate()
        return super().load_state_dict(*args, **kwargs)

    def _check_training_forward(self, t: int, mask_scale: Any) -> None:
        """Refuse training-mode forwards that would change what a trained task computes."""
        if bool(self.trained[t]) and t != self.active_task:
            raise TaskError(
                f"task {t} is trained: a training-mode forward would change its norm statistics; "
                f"call net.eval() to evaluate it (or begin_task({t}, retrain=True) to retrain it)")
        if self.active_task is None and mask_scale is not None and torch.is_grad_enabled() \
                and bool(self.trained.any()):
            raise TaskError(
                f"training forward for task {t} with no active task: call begin_task({t}) "
                "first so that trained tasks stay protected")

    def _check_statistics_kept(self, t: int) -> None:
        """Refuse to run trained task ``t`` while a module it reads would update its running
        statistics (``net.model.train()`` or one norm set to training by hand)."""
        modules = {Layout.copy_key(p, t): self.model.get_submodule(p).copies[t]
                   for p in self.layout.task_indexed_modules()}
        modules.update({p: self.model.get_submodule(p) for p in self.layout.frozen_leaves})
        for path, module in modules.items():
            for name, sub in module.named_modules(prefix=path):
                if sub.training and updates_statistics(sub):
                    raise TaskError(
                        f"task {t} is trained, but {type(sub).__name__} '{name}' is in training "
                        f"mode and would change the running statistics task {t} reads: call "
                        "net.eval() (not net.model.train()) to evaluate it")

    def _first_input(self, inputs: dict[str, Any]) -> Any:
        """The first input, given by its name (``input_ids=...``); an error if it is absent,
        except for a model kept whole, whose own forward may take others instead."""
        names = self.layout.signature.names
        if names and names[0] in inputs:
            return inputs.pop(names[0])
        if inputs and self.layout.top_level is not None:
            return None  # its own forward decides (inputs_embeds instead of input_ids)
        first = f"x or {names[0]}=" if names else "x"
        raise InputError(f"no first input given to {self.layout.signature.model}: pass {first}"
                         "... (the network needs it to run and to keep as its example)")

    def check_task_id(self, task_id: Any) -> int:
        """``task_id`` as a Python int in ``[0, num_tasks)``, or a ``TaskError`` that says why."""
        if task_id is None:
            raise TaskError("no task_id given: call net(x, task_id) or net(..., task_id=t)")
        if isinstance(task_id, torch.Tensor):
            if task_id.ndim != 0 or task_id.dtype.is_floating_point or task_id.is_complex() \
                    or task_id.dtype == torch.bool:
                raise TaskError(f"task_id must be an int or a 0-dim integer tensor (in eval mode "
                                f"also one id per sample, shape (batch,)), got a tensor of shape "
                                f"{tuple(task_id.shape)} and dtype {task_id.dtype}")
            task_id = int(task_id.item())
        elif isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TaskError(f"task_id must be an int or a 0-dim integer tensor (in eval mode "
                            f"also a (batch,) tensor of one id per sample), "
                            f"got {type(task_id).__name__} {task_id!r}")
        if not 0 <= task_id < self.num_tasks:
            raise TaskError(f"task_id {task_id} is out of range: this network has "
                            f"{self.num_tasks} tasks (0 to {self.num_tasks - 1})")
        return task_id

    def trained_tasks(self, excluding: int | None = None) -> list[int]:
        """The trained task ids in order, without ``excluding``."""
        return [t for t in range(self.num_tasks) if bool(self.trained[t]) and t != excluding]

    # -- regularization, capacity, usage (the work lives in penalty.py and usage.py) ----------
    def regularization(self, task_id: int, mask_scale: float, c: float = 0.75,
                       mode: str = "original", keep_open: float = KEEP_OPEN) -> torch.Tensor:
        """``c`` times HAT's sparsity penalty on task ``task_id``'s soft gates at ``mask_scale``.

        ``original``: mean gate value over units no other trained task uses; ``cross`` also
        rewards reusing the units other tasks use (averages with ``1 - mean gate over them``);
        ``total``: their sum over the number of all units (a new unit costs every task alike).
        ``keep_open``: each layer's most open ``ceil(keep_open * units)`` units are pulled open
        instead, so no task can shut a layer (see ``penalty``); 0 gives the paper's penalty.
        """
        t = self.check_task_id(task_id)
        check_mask_scale(mask_scale)
        others = self.trained_tasks(excluding=t)
        return sparsity_penalty(list(self.gates().values()), t, others, mask_scale, c, mode,
                                keep_open)

    def update_statistics(self, task_id: int, batches: Iterable,
                          device: torch.device | str | None = None) -> int:
        """Recompute the active task's norm statistics in one pass over ``batches`` under its
        final masks, before ``end_task`` (``train_task`` does it; see statistics.py)."""
        return update_statistics(self, task_id, batches, device)

    def layer_capacity(self, tasks: list[int] | None = None) -> dict[str, float]:
        """Per gated layer, the fraction of weights and biases still free to train: where the
        adjustment rate ``1 - min(M_out, M_in)`` of ``tasks`` (default: all trained) is 1."""
        tasks = self.trained_tasks() if tasks is None else self._check_tasks(tasks)
        return layer_capacity(self, tasks)

    def _check_tasks(self, tasks: Any) -> list[int]:
        if isinstance(tasks, (str, bytes)) or not hasattr(tasks, "__iter__"):
            raise TaskError(f"tasks must be a list of task ids, got {tasks!r}")
        return [self.check_task_id(t) for t in tasks]

    def capacity(self, tasks: list[int] | None = None) -> float:
        """Fraction of all gated weights and biases still free: 1.0 before task 0."""
        return overall_capacity(self, self.layer_capacity(tasks))

    def mask_usage(self) -> dict[str, list[float | None]]:
        """Per gated layer and task, the fraction of units the task's stored mask uses."""
        return mask_usage(self)

    # -- modules and report ----------------------------------------------------------------
    def train(self, mode: bool = True) -> "HATNetwork":
        """Set the mode; leaves frozen after task 0 stay in eval mode (their statistics too)."""
        super().train(mode)
        if mode and bool(self.trained.any()):
            for path in self.layout.frozen_leaves:  # frozen once task 0 ended, statistics too
                self.model.get_submodule(path).eval()
        return self

    def gates(self) -> dict[str, HATGate]:
        """The gate of every gated layer, by the layer's module path."""
        return {path: self.model.get_submodule(g.gate) for path, g in self.layout.gated.items()}

    def masks(self, task_id: int, mask_scale: float | None = None) -> dict[str, torch.Tensor]:
        """Task ``task_id``'s gate vector per gated layer (hard without a mask scale)."""
        t = self.check_task_id(task_id)
        return {path: gate.mask(t, mask_scale) for path, gate in self.gates().items()}

    def report(self) -> ConversionReport:
        """What the conversion did: gated layers, task-indexed and frozen tensors, overhead."""
        return self._report

    def extra_repr(self) -> str:
        trained = self.trained_tasks()
        return (f"num_tasks={self.num_tasks}, gated_layers={len(self.layout.gated)}, "
                f"trained={trained}")


def check_mask_scale(mask_scale: Any) -> None:
    """Refuse a mask scale that is not a positive finite number (``None`` means hard gates)."""
    value = mask_scale.item() if isinstance(mask_scale, torch.Tensor) and mask_scale.numel() == 1 \
        else mask_scale
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"mask_scale must be a positive finite number or None (hard gates), "
                         f"got {mask_scale!r}")
