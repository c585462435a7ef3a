"""Which entries of a gated weight the trained tasks use, and how much gradient each keeps.

An entry ``w[o, i]`` is protected by ``min(M_out[o], M_in[i])``. ``Protection`` keeps that as
two factors laid out to broadcast against the weight (two small vectors for a Linear or a dense
convolution) instead of a weight-sized tensor, so that the guard's memory grows with the
protected entries only: the gradient hook rebuilds the rate from the factors at each step, and
the held values are stored compactly (held.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .held import Block, Masked, Positions, rows_of
from .layers import is_cond_conv, uses_weight_as_is
from .registry import layer_spec

__all__ = ["ADJUSTMENTS", "Protection", "protection_of", "weight_protection", "adjustment_rate",
           "rate_hook"]

ADJUSTMENTS = ("hat", "hat_random", "hat_const_alpha", "hat_const_1")


@dataclass
class Protection:
    """``min(a, b)`` (``a`` alone when ``b`` is None) broadcast to ``shape``.

    ``axes``: ``a`` is a vector along ``axes[0]`` and ``b`` one along ``axes[1]``, so the
    protected entries form a block of rows times columns; None when they do not.
    """

    a: torch.Tensor
    b: torch.Tensor | None
    shape: torch.Size
    axes: tuple[int, int | None] | None = None

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in (self.a, self.b) if f is not None)

    def compact(self) -> torch.Tensor:
        """The protection, broadcast only as far as the factors need (not over a kernel)."""
        return self.a if self.b is None else torch.minimum(self.a, self.b)

    def dense(self) -> torch.Tensor:
        return self.compact().expand(self.shape).contiguous()

    def any(self) -> bool:
        return bool((self.a > 0).any()) and (self.b is None or bool((self.b > 0).any())) \
            and bool((self.compact() > 0).any())

    def binary(self) -> bool:
        return all(bool(((f == 0) | (f == 1)).all()) for f in (self.a, self.b) if f is not None)

    def positions(self) -> Positions:
        """Where the protection is above zero."""
        if self.axes is None:
            return Masked(self.compact() > 0)
        row_axis, col_axis = self.axes
        rows = rows_of(self.a > 0)
        if col_axis is None or self.b is None:
            return Block(row_axis, rows)
        cols = rows_of(self.b > 0)
        if cols.numel() == self.shape[col_axis]:
            return Block(row_axis, rows)
        return Block(row_axis, rows, col_axis, cols)


def protection_of(layer: nn.Module, out_mask: torch.Tensor, in_mask: torch.Tensor
                  ) -> tuple[Protection, Protection | None]:
    """The protection of ``layer``'s weight, and of its bias (None without one).

    Handles Linear ``(out, in)``, ConvNd ``(out, in/groups, *k)``, ConvTransposeNd
    ``(in, out/groups, *k)``, grouped and depthwise convolutions, registered layers, and timm's
    CondConv2d, whose weight holds one conv weight per expert ``(experts, out * in/groups * k)``.
    A layer that transforms its weight (weight standardization) has every input counted as used.
    """
    weight = layer.weight
    out_mask = out_mask.to(weight.device, torch.float32)
    in_mask = in_mask.to(weight.device, torch.float32)
    if not uses_weight_as_is(layer):
        in_mask = torch.ones_like(in_mask)
    bias = getattr(layer, "bias", None)
    bias_protection = None
    if isinstance(bias, torch.Tensor):  # units on its last axis (CondConv: one row per expert)
        last = bias.ndim - 1
        bias_protection = Protection(_along(out_mask, bias.ndim, last), None, bias.shape,
                                     (last, None))
    return _weight_factors(layer, weight, out_mask, in_mask), bias_protection


def _weight_factors(layer: nn.Module, weight: torch.Tensor, out_mask: torch.Tensor,
                    in_mask: torch.Tensor) -> Protection:
    shape, ndim = weight.shape, weight.ndim
    if is_cond_conv(layer):
        conv = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        a, b, _ = _conv_factors(conv, layer.groups, out_mask, in_mask)
        flat = (a if b is None else torch.minimum(a, b)).expand(conv).reshape(1, -1)
        return Protection(flat, None, shape)
    spec = layer_spec(layer)
    if spec is not None:  # registered: one axis for units, one for input features
        return Protection(_along(out_mask, ndim, spec.unit_axis),
                          _along(in_mask, ndim, spec.input_axis), shape,
                          (spec.unit_axis, spec.input_axis))
    if isinstance(layer, nn.Linear):
        return Protection(out_mask[:, None], in_mask[None, :], shape, (0, 1))
    if getattr(layer, "transposed", False):  # (in, out/groups, *k)
        groups, in_per, out_per = layer.groups, shape[0] // layer.groups, shape[1]
        if groups == 1:
            return Protection(_along(in_mask, ndim, 0), _along(out_mask, ndim, 1), shape, (0, 1))
        out_by_in = out_mask.view(groups, out_per).repeat_interleave(in_per, dim=0)
        return Protection(_along(in_mask, ndim, 0), out_by_in.view(*shape[:2], *[1] * (ndim - 2)),
                          shape)
    a, b, axes = _conv_factors(tuple(shape), layer.groups, out_mask, in_mask)
    return Protection(a, b, shape, axes)


def _conv_factors(shape: tuple[int, ...], groups: int, out_mask: torch.Tensor,
                  in_mask: torch.Tensor):
    """Factors of ``min(M_out[o], M_in[i])`` for a conv weight ``(out, in/groups, *k)``."""
    ndim, out_per, in_per = len(shape), shape[0] // groups, shape[1]
    if groups == 1:
        return _along(out_mask, ndim, 0), _along(in_mask, ndim, 1), (0, 1)
    in_by_out = in_mask.view(groups, in_per).repeat_interleave(out_per, dim=0)  # (out, in/g)
    if in_per == 1:  # depthwise: one input per unit, so whole rows
        return _along(torch.minimum(out_mask, in_by_out[:, 0]), ndim, 0), None, (0, None)
    return _along(out_mask, ndim, 0), in_by_out.view(*shape[:2], *[1] * (ndim - 2)), None


def _along(vector: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def weight_protection(layer: nn.Module, out_mask: torch.Tensor, in_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``min(M_out[o], M_in[i])`` laid out like the layer's weight, and ``M_out`` for its bias."""
    weight, bias = protection_of(layer, out_mask, in_mask)
    return weight.dense(), None if bias is None else bias.dense()


