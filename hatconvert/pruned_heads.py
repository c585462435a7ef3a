"""Attention heads in the pruned export: a head whose value a task closes is removed.

A layer's output split into heads (``reshape(B, N, [3,] H, D)``) becomes a tensor *compact
along the head dim*: only the heads with a unit open, the closed units of those heads zero,
with a record of which entries may be nonzero. It stays compact through permutes, transposes
and ``unbind``; ``F.scaled_dot_product_attention`` then runs only on the heads whose value has
a unit open (a zero value puts out zero, whatever the query and key attend to), and merging the
heads back (``reshape(B, N, C)``) gives the kept heads' units of ``C``, which the next gated
layer reads as input columns. Anything else gets the full tensor back, as in pruned.py.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .attention_plan import reshape_sizes
from .compact import Compact, expand_units

__all__ = ["HeadOps"]

_RESHAPES = ("reshape", "view", torch.reshape)


class HeadOps:
    """The head-structured ops of ``_KeptUnits`` (the Pruner's graph, shapes and env)."""

    graph: fx.Graph
    shapes: dict[fx.Node, tuple | None]
    env: dict[fx.Node, Any]

    def head_op(self, n: fx.Node, args: Any, c: Compact) -> Any:
        """``n`` on compact ``c`` when ``n`` splits, moves or merges heads; else None."""
        if n.target in _RESHAPES and args[0] is c and not n.kwargs:
            return self._split_heads(n, c) or self._merge_heads(n, c)
        if n.target in ("transpose", torch.transpose) and args[0] is c and not n.kwargs:
            return self._transposed(n, c)
        if n.target in ("unbind", torch.unbind) and args[0] is c:
            return self._unbound(n, c)
        if n.target is F.scaled_dot_product_attention:
            return self._attention(n, args)
        return None

    def item_of(self, n: fx.Node) -> Any:
        """``unbind(...)[i]`` of compact tensors: the compact item; else None."""
        if n.target is not operator.getitem or not isinstance(n.args[1], int):
            return None
        items = self.env.get(n.args[0])
        if isinstance(items, tuple) and any(isinstance(i, Compact) for i in items):
            return items[n.args[1]]
        return None

    # -- reshapes -------------------------------------------------------------------------------
    def _split_heads(self, n: fx.Node, c: Compact) -> Compact | None:
        """Units ``(..., h, d)`` of the last dim split into heads: only heads with a unit open."""
        before, after = self.shapes.get(n.args[0]), self.shapes.get(n)
        sizes = reshape_sizes(n)
        if before is None or after is None or c.dim != len(before) - 1 or \
                len(after) < len(before) + 1 or tuple(after[:c.dim]) != tuple(before[:c.dim]) or \
                math.prod(after[c.dim:]) != c.size or len(sizes) != len(after) or \
                not all(isinstance(v, int) for v in sizes[c.dim:]):  # -1 or a size
            return None
        heads, head_dim = after[-2], after[-1]
        head_of = (torch.arange(c.size) // head_dim) % heads
        kept = torch.unique(head_of[c.index])  # all of them, maybe: attention may drop more
        units = torch.isin(head_of, kept).nonzero().squeeze(1)  # every unit of a kept head
        x = c.node
        if len(units) != len(c.index):
            x = self.graph.call_function(expand_units, (
                x, self.attr("kept", torch.searchsorted(units, c.index)), len(units), c.dim))
        sizes = [self.arg(v) for v in sizes[:c.dim]] + list(after[c.dim:-2]) + [len(kept),
                                                                                  head_dim]
        out = self.graph.create_node(n.op, n.target, (x, *sizes))
        open_units = torch.zeros(c.size, dtype=torch.bool)
        open_units[c.index] = True
        open_units = open_units.reshape((1,) * c.dim + tuple(after[c.dim:]))
        return Compact(out, len(after) - 2, kept, heads, open_units)

    def _merge_heads(self, n: fx.Node, c: Compact) -> Compact | None:
        """``(..., H, D)`` merged into ``H * D`` units: the kept heads' units."""
        before, after = self.shapes.get(n.args[0]), self.shapes.get(n)
        sizes = reshape_sizes(n)
        if before is None or after is None or c.dim != len(before) - 2 or \
                len(after) != len(before) - 1 or tuple(after[:-1]) != tuple(before[:-2]) or \
                after[-1] != c.size * before[-1] or len(sizes) != len(after) or \
                sizes[-1] not in (-1, after[-1]):
            return None
        head_dim = before[-1]
        units = (c.index[:, None] * head_dim + torch.arange(head_dim)).flatten()
        sizes = [self.arg(v) for v in sizes[:-1]] + [len(units)]
        out = self.graph.create_node(n.op, n.target, (c.node, *sizes))
        return Compact(out, len(after) - 1, units, after[-1])

    # -- moves ----------------------------------------------------------------------------------
    def _transposed(self, n: fx.Node, c: Compact) -> Compact | None:
        ndim = len(self.shapes[n])
        dims = list(n.args[1:3])
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
            return None
        a, b = (d % ndim for d in dims)
        out = self.graph.create_node(n.op, n.target, (c.node, *n.args[1:3]))
        units = None if c.units is None else c.units.transpose(a, b)
        return Compact(out, b if c.dim == a else a if c.dim == b else c.dim, c.index, c.size,
                       units)

    def _unbound(self, n: fx.Node, c: Compact) -> tuple | None:
        shape = self.shapes.get(n.args[0])
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if shape is None or not isinstance(dim, int) or dim % len(shape) == c.dim:
            return None
        dim %= len(shape)
        out = self.graph.create_node(n.op, n.target, (c.node, dim))
        moved = c.dim - 1 if c.dim > dim else c.dim
        units = [None] * shape[dim] if c.units is None else [
            c.units.select(dim, i if c.units.shape[dim] > 1 else 0) for i in range(shape[dim])]
        return tuple(Compact(self.graph.call_function(operator.getitem, (out, i)), moved,
                             c.index, c.size, units[i]) for i in range(shape[dim]))

    # -- attention ------------------------------------------------------------------------------
    def _attention(self, n: fx.Node, args: Any) -> Compact | None:
        """A value compact on a head dim (not the last two), the query and key compact on it
        too or whole: attention over the heads whose value has a unit open."""
        kwargs = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:]))
        kwargs.update(self.arg(dict(n.kwargs)))
        qkv = args[:3]
        if len(qkv) != 3 or not isinstance(qkv[2], Compact) or \
                kwargs.get("dropout_p", 0.0) != 0.0 or kwargs.get("enable_gqa", False):
            return None
        dim, size = qkv[2].dim, qkv[2].size
        ndim = len(self.shapes[n])
        for a, old in zip(qkv[:2], n.args[:2]):  # a query or key normed per head comes whole
            if (a.dim, a.size) != (dim, size) if isinstance(a, Compact) else \
                    not isinstance(a, fx.Node) or \
                    (self.shapes.get(old) or ())[dim:dim + 1] != (size,):
                return None
        mask = kwargs.get("attn_mask")
        if dim >= ndim - 2 or isinstance(mask, Compact) or isinstance(mask, fx.Node) and \
                self._head_sized(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3
                                              else None), dim, ndim):
            return None
        kept = self._open_heads(qkv[2])  # a zero value head puts out zero, whatever it attends
        if len(kept) == 0 or len(kept) == size and all(isinstance(a, fx.Node) or
                                                        len(a.index) == size for a in qkv):
            return None
        inputs = [self._heads_to(a, kept, dim) for a in qkv]
        out = self.graph.call_function(F.scaled_dot_product_attention, tuple(inputs), kwargs)
        return Compact(out, dim, kept, size)

    def _open_heads(self, c: Compact) -> torch.Tensor:
        """The kept heads of ``c`` that have an entry that may be nonzero."""
        if c.units is None:
            return c.index
        others = [d for d in range(c.units.ndim) if d != c.dim]
        has_open = c.units.any(dim=others) if others else c.units
        return c.index[has_open[c.index]]

    def _heads_to(self, c: Any, kept: torch.Tensor, dim: int) -> fx.Node:
        """``c`` on the heads ``kept`` (along ``dim``): those it lacks zero, those not kept
        left out."""
        if not isinstance(c, Compact):
            return self.graph.call_method("index_select", (c, dim, self.attr("heads", kept)))
        x, have = c.node, c.index
        if not bool(torch.isin(have, kept).all()):
            inside = torch.isin(have, kept).nonzero().squeeze(1)
            x = self.graph.call_method("index_select", (x, c.dim, self.attr("heads", inside)))
            have = have[inside]
        if torch.equal(have, kept):
            return x
        return self.graph.call_function(expand_units, (
            x, self.attr("kept", torch.searchsorted(kept, have)), len(kept), c.dim))

    def _head_sized(self, mask: Any, dim: int, ndim: int) -> bool:
        """Whether an attention mask has a head dim to select from (then left whole)."""
        shape = self.shapes.get(mask) if isinstance(mask, fx.Node) else None
        if shape is None:
            return True
        at = dim - (ndim - len(shape))
        return at >= 0 and shape[at] != 1
