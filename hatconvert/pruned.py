"""Pruned export: one task as a standalone ``torch.export`` program without its closed units.

A graph pass (``Pruner``) copies the HAT graph for task ``t`` with every gate made a constant,
and gives each gated layer only the rows of the units ``t`` opens. Its output stays *compact*
(only those units, along the unit dim) for as long as what reads it keeps zeros at zero and
acts per unit: activations, dropout, pooling, a flatten, a norm whose gate sits behind it, a
sum of two tensors compact on the same units, and the next gated layer, which then takes only
the matching input columns. Anything else gets the full tensor back, zeros in the closed
units (``expand_units``): residual streams and concatenations run as they were. A LayerNorm
on a compact tensor read only by gated layers runs on the kept units (pruned_norms.py).
Attention runs packed where ``attention_plan`` allows it (pruned_attention.py), else on the
heads with a value unit open (pruned_heads.py). The result is exact by construction: a closed
unit is zero in the HAT network too, and a query unit whose key is closed adds zero.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import operator
import pathlib
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .compact import Compact, expand_units
from .conv_taps import without_padding_taps
from .errors import ExportError
from .gates import HATGate, apply_gate, closed_rows_zeroed, gated_layer, scale_rows
from .layers import TaskIndexed, TaskParameter, gate_behind_norm, normalizes_each_unit
from .leaves import ScopedLeaf
from .attention_plan import plan_attention
from .pruned_attention import Packed, PackedOps
from .pruned_heads import HeadOps
from .pruned_norms import NormOps, NormTail
from .op_rules import (ELEMENTWISE_MODULES, STRUCTURAL_MODULES, is_elementwise,
                       writes_first_argument)

__all__ = ['Compact', 'expand_units', 'Pruner', 'node_shapes', 'export_program', 'is_onnx']

_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
          F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
          F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_POOL_MODULES = tuple(m for m in STRUCTURAL_MODULES if "Pool" in m.__name__)
_SUMS = {"add", "__add__", "sub", "__sub__"}
_SCALES = {"mul", "__mul__", "__rmul__", torch.mul, operator.mul}
_IDENTITIES_IN_EVAL = {"timm.layers.drop.DropPath"}  # what eval mode makes the identity


class _Shapes(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


@torch.no_grad()
def node_shapes(gm: fx.GraphModule, args: list[Any]) -> dict[fx.Node, tuple | None]:
    """The output shape of every node of ``gm`` on ``args`` (one per placeholder)."""
    interpreter = _Shapes(gm)
    interpreter.shapes = {}
    interpreter.run(*args)
    return interpreter.shapes


class _KeptUnits(HeadOps):
    """The ops that give a compact tensor compact: the same op on the kept units alone."""

    gm: fx.GraphModule
    graph: fx.Graph
    shapes: dict[fx.Node, tuple | None]
    env: dict[fx.Node, Any]

    def keeps_units(self, n: fx.Node) -> Any:
        """The op on the kept units alone, when that gives the same numbers; else None."""
        item = self.item_of(n)
        if item is not None:
            return item
        args = self.arg(n.args)
        compact = [a for a in args if isinstance(a, Compact)]
        if not compact:
            return None
        c = compact[0]
        heads = self.head_op(n, args, c)
        if heads is not None:
            return heads
        if n.kwargs and any(isinstance(v, fx.Node) for v in n.kwargs.values()):
            return None
        rest = [a for a in args if a is not c]
        if n.target in _SUMS or n.target in (torch.add, torch.sub, operator.add, operator.sub):
            if len(compact) == 2 and len(args) == 2 and compact[1].dim == c.dim:
                return self._sum_of_compacts(n, compact[0], compact[1])
            return self._add_into(n, args, c)
        if n.target in _SCALES and len(args) == 2 and len(compact) == 1 and not n.kwargs:
            return self._scaled(n, c, n.args[1] if args[0] is c else n.args[0])
        if n.target in ("permute", torch.permute) and args[0] is c:
            return self._permuted(n, c)
        if len(compact) != 1 or args[0] is not c or any(isinstance(a, fx.Node) for a in rest):
            return None
        if not self._per_unit(n, c):
            return None
        out = self._on_compact(n, c)
        return out if out is None or isinstance(out, Compact) else Compact(out, c.dim, c.index,
                                                                           c.size)

    def _sum_of_compacts(self, n: fx.Node, a: Compact, b: Compact) -> Any:
        """Two branches compact on units ``A`` and ``B``: their sum, compact on ``A | B``."""
        if self.shapes.get(n.args[0]) != self.shapes.get(n) or \
                self.shapes.get(n.args[1]) != self.shapes.get(n) or n.kwargs:
            return None
        if torch.equal(a.index, b.index):
            out = self.graph.create_node(n.op, n.target, (a.node, b.node))
            return Compact(out, a.dim, a.index, a.size)
        union = torch.unique(torch.cat([a.index, b.index]))
        if len(union) == a.size:
            return None
        first, second = (self.graph.call_function(expand_units, (
            c.node, self.attr("kept", torch.searchsorted(union, c.index)), len(union), c.dim))
            for c in (a, b))
        out = self.graph.create_node(n.op, n.target, (first, second))
        return Compact(out, a.dim, union, a.size)

    def _scaled(self, n: fx.Node, c: Compact, other: Any) -> Any:
        """A compact tensor times a constant (layer scale ``gamma.reshape(1, -1, 1, 1)``):
        times the constant's entries of the kept units."""
        value = self.consts.get(other) if isinstance(other, fx.Node) else None
        ndim = len(self.shapes[n])
        if value is None or value.ndim > ndim:
            return None
        shaped = value.reshape((1,) * (ndim - value.ndim) + tuple(value.shape))
        if shaped.shape[c.dim] == c.size:
            shaped = shaped.index_select(c.dim, c.index)
        elif shaped.shape[c.dim] != 1:
            return None
        out = self.graph.call_function(operator.mul, (c.node, self.attr("scale", shaped)))
        return Compact(out, c.dim, c.index, c.size)

    def _permuted(self, n: fx.Node, c: Compact) -> Any:
        dims = n.args[1:] if n.op == "call_method" else n.args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % len(dims) for d in dims]
        out = self.graph.create_node(n.op, n.target, (c.node, *n.args[1:]), dict(n.kwargs))
        units = None if c.units is None else c.units.permute(dims)
        return Compact(out, dims.index(c.dim), c.index, c.size, units)

    def _add_into(self, n: fx.Node, args: Any, c: Compact) -> Any:
        """``full + compact`` (a residual stream and a branch): the branch added into the kept
        units of the stream, without expanding it first."""
        if n.target not in ("add", "__add__", torch.add, operator.add) or n.kwargs \
                or len(args) != 2 or isinstance(args[0], Compact) == isinstance(args[1], Compact):
            return None
        other = n.args[1] if args[0] is c else n.args[0]
        if not isinstance(other, fx.Node) or self.shapes.get(other) != self.shapes.get(n):
            return None
        index = self.attr("kept", c.index)
        return self.graph.call_method("index_add", (self.env[other], c.dim, index, c.node))

    def _per_unit(self, n: fx.Node, c: Compact) -> bool:
        """Whether ``n`` acts on each unit alone and keeps zeros at zero."""
        if n.op == "call_module":
            module = self.gm.get_submodule(n.target)
            if isinstance(module, _POOL_MODULES) or isinstance(module, nn.Flatten):
                return c.dim == 1
            if f"{type(module).__module__}.{type(module).__qualname__}" in _IDENTITIES_IN_EVAL:
                return not module.training
            return isinstance(module, ELEMENTWISE_MODULES) and _zero_at_zero(module, (), {})
        if n.target in _POOLS:
            return c.dim == 1
        if n.target in (torch.flatten, "flatten"):
            return c.dim == 1
        if n.op in ("call_function", "call_method") and is_elementwise(n.target):
            fn = getattr(torch.Tensor, n.target) if n.op == "call_method" else n.target
            return _zero_at_zero(fn, tuple(n.args[1:]), dict(n.kwargs))
        return False

    def _on_compact(self, n: fx.Node, c: Compact) -> Any:
        flatten = n.target in (torch.flatten, "flatten") or n.op == "call_module" and isinstance(
            self.gm.get_submodule(n.target), nn.Flatten)
        if flatten:
            return self._flatten(n, c)
        args = (c.node,) + tuple(n.args[1:])
        if n.op == "call_module":
            return self.graph.call_module(self._module_name(n.target,
                                                            self.gm.get_submodule(n.target)),
                                          args, dict(n.kwargs))
        return self.graph.create_node(n.op, n.target, args, dict(n.kwargs))

    def _flatten(self, n: fx.Node, c: Compact) -> Any:
        """``flatten(x, 1)`` of ``(B, C, ...)``: unit ``u`` becomes features ``u * rest ...``."""
        shape = self.shapes[n.args[0]]
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 1)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        if n.op == "call_module":
            module = self.gm.get_submodule(n.target)
            start, end = module.start_dim, module.end_dim
        if start != 1 or end not in (-1, len(shape) - 1) or len(shape) < 2:
            return None
        rest = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
        index = (c.index[:, None] * rest + torch.arange(rest)).flatten()
        out = self.graph.call_function(torch.flatten, (c.node, 1))
        return Compact(out, 1, index, c.size * rest)

    def _ndim(self, n: fx.Node) -> int:
        shape = self.shapes.get(n)
        if shape is None:
            raise ExportError(f"no shape is known for graph node '{n.name}'")
        return len(shape)


