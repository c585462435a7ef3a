"""The converted network: a rewritten graph module plus the task lifecycle around it."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import HATError, OptionError, TaskError
from .gates import HATGate, init_embedding_, soft_gate
from .options import MASK_INITS, ConversionOptions, check_choice, check_s_max
from .propagation import input_masks
from .protection import ADJUSTMENTS, Guard, arm_task, weight_protection
from .steps import check_step, watch
from .report import ConversionReport
from .layout import Layout


class HATNetwork(nn.Module):
    """A HAT network: ``net(x, task_id, mask_scale=None)``.

    ``mask_scale=None`` gives hard 0/1 gates (inference); a positive mask scale gives the soft
    gates ``sigmoid(s * e)`` used while training. ``net.model`` is the rewritten graph module;
    its submodules keep the original paths, so ``net.model.layer1[0].conv1`` is the same layer.
    Train task ``t`` between ``begin_task(t)`` and ``end_task()``; earlier tasks stay bit-exact.
    """

    def __init__(self, model: fx.GraphModule, layout: Layout, report: ConversionReport,
                 options: ConversionOptions, source: dict[str, Any]):
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
        self._example: torch.Tensor | None = None  # one input sample: shapes for propagation
        self._last_scale: float | None = None
        self._task_start: dict[str, torch.Tensor] | None = None  # embedding rows at begin_task
        self._task_trained_on = False  # a forward of the active task with gradients ran
        self._warned_optimizers: set[int] = set()
        watch(self)

    # -- copies and pickling ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """A copy or pickle holds no armed protection; an active task is armed again in the
        copy before its first forward or optimizer step (protected entries are unchanged
        since begin_task, so the copy protects the same values)."""
        state = super().__getstate__()
        state["_guard"] = None
        state["_needs_arming"] = self.active_task is not None
        state["_warned_optimizers"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        watch(self)

    @property
    def config(self) -> dict[str, Any]:
        """The conversion options and the source, as plain values (checkpoint metadata)."""
        return {**self.options.to_config(), "source": self.source}

    def parameter_ids(self) -> set[int]:
        return {id(p) for p in self.parameters()}

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Any, task_id: int | torch.Tensor,
                mask_scale: float | torch.Tensor | None = None, **inputs: Any) -> Any:
        t = self.check_task_id(task_id)
        if mask_scale is not None:
            check_mask_scale(mask_scale)
        if self.training:
            self._check_training_forward(t, mask_scale)
            self._last_scale = None if mask_scale is None else float(mask_scale)
        if self._example is None and isinstance(x, torch.Tensor):
            self._example = x[:1].detach().clone()
        if self._needs_arming:
            self._arm_or_abort()
        if t == self.active_task and torch.is_grad_enabled():
            self._task_trained_on = True
        return self.model(x, **inputs, task_id=t, mask_scale=mask_scale)

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

    def check_task_id(self, task_id: Any) -> int:
        """``task_id`` as a Python int in ``[0, num_tasks)``, or a ``TaskError`` that says why."""
        if isinstance(task_id, torch.Tensor):
            if task_id.ndim != 0 or task_id.dtype.is_floating_point or task_id.is_complex() \
                    or task_id.dtype == torch.bool:
                raise TaskError(f"task_id must be an int or a 0-dim integer tensor, got a tensor "
                                f"of shape {tuple(task_id.shape)} and dtype {task_id.dtype}")
            task_id = int(task_id.item())
        elif isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TaskError(f"task_id must be an int or a 0-dim integer tensor, "
                            f"got {type(task_id).__name__} {task_id!r}")
        if not 0 <= task_id < self.num_tasks:
            raise TaskError(f"task_id {task_id} is out of range: this network has "
                            f"{self.num_tasks} tasks (0 to {self.num_tasks - 1})")
        return task_id

    # -- the task lifecycle ----------------------------------------------------------------
    def begin_task(self, task_id: int, *, mask_init: str | None = None, adjustment: str = "hat",
                   alpha: float | None = None, s_max: float = 400.0, retrain: bool = False) -> None:
        """Start training ``task_id``: initialise its embeddings and protect every trained task.

        ``mask_init``: ``normal``, ``uniform``, ``U01``, ``U-10``, ``last`` (copy the previous
        task's) or ``dense``; default: the conversion's. ``adjustment``: ``hat`` (default),
        ``hat_random``, ``hat_const_alpha`` (needs ``alpha``) or ``hat_const_1`` (no
        protection of gated weights). ``s_max`` is the one the mask-scale schedule uses.
        """
        t = self.check_task_id(task_id)
        if self.active_task is not None:
            raise TaskError(f"task {self.active_task} is still active: call end_task() "
                            f"before begin_task({t})")
        if bool(self.trained[t]) and not retrain:
            raise TaskError(f"task {t} is already trained; begin_task({t}, retrain=True) trains "
                            "it again and replaces what it learned")
        mode = mask_init or self.options.mask_init
        check_begin_options(mode, adjustment, alpha, s_max)
        gates = self.gates()
        self._task_start = {path: gate.embedding[t].detach().clone()
                            for path, gate in gates.items()}
        self._task_trained_on = False
        try:
            for gate in gates.values():
                previous = gate.embedding[t - 1].detach() if t > 0 else None
                init_embedding_(gate.embedding[t], mode, previous)
            self.active_task = t
            self._options = dict(adjustment=adjustment, alpha=alpha, s_max=float(s_max))
            self._needs_arming = True
            if self._example is not None:
                self._arm_or_abort()
        except BaseException:
            self.abort_task()
            raise

    def abort_task(self) -> None:
        """Abandon the active task: its embeddings go back to what they were before
        ``begin_task`` and it is not marked trained. Trained tasks are untouched (the free
        weights the task changed belong to no trained task)."""
        self._disarm()
        t, start = self.active_task, self._task_start
        if t is not None and start is not None:
            with torch.no_grad():
                for path, gate in self.gates().items():
                    gate.embedding[t].copy_(start[path])
        self.active_task = None
        self._options = {}
        self._needs_arming = False
        self._task_start = None

    def _arm_or_abort(self) -> None:
        """Arm protection for the active task; if that fails, the task is not begun."""
        t = self.active_task
        try:
            self._arm()
        except Exception as exc:
            self.abort_task()
            raise TaskError(f"could not protect the trained tasks {self.trained_tasks()} for "
                            f"task {t}, so task {t} was not begun (the network is as before "
                            f"begin_task({t})): {exc}") from exc

    def before_step(self, optimizer: torch.optim.Optimizer, owns: bool) -> None:
        """Called before every optimizer step (see ``steps.py``)."""
        check_step(self, optimizer, owns)

    def end_task(self) -> None:
        """Store the active task's binary masks, mark it trained and lift its protection."""
        if self.active_task is None:
            raise TaskError("end_task() without begin_task(): no task is being trained")
        t = self.active_task
        if not self._task_trained_on:
            warnings.warn(f"task {t} ran no training forward since begin_task({t}): its stored "
                          "masks are its initial embeddings' signs (call abort_task() instead "
                          "of end_task() to abandon a task)", RuntimeWarning, stacklevel=2)
        with torch.no_grad():
            for gate in self.gates().values():
                gate.task_masks[t] = (gate.embedding[t] > 0).to(gate.task_masks.dtype)
            self.trained[t] = True
        self._disarm()
        self.active_task = None
        self._task_start = None
        self.train(self.training)  # frozen leaves go to eval mode once a task is trained

    def trained_tasks(self, excluding: int | None = None) -> list[int]:
        return [t for t in range(self.num_tasks) if bool(self.trained[t]) and t != excluding]

    def forget(self, task_id: int) -> float:
        """Release the units only task ``task_id`` used and return the capacity gained.

        Its stored masks are zeroed and it is marked untrained, so later tasks may train what
        it alone held. Nothing another trained task reads changes: their outputs stay bit-exact.
        """
        t = self.check_task_id(task_id)
        if self.active_task is not None:
            raise TaskError(f"task {self.active_task} is being trained: call end_task() "
                            f"before forget({t})")
        if not bool(self.trained[t]):
            raise TaskError(f"task {t} is not trained, so there is nothing to forget "
                            f"(trained tasks: {self.trained_tasks()})")
        before = self.capacity()  # raises before anything changes if no input was seen yet
        with torch.no_grad():
            for gate in self.gates().values():
                gate.task_masks[t].zero_()
            self.trained[t] = False
        self.train(self.training)  # frozen leaves thaw once no task is trained
        return self.capacity() - before

    def example_spec(self) -> tuple[tuple[int, ...], torch.dtype] | None:
        """Shape and dtype of the example input that propagation uses; None before a forward."""
        if self._example is None:
            return None
        return tuple(self._example.shape), self._example.dtype

    def example_input(self) -> torch.Tensor | None:
        """The example input on the network's device, in its float dtype (after ``.half()``)."""
        example = self._example
        param = next(self.parameters(), None)
        if example is not None and param is not None and example.is_floating_point() \
                and param.is_floating_point():
            example = example.to(device=param.device, dtype=param.dtype)
        return example

    def set_example(self, shape: tuple[int, ...] | list[int],
                    dtype: torch.dtype = torch.float32) -> None:
        """Use zeros of ``shape`` as the example input (a reloaded network has seen no input).

        Propagation reads only shapes from the example, never values, so zeros protect exactly
        what the original sample did.
        """
        param = next(self.parameters(), None)
        device = param.device if param is not None else None
        self._example = torch.zeros(tuple(int(n) for n in shape), dtype=dtype, device=device)

    def _arm(self) -> None:
        """Install gradient hooks and the step guard for the active task."""
        self._disarm()
        self._guard = arm_task(self)
        self._needs_arming = False

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.disarm()
            self._guard = None

    def input_masks(self, out_masks: dict[str, torch.Tensor], task_id: int
                    ) -> dict[str, torch.Tensor]:
        """Per gated layer, which input features use units in ``out_masks`` (propagation)."""
        if self._example is None:
            raise HATError("the network has not seen an input yet: run one forward pass so "
                           "that masks can be propagated through the graph")
        masks = input_masks(self.model, self.layout, out_masks, self.example_input(), task_id)
        for path in self.layout.gated:  # a layer the propagation never reached: fully used
            if path not in masks:
                layer = self.model.get_submodule(path)
                masks[path] = torch.ones(getattr(layer, "in_features", None) or layer.in_channels)
        return masks

    # -- regularization, capacity, usage ---------------------------------------------------
    def regularization(self, task_id: int, mask_scale: float, c: float = 0.75,
                       mode: str = "original") -> torch.Tensor:
        """``c`` times HAT's sparsity penalty on task ``task_id``'s soft gates at ``mask_scale``.

        ``original``: mean gate value over units no other trained task uses; ``cross`` also
        rewards reusing the units other tasks use (averages with ``1 - mean gate over them``).
        """
        t = self.check_task_id(task_id)
        check_mask_scale(mask_scale)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) \
                or c < 0:
            raise ValueError(f"the regularization strength c must be a finite number >= 0, "
                             f"got {c!r}")
        if mode not in ("original", "cross"):
            raise ValueError(f"unknown regularization mode {mode!r}; choose original or cross")
        others = self.trained_tasks(excluding=t)
        free_sum = free_count = used_sum = used_count = 0.0
        for gate in self.gates().values():
            a = soft_gate(gate.embedding[t], mask_scale)
            used = gate.cumulative(others)
            free_sum = free_sum + (a * (1 - used)).sum()
            free_count += float((1 - used).sum())
            used_sum = used_sum + (a * used).sum()
            used_count += float(used.sum())
        reg = free_sum / free_count if free_count else torch.zeros(())
        if mode == "cross" and used_count:
            reg = (reg + (1 - used_sum / used_count)) / 2
        return c * reg

    def layer_capacity(self, tasks: list[int] | None = None) -> dict[str, float]:
        """Per gated layer, the fraction of weights and biases still free to train.

        Free means the adjustment rate ``1 - min(M_out, M_in)`` of ``tasks`` (default: all
        trained tasks) is 1.
        """
        tasks = self.trained_tasks() if tasks is None else self._check_tasks(tasks)
        sizes = self._gated_sizes()
        if not tasks:
            return {path: 1.0 for path in sizes}
        out = {path: gate.cumulative(tasks) for path, gate in self.gates().items()}
        inputs = self.input_masks(out, tasks[-1])
        result = {}
        for path in self.layout.gated:
            layer = self.model.get_submodule(path)
            protect_w, protect_b = weight_protection(layer, out[path], inputs[path])
            used = protect_w.sum() + (protect_b.sum() if layer.bias is not None else 0)
            result[path] = 1.0 - float(used) / sizes[path]
        return result

    def _check_tasks(self, tasks: Any) -> list[int]:
        if isinstance(tasks, (str, bytes)) or not hasattr(tasks, "__iter__"):
            raise TaskError(f"tasks must be a list of task ids, got {tasks!r}")
        return [self.check_task_id(t) for t in tasks]

    def capacity(self, tasks: list[int] | None = None) -> float:
        """Fraction of all gated weights and biases still free: 1.0 before task 0."""
        per_layer = self.layer_capacity(tasks)
        sizes = self._gated_sizes()
        return sum(per_layer[p] * sizes[p] for p in sizes) / sum(sizes.values())

    def _gated_sizes(self) -> dict[str, int]:
        """Number of weight and bias entries of each gated layer."""
        sizes = {}
        for path in self.layout.gated:
            layer = self.model.get_submodule(path)
            sizes[path] = layer.weight.numel() + (0 if layer.bias is None else layer.bias.numel())
        return sizes

    def mask_usage(self) -> dict[str, list[float | None]]:
        """Per gated layer and task, the fraction of units the task's stored mask uses."""
        return {path: [float(gate.task_masks[t].mean()) if bool(self.trained[t]) else None
                       for t in range(self.num_tasks)] for path, gate in self.gates().items()}

    # -- modules and report ----------------------------------------------------------------
    def train(self, mode: bool = True) -> "HATNetwork":
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
        return f"num_tasks={self.num_tasks}, gated_layers={len(self.layout.gated)}, trained={trained}"


def check_mask_scale(mask_scale: Any) -> None:
    value = mask_scale.item() if isinstance(mask_scale, torch.Tensor) and mask_scale.numel() == 1 \
        else mask_scale
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"mask_scale must be a positive finite number or None (hard gates), "
                         f"got {mask_scale!r}")


def check_begin_options(mode: str, adjustment: str, alpha: Any, s_max: Any) -> None:
    """``begin_task``'s options, checked before anything changes."""
    check_choice("mask_init", mode, MASK_INITS)
    check_choice("adjustment", adjustment, ADJUSTMENTS)
    if adjustment == "hat_const_alpha" and not (isinstance(alpha, (int, float))
                                                 and 0 <= alpha <= 1):
        raise OptionError(f"adjustment 'hat_const_alpha' needs alpha in [0, 1], got {alpha!r}")
    check_s_max(s_max)
