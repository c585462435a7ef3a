"""Packed attention in the pruned export: each head runs on the dims the task leaves it.

For an attention that ``attention_plan`` finds, the gated q, k and v layers put out only the
rows of their kept heads and packed dims (one Linear per third of a fused ``qkv``; a dim kept
only so that every head has as many is a zero row), in the order ``(heads, dims)``. The split
into heads, the moves and the attention then run on those packed tensors, with the softmax
scale of the full head dim; merging the heads back gives the value's kept units, which the next
gated layer reads as input columns. A packed tensor read by anything else is unpacked first
(``unpack_heads``), closed units zero.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .attention_plan import (MOVES, RESHAPES, UNBINDS, AttentionPlan, Part, is_op,
                             permutation, reshape_sizes)
from .compact import Compact
from .errors import ExportError

__all__ = ["PackedOps", "unpack_heads", "attend"]


@dataclass
class Packed:
    """q, k, v or an attention output: ``ndim`` dims, the kept heads at ``head_pos``, the
    packed dims last."""

    node: fx.Node
    part: Part
    head_pos: int
    ndim: int


@dataclass
class Grouped:
    """A fused qkv split into ``(groups, heads, dims)``: one packed tensor per group."""

    parts: dict[int, Packed]
    group_pos: int
    ndim: int

    @property
    def groups(self) -> int:
        return next(iter(self.parts.values())).part.groups


@dataclass
class Rows:
    """A planned layer's output: per group, the packed rows ``(..., kept * dims)``."""

    nodes: dict[int | None, fx.Node]
    parts: dict[int | None, Part]


