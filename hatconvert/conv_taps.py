"""Convolution taps that only ever read padding, cut from an exported program's kernels.

A 7x7 depthwise convolution with padding 3 on a 2x2 or 1x1 feature map (ConvNeXt's last
stages on small images) reads the image with its central 3x3 or 1x1 taps only; the rest meet
the zero padding. The program's spatial sizes are fixed, so those taps can go: the same numbers
(zero terms left out of each sum), and oneDNN's kernels on such tiny maps run up to 200x slower
than on the cut one.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["without_padding_taps"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def without_padding_taps(conv: nn.Module, in_shape: tuple | None) -> nn.Module:
    """``conv`` on inputs of ``in_shape`` (batch dim first) with the taps that read only
    padding cut away; ``conv`` itself where none do or where it is not a plain convolution."""
    if type(conv) not in _CONVS or conv.padding_mode != "zeros" or \
            isinstance(conv.padding, str) or in_shape is None or \
            len(in_shape) != conv.weight.ndim:
        return conv
    spans = [_used_taps(size, k, s, p, d) for size, k, s, p, d in zip(
        in_shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)]
    if all(span is None for span in spans):
        return conv
    spans = [span or (0, k - 1, p) for span, k, p in zip(spans, conv.kernel_size, conv.padding)]
    index = (slice(None), slice(None)) + tuple(slice(lo, hi + 1) for lo, hi, _ in spans)
    weight = conv.weight.detach()[index]
    new = type(conv)(conv.in_channels, conv.out_channels, tuple(weight.shape[2:]), conv.stride,
                     tuple(p for _, _, p in spans), conv.dilation, conv.groups,
                     conv.bias is not None).to(weight.device, weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    return new.train(conv.training)


def _used_taps(size: int, kernel: int, stride: int, padding: int, dilation: int
               ) -> tuple[int, int, int] | None:
    """The first and last tap that reads the input somewhere, and the padding that keeps the
    output the same with only those; None where every tap is used."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        return None
    rows = torch.arange(out)[:, None] * stride - padding + torch.arange(kernel) * dilation
    used = ((rows >= 0) & (rows < size)).any(0).nonzero().squeeze(1)
    if len(used) == 0 or len(used) == kernel:
        return None
    lo, hi = int(used[0]), int(used[-1])
    new_padding = padding - lo * dilation
    span = dilation * (hi - lo)
    if new_padding < 0 or (size + 2 * new_padding - span - 1) // stride + 1 != out:
        return None  # the cut kernel would need uneven padding: keep it whole
    return lo, hi, new_padding
