"""Pruned export: a LayerNorm over compact units, and the gated layers that read it.

A LayerNorm over ``C`` channels that are zero outside the kept units ``K`` needs only ``K``
for its statistics: a closed unit adds nothing to the sum and ``mean²`` to the sum of squares.
It puts out ``(x_K - mean) * r * weight_K + bias_K`` on the kept units and the same affine
function ``s * weight_c + bias_c`` of one number per position, ``s = -mean * r``, on each closed
unit ``c``. A gated Linear or unpadded dense convolution that reads it takes the kept columns,
plus ``s`` times ``W_c @ weight_c`` (a rank-one term, a one-channel convolution for a kernel)
and the constant ``W_c @ bias_c`` in its bias. Neither the norm nor its reader then runs on the
closed units. Any other reader gets the whole output (``closed_units_filled``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .compact import Compact, expand_units
from .gates import gated_layer
from .protected import _along

__all__ = ["NormTail", "NormOps", "compact_layer_norm", "closed_units_filled"]


@dataclass
class NormTail:
    """A LayerNorm's output: ``kept`` its kept units; a closed unit ``c`` is
    ``scale * weight[c] + bias[c]``, ``scale`` a node with one entry along ``kept.dim``;
    ``weight`` and ``bias`` are the norm's, of size ``kept.size``."""

    kept: Compact
    scale: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor
    ndim: int


def compact_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, size: int,
                       eps: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over ``size`` channels along ``dim`` of which ``x`` holds the nonzero ones:
    the kept units' output, and ``scale`` (the closed units' output is ``scale * w + b``)."""
    mean = x.sum(dim, keepdim=True) / size
    centred = x - mean
    closed = size - x.shape[dim]
    var = (centred.square().sum(dim, keepdim=True) + closed * mean.square()) / size
    rstd = torch.rsqrt(var + eps)
    return centred * rstd * weight + bias, -mean * rstd


def closed_units_filled(kept: torch.Tensor, index: torch.Tensor, size: int, dim: int,
                        scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                        ) -> torch.Tensor:
    """The whole LayerNorm output: ``weight`` and ``bias`` are zero on the kept units."""
    return expand_units(kept, index, size, dim) + (scale * weight + bias)


def _channel_dim(norm: nn.Module, ndim: int) -> int | None:
    """The dim a LayerNorm normalizes when it normalizes one dim and is torch's or timm's
    (whose forward is known); else None."""
    if len(getattr(norm, "normalized_shape", ())) != 1:
        return None
    name = f"{type(norm).__module__}.{type(norm).__qualname__}"
    if type(norm) is nn.LayerNorm or name == "timm.layers.norm.LayerNorm":
        return ndim - 1
    if name == "timm.layers.norm.LayerNorm2d" and ndim == 4:
        return 1
    return None


class NormOps:
    """The Pruner's LayerNorm on kept units (its graph, shapes, attributes)."""

    gm: fx.GraphModule
    graph: fx.Graph
    shapes: dict[fx.Node, tuple | None]
    packed_layers: Any

    def norm_on_kept(self, n: fx.Node, norm: nn.Module, x: Any) -> NormTail | None:
        """Task ``t``'s LayerNorm copy ``norm`` on compact ``x``, when every reader of ``n``
        is a gated layer that can take a ``NormTail``; else None (the norm runs whole)."""
        if not isinstance(x, Compact) or x.units is not None or len(n.args) != 1 \
                or n.kwargs.get("gate") is not None or len(x.index) in (0, x.size):
            return None
        ndim = len(self.shapes[n.args[0]])
        if _channel_dim(norm, ndim) != x.dim or not n.users or \
                not all(self._takes_tail(user, n, x.dim, ndim) for user in n.users):
            return None
        weight = norm.weight.detach() if norm.weight is not None else \
            torch.ones(x.size, device=x.index.device)
        bias = norm.bias.detach() if norm.bias is not None else torch.zeros_like(weight)
        kept = (self.attr("norm_weight", _along(weight[x.index], ndim, x.dim)),
                self.attr("norm_bias", _along(bias[x.index], ndim, x.dim)))
        both = self.graph.call_function(compact_layer_norm,
                                        (x.node, *kept, x.size, float(norm.eps), x.dim))
        out = self.graph.call_function(operator.getitem, (both, 0))
        scale = self.graph.call_function(operator.getitem, (both, 1))
        return NormTail(Compact(out, x.dim, x.index, x.size), scale, weight, bias, ndim)

    def _takes_tail(self, user: fx.Node, n: fx.Node, dim: int, ndim: int) -> bool:
        if user.op != "call_function" or user.target is not gated_layer or \
                user.args[0] is not n or n in user.args[1:] or user in self.packed_layers:
            return False
        layer = self.gm.get_submodule(user.args[1].target)
        if type(layer) is nn.Linear:
            return dim == ndim - 1
        return type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and layer.groups == 1 and \
            dim == 1 and all(p == 0 for p in layer.padding) and not isinstance(layer.padding,
                                                                                 str)

    def full_tail(self, tail: NormTail) -> fx.Node:
        """The whole norm output, for a reader that needs it."""
        c = tail.kept
        weight, bias = (_along(v * _closed(c), tail.ndim, c.dim) for v in (tail.weight,
                                                                           tail.bias))
        return self.graph.call_function(closed_units_filled, (
            c.node, self.attr("kept", c.index), c.size, c.dim, tail.scale,
            self.attr("norm_weight", weight), self.attr("norm_bias", bias)))

    def add_rank_one(self, out: fx.Node, new: nn.Module, layer: nn.Module, rows: torch.Tensor,
                     tail: NormTail, zero: torch.Tensor) -> fx.Node:
        """``out`` of ``new`` (``layer``'s rows ``rows`` on the kept columns) plus what the
        closed columns read: a constant, put in ``new``'s bias, and ``scale`` times their sum
        (rows where ``zero`` is True stay zero)."""
        closed = _closed(tail.kept)
        w = layer.weight.detach()[rows][:, closed]  # (R, closed, *kernel)
        spread = [1] * (w.ndim - 2)
        u = (w * tail.weight[closed].reshape(1, -1, *spread)).sum(1, keepdim=True)
        const = (w * tail.bias[closed].reshape(1, -1, *spread)).sum(tuple(range(1, w.ndim)))
        keep = (~zero).to(u.dtype)
        u, const = u * keep.reshape(-1, 1, *spread), const * keep
        with torch.no_grad():
            if new.bias is None:
                new.bias = nn.Parameter(const.clone())
            else:
                new.bias.add_(const)
        if type(layer) is nn.Linear:
            term = self.graph.call_function(operator.mul, (tail.scale, self.attr(
                "rank_one", u.reshape(-1))))
        elif all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride):
            term = self.graph.call_function(operator.mul, (tail.scale, self.attr(
                "rank_one", u.reshape(1, -1, *spread))))
        else:
            one = type(layer)(1, len(rows), layer.kernel_size, layer.stride, 0, layer.dilation,
                              bias=False).to(u.device, u.dtype)
            with torch.no_grad():
                one.weight.copy_(u)
            term = self.graph.call_module(self._module_name("rank_one", one.eval()),
                                          (tail.scale,))
        return self.graph.call_function(operator.add, (out, term))


def _closed(c: Compact) -> torch.Tensor:
    closed = torch.ones(c.size, dtype=torch.bool, device=c.index.device)
    closed[c.index] = False
    return closed
