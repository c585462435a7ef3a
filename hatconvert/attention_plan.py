"""Which attention dims a task's pruned program can drop: a graph analysis over the HAT graph.

``softmax(q k^T) v`` reads a query unit only through its product with the key unit of the same
head and dim: where a task closes either, the term is zero whatever the other holds. So a head
needs only the query/key dims where both are open, and the value dims that are open; a head
whose value is closed puts out zero. That holds only where q, k and v reach
``F.scaled_dot_product_attention`` from gated Linear layers through nothing but a split into
heads and moves (permutes, transposes, ``unbind``, indexing a fused ``qkv``, identities), with
nothing else reading them; this module finds such attentions and what each keeps.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .gates import closed_rows_zeroed, gated_layer

__all__ = ["Part", "AttentionPlan", "plan_attention", "is_op", "permutation", "reshape_sizes",
           "MOVES", "UNBINDS", "RESHAPES"]

MOVES = ("permute", "transpose", torch.permute, torch.transpose)
UNBINDS = ("unbind", torch.unbind)
RESHAPES = ("reshape", "view")


def is_op(n: Any, targets: tuple) -> bool:
    """Whether ``n`` calls one of ``targets`` (a method name or a function), not a module."""
    return isinstance(n, fx.Node) and n.op in ("call_method", "call_function") and \
        n.target in targets


@dataclass
class Part:
    """One of q, k, v: rows of a gated Linear split into ``(heads, head_dim)``, the heads
    ``kept`` and per kept head the dims ``dims`` (sorted; ``live`` False where the entry is a
    zero kept only to give every head as many dims)."""

    layer: fx.Node  # the gated layer node
    group: int | None  # which third of a fused qkv (None: a layer of its own)
    groups: int
    heads: int
    head_dim: int
    kept: torch.Tensor
    dims: torch.Tensor
    live: torch.Tensor

    def rows(self) -> torch.Tensor:
        """The layer's output units of this part, in the packed order."""
        start = (self.group or 0) * self.heads * self.head_dim
        return (start + self.kept[:, None] * self.head_dim + self.dims).flatten()


@dataclass
class AttentionPlan:
    """One attention whose q, k, v are packed; ``path`` holds every node from the layers to it."""

    sdpa: fx.Node
    parts: tuple[Part, Part, Part]
    path: set[fx.Node]


def plan_attention(gm: fx.GraphModule, masks: dict[fx.Node, torch.Tensor],
                   shapes: dict[fx.Node, tuple | None]) -> list[AttentionPlan]:
    """The attentions of ``gm`` that can run packed, given each gated layer node's open units."""
    plans = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            plan = _plan(gm, n, masks, shapes)
            if plan is not None:
                plans.append(plan)
    return plans


def _plan(gm: fx.GraphModule, sdpa: fx.Node, masks: dict[fx.Node, torch.Tensor],
          shapes: dict[fx.Node, tuple | None]) -> AttentionPlan | None:
    if not _plain_call(sdpa, shapes):
        return None
    traced = [_trace(gm, a, shapes) for a in sdpa.args[:3]]
    if any(t is None for t in traced) or any(t[0] not in masks for t in traced):
        return None
    layouts = {(t[2], t[3], t[4]) for t in traced}  # (heads, head_dim, where the heads are)
    if len(layouts) != 1:
        return None
    heads, head_dim, _ = layouts.pop()
    if len({(t[0], t[1]) for t in traced}) != 3:
        return None  # one tensor as two of q, k, v
    path = set().union(*(t[5] for t in traced))
    if any(u not in path and u is not sdpa for p in path for u in p.users):
        return None  # something else reads q, k or v: their values must stay as they are
    opened = [masks[t[0]].reshape(-1, heads, head_dim)[t[1] or 0] for t in traced]
    live_qk, live_v = opened[0] & opened[1], opened[2]
    kept = live_v.any(1).nonzero().squeeze(1)
    if len(kept) == 0:
        return None
    parts = []
    for (layer, group, *_), live in zip(traced, (live_qk, live_qk, live_v)):
        groups = masks[layer].numel() // (heads * head_dim)
        dims, flags = _packed_dims(live[kept])
        parts.append(Part(layer, group, groups, heads, head_dim, kept, dims, flags))
    return AttentionPlan(sdpa, tuple(parts), path)


