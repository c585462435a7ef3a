"""Converting inside leaf modules: the layers fx cannot see are gated where they sit.

timm keeps some blocks whole (MobileViT, NormFreeBlock, TinyVitBlock, ...) because their forward
branches on shapes; torch's ``MultiheadAttention`` is a leaf too, and so is a submodule that broke
tracing. Such a leaf runs eagerly, so it is converted in place instead of copied per task:

* each Linear or conv inside becomes a gated twin of its class (same object, same parameter
  names) whose output is multiplied by its gate; code that reads its ``weight`` or ``bias``
  directly (``F.linear(x, self.proj.weight)``) gets them with the gate folded into the rows;
* each norm inside becomes task-indexed (one copy per task), and so does, with ``loose="task"``,
  each submodule with weights but no layer to gate (an ``nn.LSTM``, a layer left out by
  ``include``/``exclude``); with ``loose="freeze"`` those are frozen once task 0 ends;
* parameters and buffers held directly by modules that also hold gated layers (``in_proj_weight``
  of ``MultiheadAttention``, attention biases) are frozen once task 0 ends.

The leaf itself becomes a scoped twin of its class: the graph passes it the task id and the gate
vectors, which it hands to the layers inside through a context variable for the length of the
call. Twins keep every module path and parameter name, so state dicts keep their keys. Mask
propagation cannot see inside, so the leaf's output and the inputs of its layers count as fully
used: whole rows of the units an earlier task uses are protected.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .embeddings import EmbeddingPolicy
from .errors import HATError
from .gates import apply_gate, scale_rows
from .layers import TaskIndexed, gate_node, is_gatable, is_norm, rows_are_units, unit_dim

__all__ = ['Scope', 'current_scope', 'ScopedLeaf', 'GatedInLeaf', 'twin', 'ScopedTaskIndexed',
           'LeafPlan', 'plan_leaf', 'apply_plan', 'route_calls']


@dataclass
class Scope:
    """What the layers inside a converted leaf need during one call of the leaf."""

    task_id: int
    gates: tuple[torch.Tensor, ...]


_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("hat_leaf_scope",
                                                                     default=None)


def current_scope(module: nn.Module) -> Scope:
    """The task id and gates of the converted leaf now running, or an error naming ``module``."""
    scope = _SCOPE.get()
    if scope is None:
        raise HATError(f"{type(module).__name__} belongs to a converted leaf of a HAT network and "
                       "runs only inside the network's forward (it needs the task id and gates); "
                       "gradient checkpointing, which runs it again in backward, cannot be used")
    return scope


class ScopedLeaf:
    """Mixin of converted leaves: put the task id and gates in scope, then run the leaf."""

    def forward(self, *args: Any, hat_task_id: int, hat_gates: tuple[torch.Tensor, ...],
                **kwargs: Any) -> Any:
        """Run the leaf with the task id and its layers' gates in scope."""
        token = _SCOPE.set(Scope(hat_task_id, tuple(hat_gates)))
        try:
            return super().forward(*args, **kwargs)
        finally:
            _SCOPE.reset(token)


class GatedInLeaf:
    """Mixin of the gated twins: gate the output; gate the rows of a weight read from outside."""

    hat_gate_index: int
    hat_unit_dim: int

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The layer's own forward, its output gated by the gate in scope."""
        scope = current_scope(self)
        self.__dict__["_hat_own_forward"] = True  # the layer's own reads of weight stay raw
        try:
            out = super().forward(*args, **kwargs)
        finally:
            self.__dict__["_hat_own_forward"] = False
        return apply_gate(out, scope.gates[self.hat_gate_index], self.hat_unit_dim)

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name not in ("weight", "bias") or value is None \
                or self.__dict__.get("_hat_own_forward", False):
            return value
        scope = _SCOPE.get()
        if scope is None:
            return value
        if not rows_are_units(self):
            raise HATError(f"code inside a converted leaf reads the {name} of a "
                           f"{type(self).__name__} directly; its rows are not its output units, "
                           "so the gate cannot be folded in: convert with leaves='loose'")
        return scale_rows(value, scope.gates[self.hat_gate_index])


_TWINS: dict[tuple[type, type], type] = {}


