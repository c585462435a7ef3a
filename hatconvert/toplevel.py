"""Models whose own forward does not trace: kept whole, and converted inside like a leaf.

torchvision's detection models, torchaudio's ConvTasNet or a model that builds a module inside
``forward`` break tracing in their top-level forward, where no submodule can be kept whole
instead. With ``auto_leaves=True`` such a model is converted the way a leaf is (leaves.py): its
layers become gated twins, its norms task-indexed, other modules with weights by the ``loose``
policy, and the model itself a twin of its class whose forward takes ``task_id`` and
``mask_scale``, computes every gate and runs the original forward with them in scope. Module
paths and state-dict keys stay those of the model. The cost: propagation cannot see the
forward, so every input of every layer counts as used by every task (whole rows of the units
an earlier task uses are protected), and the report says so.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .embeddings import EmbeddingPolicy
from .errors import ConversionError
from .gates import HATGate
from .layers import output_units, unit_dim
from .layout import GATES, GatedLayer, GatePlacement, Layout
from .leaves import ScopedLeaf, apply_plan, plan_leaf, twin
from .rewrite import head_copies, selected, unique_name

__all__ = ["TopLevel", "TOP", "convert_top_level"]

TOP = "(top level)"  # how the report names the model kept whole


class TopLevel(ScopedLeaf):
    """Mixin of a model kept whole: its gates computed here, its forward run with them."""

    hat_gate_names: list[str]

    def forward(self, *args: Any, task_id: int, mask_scale: Any = None, **kwargs: Any) -> Any:
        """The model's own forward, with task ``task_id``'s gates in scope."""
        gates_root = getattr(self, GATES)
        gates = tuple(getattr(gates_root, n)(task_id, mask_scale) for n in self.hat_gate_names)
        return ScopedLeaf.forward(self, *args, hat_task_id=task_id, hat_gates=gates, **kwargs)


def convert_top_level(model: nn.Module, num_tasks: int, *, heads: list[str],
                      head_classes: list[int] | None, mask_init: str, loose: str,
                      include: list[str] | None, exclude: list[str] | None, reason: str,
                      embeddings: str = "loose") -> tuple[nn.Module, Layout]:
    """A converted copy of ``model`` kept whole, and what was done (``reason``: why tracing
    could not go on, for the report)."""
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise ConversionError(
            f"{type(model).__name__} does not trace ({reason}) and cannot be kept whole: it is "
            f"an nn.{_container(model)} whose "
            "forward may run every child in turn, and the gates would be one more child")
    root = copy.deepcopy(model).eval()
    for path in heads:
        try:
            root.get_submodule(path)
        except AttributeError:
            raise ConversionError(f"head '{path}' is not a module of {type(model).__name__}") \
                from None
    copies = {h: head_copies(root.get_submodule(h), h, num_tasks, head_classes) for h in heads}
    policy = EmbeddingPolicy.for_model(embeddings, root)
    plan = plan_leaf(root, "", lambda p: selected(p, include, exclude) and p not in copies,
                     loose, heads=copies, embeddings=policy)
    if not plan.layers:
        raise ConversionError(f"{type(model).__name__} does not trace ({reason}) and holds no "
                              "Linear or conv layer to gate inside it")
    gates_root = nn.Module()
    names = []
    for path, layer in plan.layers:
        name = unique_name(gates_root, path)
        gates_root.add_module(name, HATGate(num_tasks, output_units(layer), mask_init,
                                            device=layer.weight.device))
        names.append(name)
    root.__class__ = twin(TopLevel, type(root))
    apply_plan(root, "", plan, num_tasks)
    root.add_module(GATES, gates_root)
    root.hat_gate_names = names
    layout = _layout(plan, names, copies, reason)
    layout.frozen_embeddings = dict(policy.frozen)
    return root, layout


def _container(model: nn.Module) -> str:
    return next(c.__name__ for c in (nn.Sequential, nn.ModuleList, nn.ModuleDict)
                if isinstance(model, c))


def _layout(plan: Any, names: list[str], heads: dict[str, list[nn.Module]], reason: str
            ) -> Layout:
    layout = Layout()
    for (path, layer), name in zip(plan.layers, names):
        layout.gated[path] = GatedLayer(path, f"{GATES}.{name}", output_units(layer),
                                        unit_dim(layer), None, GatePlacement.LEAF, leaf=TOP)
    layout.norms = [p for p, _ in plan.norms]
    layout.task_leaves = [p for p, _ in plan.indexed if p not in heads]
    layout.heads = [p for p, _ in plan.indexed if p in heads]
    layout.frozen_tensors = list(plan.frozen)
    layout.top_level = reason
    return layout