def _packed_dims(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head (row of ``live``) its live dims and, to give each head as many, some dead ones:
    sorted dims and which of them are live."""
    width = max(1, int(live.sum(1).max()))
    order = torch.argsort((~live).long() * live.shape[1] + torch.arange(live.shape[1]), dim=1)
    dims = order[:, :width].sort(dim=1).values
    return dims, live.gather(1, dims)


def _plain_call(sdpa: fx.Node, shapes: dict[fx.Node, tuple | None]) -> bool:
    """No dropout, no grouped-query heads, and no mask with a head dim to select from."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    given = {**dict(zip(names, sdpa.args)), **sdpa.kwargs}
    if len(sdpa.args) < 3 or given.get("dropout_p", 0.0) != 0.0 or given.get("enable_gqa"):
        return False
    if any(isinstance(given.get(k), fx.Node) for k in ("dropout_p", "is_causal", "scale")):
        return False
    mask, out = given.get("attn_mask"), shapes.get(sdpa)
    if mask is None:
        return True
    mask_shape = shapes.get(mask) if isinstance(mask, fx.Node) else None
    if mask_shape is None or out is None or len(out) < 3:
        return False
    at = len(out) - 3 - (len(out) - len(mask_shape))  # the heads sit just before (L, E)
    return at < 0 or mask_shape[at] == 1


def _trace(gm: fx.GraphModule, arg: fx.Node, shapes: dict[fx.Node, tuple | None]):
    """From an attention input back to the gated Linear it was split from: ``(layer node,
    group, heads, head_dim, heads' dim at the attention, path)``, or None."""
    path, moves, n = [], [], arg
    while isinstance(n, fx.Node):
        path.append(n)
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Identity) or \
                is_op(n, ("contiguous",)) and len(n.args) == 1:
            n = n.args[0]
        elif is_op(n, MOVES) and not n.kwargs:
            moves.append(n)
            n = n.args[0]
        elif n.target is operator.getitem and isinstance(n.args[1], int):
            source = n.args[0]
            if is_op(source, UNBINDS):
                path.append(source)
                moves.append(n)
                n = source.args[0]
            elif shapes.get(source) is not None:  # qkv[0]
                moves.append(n)
                n = source
            else:
                return None
        elif is_op(n, RESHAPES) and not n.kwargs:
            return _from_split(gm, n, moves[::-1], path, shapes)
        else:
            return None
    return None


def _from_split(gm: fx.GraphModule, split: fx.Node, moves: list[fx.Node], path: list[fx.Node],
                shapes: dict[fx.Node, tuple | None]):
    layer = split.args[0]
    before, after = shapes.get(layer), shapes.get(split)
    if not isinstance(layer, fx.Node) or layer.target not in (gated_layer, closed_rows_zeroed) \
            or type(gm.get_submodule(layer.args[1].target)) is not nn.Linear \
            or before is None or after is None or len(after) - len(before) not in (1, 2) \
            or tuple(after[:len(before) - 1]) != tuple(before[:-1]) \
            or math.prod(after[len(before) - 1:]) != before[-1]:
        return None
    sizes = reshape_sizes(split)
    if len(sizes) != len(after) or not all(isinstance(s, int) and (s > 0 or s == -1)
                                          for s in sizes[len(before) - 1:]):
        return None  # the heads and their dims given as numbers (the packed ones replace them)
    grouped = len(after) == len(before) + 2
    origin = list(range(len(after)))  # each dim: which dim of the split it is
    group = None
    for m in moves:
        if m.target is operator.getitem:
            unbind = m.args[0] if is_op(m.args[0], UNBINDS) else None
            dim = 0 if unbind is None else (unbind.args[1] if len(unbind.args) > 1
                                            else unbind.kwargs.get("dim", 0))
            if not isinstance(dim, int) or group is not None or not grouped or \
                    origin[dim % len(origin)] != len(before) - 1:
                return None
            group = m.args[1] % after[len(before) - 1]
            del origin[dim % len(origin)]
        else:
            dims = permutation(m, len(origin))
            if dims is None:
                return None
            origin = [origin[d] for d in dims]
    if grouped and group is None or origin[-1] != len(after) - 1 or \
            len(origin) < 4 or origin[-3] != len(after) - 2:
        return None  # the head dim last, the heads where attention batches them
    return layer, group, after[-2], after[-1], len(origin) - 3, path + [split, layer]


def reshape_sizes(n: fx.Node) -> list[Any]:
    """The sizes a ``reshape``/``view`` asks for, given one by one or as one sequence."""
    sizes = list(n.args[1:] if n.op == "call_method" else n.args[1:2])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return sizes


def permutation(n: fx.Node, ndim: int) -> list[int] | None:
    """The dims a permute or transpose of an ``ndim`` tensor takes each of its dims from."""
    args = n.args[1:]
    if n.target in ("transpose", torch.transpose):
        if len(args) != 2 or not all(isinstance(a, int) for a in args):
            return None
        a, b = (d % ndim for d in args)
        dims = list(range(ndim))
        dims[a], dims[b] = b, a
        return dims
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    if len(args) != ndim or not all(isinstance(a, int) for a in args):
        return None
    return [a % ndim for a in args]