def twin(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front (created once per pair): same state, changed forward."""
    if (mixin, cls) not in _TWINS:
        _TWINS[mixin, cls] = type(f"HAT{cls.__name__}", (mixin, cls),
                                  {"__module__": __name__, "__reduce_ex__": _reduce_twin})
    return _TWINS[mixin, cls]


def _reduce_twin(self: nn.Module, protocol: int) -> tuple:
    """Twins are made at run time: pickle (and deep-copy) them as mixin and class, made again."""
    mixin, cls = type(self).__bases__
    return _new_twin, (mixin, cls), self.__dict__.copy()


def _new_twin(mixin: type, cls: type) -> nn.Module:
    return object.__new__(twin(mixin, cls))


class ScopedTaskIndexed(TaskIndexed):
    """A task-indexed norm inside a converted leaf: the task id comes from the leaf's scope.

    Attributes the leaf's code reads from the norm (``eps``, ``weight``) come from the copy of
    the task being run.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy of the task in scope."""
        return super().forward(*args, task_id=current_scope(self).task_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            scope = _SCOPE.get()
            copies = super().__getattr__("copies")
            return getattr(copies[scope.task_id if scope is not None else 0], name)


@dataclass
class LeafPlan:
    """What converting one leaf inside does, by module path in the graph module."""

    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)
    indexed: list[tuple[str, nn.Module]] = field(default_factory=list)  # other modules per task
    frozen: list[str] = field(default_factory=list)  # parameters and buffers, by full name
    copies: dict[str, list[nn.Module]] = field(default_factory=dict)  # heads: their copies


def plan_leaf(leaf: nn.Module, path: str, selected: Callable[[str], bool], loose: str,
              heads: dict[str, list[nn.Module]] | None = None,
              embeddings: EmbeddingPolicy | None = None) -> LeafPlan:
    """Walk the leaf: layers to gate (those ``selected``), norms to task-index, the rest by
    ``loose`` (modules without a layer to gate) or frozen (tensors beside gated layers, and
    the embedding tables ``embeddings`` freezes, which it records).
    ``heads``: head paths inside the leaf and their per-task copies (always task-indexed)."""
    plan = LeafPlan(copies=dict(heads or {}))
    policy = embeddings or EmbeddingPolicy()

    def join(prefix: str, name: str) -> str:  # the path "" is the model itself (toplevel.py)
        return f"{prefix}.{name}" if prefix and name else prefix or name

    def tensors(module: nn.Module, prefix: str, recurse: bool = True) -> list[str]:
        return [join(prefix, n) for n, _ in module.named_parameters(recurse=recurse)] + [
            join(prefix, n) for n, _ in module.named_buffers(recurse=recurse)]

    def gates_inside(module: nn.Module, prefix: str) -> bool:
        return any(is_gatable(m) and selected(join(prefix, n))
                   for n, m in module.named_modules())

    def walk(module: nn.Module, prefix: str) -> None:
        plan.frozen += tensors(module, prefix, recurse=False)
        for name, child in module.named_children():
            child_path = join(prefix, name)
            if child_path in plan.copies:
                plan.indexed.append((child_path, child))
            elif policy.freezes(child):
                plan.frozen += tensors(child, child_path)
                policy.record(child_path, child)
            elif is_gatable(child) and selected(child_path):
                plan.layers.append((child_path, child))
                plan.frozen += [t for t in tensors(child, child_path)
                                if t not in (join(child_path, "weight"), join(child_path, "bias"))]
            elif is_norm(child):
                plan.norms.append((child_path, child))
            elif not gates_inside(child, child_path) and not policy.freezes_inside(child) \
                    and not any(h.startswith(f"{child_path}.") for h in plan.copies):
                if loose == "task" and tensors(child, child_path):
                    plan.indexed.append((child_path, child))
                else:
                    plan.frozen += tensors(child, child_path)
            else:
                walk(child, child_path)

    walk(leaf, path)
    return plan


def apply_plan(gm: fx.GraphModule, path: str, plan: LeafPlan, num_tasks: int) -> None:
    """Turn the leaf into a scoped twin, its layers into gated twins, its norms task-indexed."""
    leaf = gm.get_submodule(path)
    if not isinstance(leaf, ScopedLeaf):
        leaf.__class__ = twin(ScopedLeaf, type(leaf))
    for index, (_, layer) in enumerate(plan.layers):
        if not isinstance(layer, GatedInLeaf):
            layer.__class__ = twin(GatedInLeaf, type(layer))
        layer.hat_gate_index = index
        layer.hat_unit_dim = unit_dim(layer)
    for norm_path, norm in plan.norms + plan.indexed:
        parent, _, name = norm_path.rpartition(".")
        setattr(gm.get_submodule(parent), name,
                ScopedTaskIndexed(norm, num_tasks, plan.copies.get(norm_path)))


def route_calls(graph: fx.Graph, calls: list[fx.Node], task: fx.Node, scale: fx.Node,
                gate_paths: list[str]) -> None:
    """Pass the task id and the gates of the layers inside to each call of the leaf."""
    for node in calls:
        with graph.inserting_before(node):
            gates = tuple(gate_node(graph, g, task, scale) for g in gate_paths)
        node.kwargs = {**node.kwargs, "hat_task_id": task, "hat_gates": gates}