def adjustment_rate(protect: torch.Tensor, mode: str, alpha: float | None) -> torch.Tensor:
    """How much of the gradient an entry keeps, given how protected it is (AdaHAT's baselines)."""
    if mode == "hat":
        return 1.0 - protect
    if mode == "hat_random":
        return torch.rand_like(protect) * protect + (1.0 - protect)
    if mode == "hat_const_alpha":
        return alpha * protect + (1.0 - protect)
    if mode == "hat_const_1":
        return torch.ones_like(protect)
    raise ValueError(f"unknown adjustment {mode!r}; choose one of {', '.join(ADJUSTMENTS)}")


def rate_hook(protection: Protection, mode: str, alpha: float | None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that scales by the adjustment rate, rebuilt from the factors each step
    (drawn anew for ``hat_random``)."""
    adjustment_rate(protection.a[:0], mode, alpha)  # an unknown mode fails here, not in backward
    a, b = protection.a, protection.b
    if mode in ("hat", "hat_const_alpha") and protection.binary():
        keep = 0.0 if mode == "hat" else float(alpha)  # what a protected entry keeps
        if b is None:  # a bias or a norm's vector: the rate is as small as the factor
            rate = 1.0 - (1.0 - keep) * a
            return lambda grad: grad * rate.to(grad.dtype)
        if 4 * protection.compact().numel() <= protection.shape.numel():
            # the factors' product is much smaller than the weight (a kernel): build it
            def hook(grad: torch.Tensor) -> torch.Tensor:
                return grad * (1.0 - (1.0 - keep) * protection.compact()).to(grad.dtype)
            return hook

        scaled_a = a * -(1.0 - keep)  # two ops per step, none of them on the small factors

        def hook(grad: torch.Tensor) -> torch.Tensor:  # grad - (1 - keep) * grad * a * b
            if grad.dtype != scaled_a.dtype:
                return torch.addcmul(grad, grad * scaled_a.to(grad.dtype), b.to(grad.dtype))
            return torch.addcmul(grad, grad * scaled_a, b)
        return hook

    def hook(grad: torch.Tensor) -> torch.Tensor:
        protect = protection.compact().expand(protection.shape)
        return grad * adjustment_rate(protect, mode, alpha).to(grad.dtype)
    return hook