def unpack_heads(x: torch.Tensor, index: torch.Tensor, heads: int, head_dim: int,
                 head_pos: int) -> torch.Tensor:
    """The whole tensor of a packed one: entry ``index`` of ``heads * head_dim``, zeros
    elsewhere, heads back at ``head_pos``."""
    flat = x.movedim(head_pos, -2).flatten(-2)
    out = flat.new_zeros(flat.shape[:-1] + (heads * head_dim,)).index_copy_(-1, index, flat)
    return out.unflatten(-1, (heads, head_dim)).movedim(-2, head_pos)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention without a mask written out: with query/key dims narrower than the value's,
    ``F.scaled_dot_product_attention`` leaves its fused CPU kernel for a slower general one."""
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def _values(a: Any) -> Iterator[Any]:
    if isinstance(a, (tuple, list)):
        for v in a:
            yield from _values(v)
    elif isinstance(a, dict):
        for v in a.values():
            yield from _values(v)
    else:
        yield a


class PackedOps:
    """The packed attention ops of the Pruner (its graph, env, shapes and attrs)."""

    graph: fx.Graph
    gm: fx.GraphModule
    shapes: dict[fx.Node, tuple | None]
    env: dict[fx.Node, Any]

    def set_plans(self, plans: list[AttentionPlan]) -> None:
        self.packed_layers: dict[fx.Node, dict[int | None, Part]] = {}
        self.packed_path: set[fx.Node] = set()
        for plan in plans:
            for part in plan.parts:
                self.packed_layers.setdefault(part.layer, {})[part.group] = part
            self.packed_path |= plan.path | {plan.sdpa}

    def takes_packed(self, n: fx.Node) -> bool:
        """Whether ``n`` is on a packed attention's path or reads a packed tensor."""
        if n in self.packed_path:
            return True
        return any(isinstance(v, (Packed, Grouped, Rows))
                   for a in n.all_input_nodes for v in _values(self.env.get(a)))

    def packed_layer(self, n: fx.Node, layer: nn.Module, x: Any) -> Rows:
        """A planned q, k, v (or fused qkv) layer: per group, its packed rows."""
        inp, cols = self.layer_input(n, layer, x)
        nodes, parts = {}, self.packed_layers[n]
        for group, part in sorted(parts.items(), key=lambda kv: kv[0] or 0):
            # a dim kept only to give every head as many is a zero row
            new = self.new_layer(layer, part.rows(), cols, zero=~part.live.flatten())
            nodes[group] = self.graph.call_module(self._module_name(n.args[1].target, new),
                                                  (inp,))
        return Rows(nodes, parts)

    def packed_node(self, n: fx.Node) -> Any:
        """``n`` on packed tensors: split, moved, attended or merged; else unpacked."""
        args = self.arg(n.args)
        first = args[0] if args else None
        if isinstance(first, Rows):
            return self._packed_split(n, first)
        if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.Identity) \
                or is_op(n, ("contiguous",)) and len(args) == 1:
            if isinstance(first, (Packed, Grouped)):
                return first
        if n.target is operator.getitem and isinstance(n.args[1], int):
            if isinstance(first, tuple):
                return first[n.args[1]]
            if isinstance(first, Grouped) and first.group_pos == 0:
                return first.parts.get(n.args[1] % first.groups)
        if is_op(n, UNBINDS) and isinstance(first, Grouped):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            if dim % first.ndim == first.group_pos:
                return tuple(first.parts.get(g) for g in range(first.groups))
        if is_op(n, MOVES) and not n.kwargs and isinstance(first, (Packed, Grouped)):
            moved = self._packed_moved(n, first)
            if moved is not None:
                return moved
        if n.target is F.scaled_dot_product_attention and \
                all(isinstance(a, Packed) for a in args[:3]):
            return self._packed_attention(n, args)
        if is_op(n, RESHAPES) and isinstance(first, Packed) and not n.kwargs:
            merged = self._packed_merged(n, first)
            if merged is not None:
                return merged
        if any(isinstance(v, (Grouped, Rows)) for v in _values(args)):
            raise ExportError(f"graph node '{n.name}' reads a packed attention input it cannot "
                              "take: please report the model")
        return self.copy_node(n)

    def unpack(self, p: Packed) -> fx.Node:
        index = (p.part.kept[:, None] * p.part.head_dim + p.part.dims).flatten()
        return self.graph.call_function(unpack_heads, (
            p.node, self.attr("kept", index), p.part.heads, p.part.head_dim, p.head_pos))

    def _packed_split(self, n: fx.Node, rows: Rows) -> Any:
        before = self.shapes[n.args[0]]
        sizes = reshape_sizes(n)
        lead = [self.arg(s) for s in sizes[:len(before) - 1]]
        packed = {}
        for group, node in rows.nodes.items():
            part = rows.parts[group]
            out = self.graph.create_node(n.op, n.target,
                                         (node, *lead, len(part.kept), part.dims.shape[1]))
            packed[group] = Packed(out, part, len(before) - 1, len(before) + 1)
        if None in packed:
            return packed[None]
        return Grouped(packed, len(before) - 1, len(before) + 2)

    def _packed_moved(self, n: fx.Node, x: Packed | Grouped) -> Any:
        dims = permutation(n, x.ndim)
        if dims is None:
            return None
        if isinstance(x, Packed):
            if dims[-1] != x.ndim - 1:
                return None
            out = self.graph.call_method("permute", (x.node, *dims))
            return Packed(out, x.part, dims.index(x.head_pos), x.ndim)
        g = x.group_pos
        inner = [d - (d > g) for d in dims if d != g]
        parts = {}
        for group, p in x.parts.items():
            out = self.graph.call_method("permute", (p.node, *inner))
            parts[group] = Packed(out, p.part, inner.index(p.head_pos), p.ndim)
        return Grouped(parts, dims.index(g), x.ndim)

    def _packed_attention(self, n: fx.Node, args: Any) -> Packed:
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        kwargs = {**dict(zip(names, args[3:])), **self.full(self.arg(dict(n.kwargs)))}
        kwargs = {k: self.full(v) for k, v in kwargs.items()}
        q, k, v = args[:3]
        if kwargs.get("scale") is None:  # the full head dim's, not the packed one's
            kwargs["scale"] = 1 / math.sqrt(q.part.head_dim)
        if kwargs.get("attn_mask") is None and not kwargs.get("is_causal"):
            out = self.graph.call_function(attend, (q.node, k.node, v.node, kwargs["scale"]))
        else:
            out = self.graph.call_function(F.scaled_dot_product_attention,
                                           (q.node, k.node, v.node), kwargs)
        return Packed(out, v.part, v.head_pos, v.ndim)

    def _packed_merged(self, n: fx.Node, p: Packed) -> Compact | None:
        """``(..., heads, dims)`` merged into ``heads * head_dim`` units: the value's kept."""
        before, after = self.shapes.get(n.args[0]), self.shapes.get(n)
        sizes = reshape_sizes(n)
        width = p.part.heads * p.part.head_dim
        if before is None or after is None or p.head_pos != p.ndim - 2 or \
                tuple(after) != tuple(before[:-2]) + (width,) or len(sizes) != len(after) or \
                sizes[-1] not in (-1, width):
            return None
        index = (p.part.kept[:, None] * p.part.head_dim + p.part.dims).flatten()
        out = self.graph.create_node(n.op, n.target, (p.node, *[self.arg(s) for s in sizes[:-1]],
                                                      len(index)))
        return Compact(out, len(after) - 1, index, width)
