"""Keeping chosen entries of a tensor at their values from ``begin_task``, in memory that
grows with the entries kept, not with the tensor.

A gated weight's protected entries are ``{(o, i): M_out[o] and M_in[i]}``: for a Linear, a
dense or depthwise convolution and most registered layers a block, the rows of the used units
times the columns of the used inputs. ``Block`` keeps only that block's values and its two
index vectors; ``Masked`` (grouped convolutions, CondConv) keeps the values and a boolean mask
broadcast over the kernel; ``Whole`` keeps a clone. ``Held.restore`` puts them back after every
optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Block", "Masked", "Whole", "Positions", "Held", "hold", "rows_of"]


@dataclass
class Whole:
    """Every entry."""

    def take(self, data: torch.Tensor) -> torch.Tensor:
        return data.clone()

    def put(self, data: torch.Tensor, values: torch.Tensor) -> None:
        data.copy_(values)

    def nbytes(self) -> int:
        return 0


@dataclass
class Block:
    """Entries at ``rows`` along ``row_axis`` times ``cols`` along ``col_axis`` (all of that
    axis when ``cols`` is None); the other axes whole."""

    row_axis: int
    rows: torch.Tensor
    col_axis: int | None = None
    cols: torch.Tensor | None = None

    def take(self, data: torch.Tensor) -> torch.Tensor:
        values = data.index_select(self.row_axis, self.rows)
        return values if self.cols is None else values.index_select(self.col_axis, self.cols)

    def put(self, data: torch.Tensor, values: torch.Tensor) -> None:
        if self.cols is not None:  # write the columns into the present rows, then the rows
            values = data.index_select(self.row_axis, self.rows).index_copy_(
                self.col_axis, self.cols, values)
        data.index_copy_(self.row_axis, self.rows, values)

    def nbytes(self) -> int:
        return _nbytes(self.rows) + (0 if self.cols is None else _nbytes(self.cols))


@dataclass
class Masked:
    """Entries where ``mask`` (broadcast to the tensor's shape) is True."""

    mask: torch.Tensor

    def take(self, data: torch.Tensor) -> torch.Tensor:
        return torch.masked_select(data, self.mask)

    def put(self, data: torch.Tensor, values: torch.Tensor) -> None:
        data.masked_scatter_(self.mask, values)

    def nbytes(self) -> int:
        return _nbytes(self.mask)


Positions = Whole | Block | Masked


@dataclass
class Held:
    """``tensor``'s entries at ``positions``, kept at the values in ``reference``."""

    tensor: torch.Tensor
    reference: torch.Tensor
    positions: Positions

    def restore(self) -> None:
        """Put the held entries back."""
        data = self.tensor.data if isinstance(self.tensor, nn.Parameter) else self.tensor
        self.positions.put(data, self.reference)

    def nbytes(self) -> int:
        """Memory this holds beyond the tensor itself: the values and their positions."""
        return _nbytes(self.reference) + self.positions.nbytes()


def hold(tensor: torch.Tensor, positions: Positions | None = None) -> Held | None:
    """Keep ``tensor`` at ``positions`` (every entry if None) at its present value; None if
    the positions hold nothing."""
    positions = Whole() if positions is None else positions
    reference = positions.take(tensor.detach())
    if reference.numel() == 0:
        return None
    return Held(tensor, reference, positions)


def rows_of(mask: torch.Tensor) -> torch.Tensor:
    """The indices where a boolean (or 0/1) vector is set."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
