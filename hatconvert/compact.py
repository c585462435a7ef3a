"""A tensor of which only some units are kept: what the pruned export passes between ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["Compact", "expand_units"]


@dataclass
class Compact:
    """A tensor of which only the units ``index`` (along ``dim``, of ``size``) are kept; the
    others are zero. ``units``, where known (heads split from a layer's units), broadcasts to
    the full tensor and is False where an entry of a kept unit is zero as well."""

    node: fx.Node
    dim: int
    index: torch.Tensor
    size: int
    units: torch.Tensor | None = None


def expand_units(compact: torch.Tensor, index: torch.Tensor, size: int, dim: int
                 ) -> torch.Tensor:
    """The full tensor: ``compact`` at positions ``index`` of ``dim``, zeros elsewhere."""
    shape = list(compact.shape)
    shape[dim] = size
    return compact.new_zeros(shape).index_add_(dim, index, compact)  # faster than index_copy