class Pruner(_KeptUnits, PackedOps, NormOps):
    """Builds the pruned graph of task ``t`` node by node (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, t: int, shapes: dict[fx.Node, tuple | None],
                 inputs: dict[fx.Node, Any], prune: bool = True):
        self.gm, self.t, self.shapes, self.inputs = gm, t, shapes, inputs
        self.prune = prune  # False: the same program with every unit kept (to compare)
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.env: dict[fx.Node, Any] = {}
        self.masks: dict[fx.Node, torch.Tensor] = {}  # gate nodes: task t's bool mask
        self.consts: dict[fx.Node, torch.Tensor] = {}  # values known now (parameters, views)
        self.set_plans(plan_attention(gm, _layer_masks(gm, t), shapes) if prune else [])

    # -- the new graph's pieces ----------------------------------------------------------------
    def attr(self, name: str, value: Any) -> fx.Node:
        """A module or tensor the new graph reads, under a fresh name."""
        key = f"{name.replace('.', '_')}_{len(self.attrs)}"
        self.attrs[key] = value
        return self.graph.get_attr(key)

    def full(self, value: Any) -> Any:
        """``value`` for an op that needs whole tensors: a compact one expanded with zeros."""
        if isinstance(value, Packed):
            return self.unpack(value)
        if isinstance(value, NormTail):
            return self.full_tail(value)
        if isinstance(value, Compact):
            if len(value.index) == value.size:  # every unit kept: the tensor is whole already
                return value.node
            index = self.attr("kept", value.index)
            return self.graph.call_function(expand_units, (value.node, index, value.size,
                                                           value.dim))
        if isinstance(value, (tuple, list)):
            return type(value)(self.full(v) for v in value)
        if isinstance(value, dict):
            return {k: self.full(v) for k, v in value.items()}
        return value

    def arg(self, a: Any) -> Any:
        """An old argument in the new graph (gates as constant masks, compact kept)."""
        if isinstance(a, fx.Node):
            if a in self.masks:
                return self.attr("mask", self.masks[a])
            return self.env[a]
        if isinstance(a, (tuple, list)):
            return type(a)(self.arg(v) for v in a)
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        if isinstance(a, slice):  # x[:, :h] with h read from a shape
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        return a

    def copy_node(self, n: fx.Node, target: Any = None) -> fx.Node:
        """``n`` as it was, on whole tensors. An op that writes its first argument in place
        writes the whole tensor, which later readers of that argument then get."""
        args, kwargs = self.full(self.arg(n.args)), self.full(self.arg(n.kwargs))
        module = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        first = n.args[0] if n.args else None
        if isinstance(first, fx.Node) and isinstance(self.env.get(first), Compact) and \
                writes_first_argument(n.op, n.target, dict(n.kwargs), module):
            self.env[first] = args[0]
        op = n.op
        if op == "call_module":
            module = self.gm.get_submodule(n.target) if target is None else target
            return self.graph.call_module(self._module_name(n.target, module), args, kwargs)
        return self.graph.create_node(op, n.target if target is None else target, args, kwargs)

    def _record_constant(self, n: fx.Node) -> None:
        """Keep the value of a parameter read, or of a view or cast of one, for ``_scaled``."""
        if n.op == "get_attr" and isinstance(_attr(self.gm, n.target), torch.Tensor):
            self.consts[n] = _attr(self.gm, n.target).detach()
        elif n.op == "call_module" and isinstance(self.gm.get_submodule(n.target),
                                                  TaskParameter):
            self.consts[n] = self.gm.get_submodule(n.target).copies[self.t].detach()
        elif n.op == "call_method" and n.target in ("reshape", "view", "unsqueeze") and \
                n.args[0] in self.consts and not any(isinstance(a, fx.Node)
                                                     for a in n.args[1:]):
            self.consts[n] = getattr(self.consts[n.args[0]], n.target)(*n.args[1:])

    def new_layer(self, layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor | None,
                  zero: torch.Tensor | None = None) -> nn.Module:
        """``layer`` with output units ``rows`` and input features ``cols``; the rows where
        ``zero`` is True put out exact zeros (kept only for a tensor's shape)."""
        new = _sliced(layer, rows, cols)
        if zero is not None and bool(zero.any()):
            with torch.no_grad():
                new.weight[zero] = 0
                if new.bias is not None:
                    new.bias[zero] = 0
        return new

    def layer_input(self, n: fx.Node, layer: nn.Module, x: Any
                    ) -> tuple[fx.Node, torch.Tensor | None]:
        """What gated layer ``n`` reads: a compact input as it is with the columns of its kept
        units, anything else whole (columns None)."""
        in_dim = len(self.shapes[n.args[0]]) - 1 if isinstance(layer, nn.Linear) else 1
        if isinstance(x, NormTail) and x.kept.dim == in_dim:  # add_rank_one does the rest
            return x.kept.node, x.kept.index
        if isinstance(x, Compact) and x.dim == in_dim and len(x.index):
            return x.node, x.index
        return self.full(x), None

    def _module_name(self, path: str, module: nn.Module) -> str:
        key = f"{path.replace('.', '_')}_m{len(self.attrs)}"
        self.attrs[key] = module
        return key

    # -- the pass ------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for n in self.gm.graph.nodes:
            self.env[n] = self.node(n)
            self._record_constant(n)
        gm = fx.GraphModule(self.attrs, self.graph, class_name="PrunedTask")
        gm.graph.eliminate_dead_code(is_impure_node=_writes)
        # built again so that it holds only what the graph reads (never delete_all_unused_
        # submodules: the modules are the network's own)
        return fx.GraphModule(gm, gm.graph, class_name="PrunedTask").eval()

    def node(self, n: fx.Node) -> Any:  # noqa: C901 - one branch per kind of node
        if n.op == "placeholder":
            if n in self.inputs:
                return self.inputs[n]
            return self.graph.placeholder(n.target)
        if n.op == "output":
            return self.graph.output(self.full(self.arg(n.args[0])))
        if n.op == "get_attr":
            return self.attr(n.target, _attr(self.gm, n.target))
        if n.op == "call_function" and n.target in (gated_layer, closed_rows_zeroed):
            layer = self.gm.get_submodule(n.args[1].target)
            if n in self.packed_layers:
                return self.packed_layer(n, layer, self.arg(n.args[0]))
            return self.gated(n, layer, self.masks[n.args[2]])
        if self.takes_packed(n):
            return self.packed_node(n)
        if n.op == "call_module":
            return self.module_call(n, self.gm.get_submodule(n.target))
        if n.op == "call_function" and n.target is apply_gate:
            return self.gate_output(n)
        if n.op == "call_function" and n.target is scale_rows:
            return self.graph.call_function(scale_rows, self.full(self.arg(n.args)))
        return self.keeps_units(n) or self.copy_node(n)

    def module_call(self, n: fx.Node, module: nn.Module) -> Any:
        if isinstance(module, HATGate):
            self.masks[n] = (module.embedding[self.t] > 0).detach().clone()
            return None
        if isinstance(module, TaskParameter):
            return self.attr(n.target, module.copies[self.t])
        if isinstance(module, TaskIndexed):
            return self.task_module(n, module.copies[self.t])
        if isinstance(module, ScopedLeaf) and "hat_task_id" in n.kwargs:
            kwargs = {**n.kwargs, "hat_task_id": self.t}
            args = self.full(self.arg(n.args))
            return self.graph.call_module(self._module_name(n.target, module), args,
                                          self.full(self.arg(kwargs)))
        if self.prune and n.args and isinstance(module, nn.LayerNorm):  # no affine: shared
            tail = self.norm_on_kept(n, module, self.arg(n.args[0]))
            if tail is not None:
                return tail
        return self.keeps_units(n) or self.copy_node(n)

    # -- gated layers ----------------------------------------------------------------------------
    def gated(self, n: fx.Node, layer: nn.Module, mask: torch.Tensor) -> Any:
        """A gated Linear or ConvNd with only the open rows and the input columns it is given."""
        x = self.arg(n.args[0])
        rows = mask.nonzero().squeeze(1)
        dim = self._ndim(n) - 1 if isinstance(layer, nn.Linear) else 1
        kind = _layer_kind(layer) if self.prune and len(rows) else None
        in_shape = self.shapes[n.args[0]]
        if kind is None:  # whole: no choice by batch size (export would guard on it)
            target = gated_layer if n.target is gated_layer else _zero_closed_outputs
            whole = without_padding_taps(layer, in_shape)
            return self.graph.call_function(target, (self.full(x), self.attr(n.args[1].target,
                                                     whole), self.attr("mask", mask)))
        if kind == "depthwise":
            new, inp = self._depthwise(layer, rows, x)
        else:
            inp, cols = self.layer_input(n, layer, x)
            rows = _padded_rows(rows, mask, _ROW_MULTIPLE if isinstance(layer, nn.Linear)
                                else _CHANNEL_MULTIPLE)
            new = self.new_layer(layer, rows, cols, zero=~mask[rows])
        new = without_padding_taps(new, in_shape)
        out = self.graph.call_module(self._module_name(n.args[1].target, new), (inp,))
        if isinstance(x, NormTail) and kind == "dense":
            out = self.add_rank_one(out, new, layer, rows, x, ~mask[rows])
        return Compact(out, dim, rows, mask.numel())

    def _depthwise(self, layer: nn.Module, rows: torch.Tensor, x: Any) -> tuple[nn.Module, Any]:
        """Channel ``c`` reads input channel ``c``: pick the open ones from the input."""
        if isinstance(x, Compact) and x.dim == 1 and bool(torch.isin(rows, x.index).all()):
            where = torch.searchsorted(x.index, rows)
            inp = self.graph.call_method("index_select", (x.node, 1, self.attr("rows", where)))
        else:
            inp = self.graph.call_method("index_select", (self.full(x), 1, self.attr("rows",
                                                                                     rows)))
        return _sliced(layer, rows, None, groups=len(rows)), inp

    def gate_output(self, n: fx.Node) -> Any:
        """A gate on a layer's output that could not be folded: keep the open units only."""
        site, mask, dim = self.arg(n.args[0]), self.masks[n.args[1]], n.args[2]
        dim = dim % self._ndim(n)
        rows = mask.nonzero().squeeze(1)
        if isinstance(site, Compact) and site.dim == dim and torch.equal(site.index, rows):
            return site
        kept = self.graph.call_method("index_select", (self.full(site), dim,
                                                       self.attr("rows", rows)))
        return Compact(kept, dim, rows, mask.numel())

    def task_module(self, n: fx.Node, module: nn.Module) -> Any:
        """Task ``t``'s copy of a norm, head or leaf; a per-unit norm runs on kept units."""
        gate = n.kwargs.get("gate")
        x = self.arg(n.args[0]) if n.args else None
        tail = self.norm_on_kept(n, module, x) if self.prune else None
        if tail is not None:
            return tail
        if gate is not None and isinstance(x, Compact) and normalizes_each_unit(module) \
                and isinstance(module, nn.modules.batchnorm._BatchNorm) and x.dim == 1 \
                and gate_behind_norm(module, torch.empty(self.shapes[n.args[0]], device="meta"),
                                     n.kwargs.get("gate_dim", 1)) \
                and len(n.args) == 1:
            mask = self.masks[gate]
            padding = ~mask[x.index]  # closed units a layer kept as zero rows (its padding)
            if int(mask.sum()) == int((~padding).sum()) and \
                    (not bool(padding.any()) or _zeros_stay_zero(module)):
                norm = _sliced_norm(module, x.index, zero=padding)
                out = self.graph.call_module(self._module_name(n.target, norm), (x.node,))
                return Compact(out, 1, x.index, x.size)
        kwargs = {k: v for k, v in n.kwargs.items() if k != "task_id"}
        if gate is not None:  # TaskIndexed's own gating, over task t's copy alone
            module, kwargs = TaskIndexed(module, 1, [module]), {**kwargs, "task_id": 0}
        return self.graph.call_module(self._module_name(n.target, module),
                                      self.full(self.arg(n.args)), self.full(self.arg(kwargs)))


def _layer_masks(gm: fx.GraphModule, t: int) -> dict[fx.Node, torch.Tensor]:
    """Task ``t``'s open units of each gated layer node."""
    return {n: (gm.get_submodule(n.args[2].target).embedding[t] > 0).detach()
            for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (gated_layer, closed_rows_zeroed)}


def _attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _writes(node: fx.Node) -> bool:
    """Nodes dead-code elimination must keep: those that change a tensor in place."""
    module = node.graph.owning_module.get_submodule(node.target) \
        if node.op == "call_module" else None
    return node.op in ("placeholder", "output") or node.op != "get_attr" and \
        writes_first_argument(node.op, node.target, dict(node.kwargs), module)


def _zero_closed_outputs(x: torch.Tensor, layer: nn.Module, mask: torch.Tensor
                         ) -> torch.Tensor:
    """``closed_rows_zeroed`` without its choice by size: the closed outputs selected away."""
    return apply_gate(layer(x), mask, -1 if isinstance(layer, nn.Linear) else 1)


def _zero_at_zero(fn: Any, rest: tuple, kwargs: dict) -> bool:
    try:
        out = fn(torch.zeros(4), *rest, **kwargs)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


def _layer_kind(layer: nn.Module) -> str | None:
    """``dense`` (Linear, ConvNd with one group), ``depthwise``, or None (left whole)."""
    if type(layer) is nn.Linear:
        return "dense"
    if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and layer.padding_mode == "zeros":
        if layer.groups == 1:
            return "dense"
        if layer.groups == layer.in_channels == layer.out_channels:
            return "depthwise"
    return None


_ROW_MULTIPLE = 16  # oneDNN's GEMM runs 240 rows faster than 231 (3.6 against 5.1 ms)
_CHANNEL_MULTIPLE = 8  # oneDNN's blocked convolution formats hold 8 or 16 channels


def _padded_rows(rows: torch.Tensor, mask: torch.Tensor, multiple: int) -> torch.Tensor:
    """``rows`` and the first closed units after them up to a multiple of ``multiple``: zero
    rows that cost less than the odd size saves (closed units are zero anyway)."""
    extra = -len(rows) % multiple
    if extra == 0 or len(rows) + extra > mask.numel():
        return rows
    closed = (~mask).nonzero().squeeze(1)[:extra]
    return torch.cat([rows, closed]).sort().values


def _sliced(layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor | None,
            groups: int | None = None) -> nn.Module:
    """A copy of ``layer`` with output units ``rows`` and input features ``cols``."""
    weight = layer.weight.detach()[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = None if layer.bias is None else layer.bias.detach()[rows].clone()
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = type(layer)(weight.shape[1] * (groups or 1), weight.shape[0], layer.kernel_size,
                          layer.stride, layer.padding, layer.dilation, groups or 1,
                          bias is not None)
    new = new.to(weight.device, weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.eval()


def _sliced_norm(norm: nn.Module, rows: torch.Tensor, zero: torch.Tensor | None = None
                 ) -> nn.Module:
    """A copy of a BatchNorm (activation and all, for timm's ``BatchNormAct2d``) with the
    channels ``rows`` only; those where ``zero`` is True put out zeros (see ``_zeros_stay_zero``)."""
    new = copy.deepcopy(norm)
    new.num_features = len(rows)
    fill = {"weight": 0.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    with torch.no_grad():
        for name, value in fill.items():
            old = getattr(norm, name)
            if old is None:
                continue
            kept = old.detach()[rows].clone()
            if zero is not None:
                kept[zero] = value
            setattr(new, name, nn.Parameter(kept) if isinstance(old, nn.Parameter) else kept)
    return new.eval()


def _zeros_stay_zero(norm: nn.Module) -> bool:
    """Whether a BatchNorm can put out exact zeros on chosen channels: it has a weight and a
    bias to zero there, and its activation (timm's ``BatchNormAct2d``) keeps zero at zero."""
    act = getattr(norm, "act", None)
    return norm.weight is not None and norm.bias is not None and \
        (act is None or _zero_at_zero(act, (), {}))


def _bound_inputs(gm: fx.GraphModule, t: int, x: torch.Tensor
                  ) -> tuple[dict[fx.Node, Any], list[Any]]:
    """Task ``t``, hard gates, and every input but the first at the value tracing fixed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound: dict[fx.Node, Any] = {}
    args: list[Any] = [x]
    for p in placeholders[1:]:
        value = t if p.target == "task_id" else p.args[0] if p.args else None
        if p.target not in ("task_id", "mask_scale") and not p.args:
            raise ExportError(f"the pruned export takes the model's first input only, and "
                              f"input '{p.target}' has no default")
        bound[p] = value
        args.append(value)
    return bound, args


@torch.no_grad()
def export_program(net: Any, t: int, path: str | None = None, prune: bool = True
                   ) -> torch.export.ExportedProgram:
    """Task ``t`` pruned to its open units, as a ``torch.export`` program of the first input
    (batch size free), checked against ``net(x, t)`` on the example input; saved to ``path`` if
    given (a ``.pt2`` that ``torch.export.load`` runs without hatconvert, or for a ``.onnx``
    name an ONNX model). ``prune=False`` keeps every unit (closed ones zero): the same program
    unpruned, to compare with."""
    from .checkpoint import write_atomic
    _check_onnx_exporter(path)
    if net.layout.top_level is not None:
        raise ExportError(f"{net.layout.signature.model} is kept whole (its forward does not "
                          "trace): the pruned export needs its graph")
    call = net.example_input()
    if call is None or not isinstance(call[0], torch.Tensor) or call[1]:
        raise ExportError("the pruned export needs an example call with one tensor input: "
                          "run net.eval(); net(x, task_id) once first")
    x = call[0] if call[0].shape[0] > 1 else torch.cat([call[0], call[0]])
    training = net.training
    net.eval()
    try:
        pruned = _pruned_graph(net, t, x, prune)
        expected, got = net(x, t), pruned(x)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5) and \
                not _equal_in_float64(net, t, x, prune):
            raise ExportError(f"the pruned program of task {t} differs from the network by "
                              f"{float((got - expected).abs().max()):.3g}: please report the model")
        program = torch.export.export(pruned, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    finally:
        net.train(training)
    if is_onnx(path):
        _write_onnx(program, x, expected, path)
    elif path is not None:
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(buffer.getvalue()))
    return program


def _pruned_graph(net: Any, t: int, x: torch.Tensor, prune: bool) -> fx.GraphModule:
    bound, args = _bound_inputs(net.model, t, x)
    return Pruner(net.model, t, node_shapes(net.model, args), bound, prune).run()


def _equal_in_float64(net: Any, t: int, x: torch.Tensor, prune: bool) -> bool:
    """Whether a float difference is rounding (fewer terms summed in another order, as in a
    deep network of concatenations): the same pruning of a float64 copy agrees to 1e-9."""
    if not x.is_floating_point():
        return False
    try:
        twin = copy.deepcopy(net).double().eval()
        x64 = x.double()
        with torch.no_grad():
            expected, got = twin(x64, t), _pruned_graph(twin, t, x64, prune)(x64)
    except Exception:  # an op without a float64 kernel: the float check stands
        return False
    return bool(torch.allclose(got, expected, rtol=1e-9, atol=1e-9))


def is_onnx(path: Any) -> bool:
    """Whether ``path`` asks for an ONNX model rather than a ``.pt2`` program."""
    return path is not None and str(path).lower().endswith(".onnx")


def _check_onnx_exporter(path: Any) -> None:
    if is_onnx(path):
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"writing {path} as ONNX needs {' and '.join(missing)}: "
                              "pip install 'hatconvert[onnx]' (or write a .pt2)")


def _write_onnx(program: torch.export.ExportedProgram, x: torch.Tensor,
                expected: torch.Tensor, path: Any) -> None:
    """The program as an ONNX model (batch size free), checked with onnxruntime if installed."""
    from .checkpoint import write_atomic
    size = sum(v.numel() * v.element_size() for v in program.state_dict.values())
    if size >= 2 ** 31:  # protobuf's limit: the weights would go to a file beside it
        raise ExportError(f"{path} would hold {size / 2 ** 30:.1f} GiB of weights, over ONNX's "
                          "2 GiB for one file: write a .pt2 instead")
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    if importlib.util.find_spec("onnxruntime") is not None:
        got = torch.as_tensor(onnx_program(x)[0])
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):  # its own conv kernels
            raise ExportError(f"the ONNX model of {path} differs from the network by "
                              f"{float((got - expected).abs().max()):.3g}: please report the model")
    write_atomic(path, lambda tmp: onnx_program.save(tmp, external_data=False))
