"""The per-task gate of one layer's output units.

Training with mask scale ``s``: ``a = sigmoid(s * e[t])``; without one: ``m = 1[e[t] > 0]``.
Soft gate values below ``GATE_FLOOR`` are flushed to exactly zero in the forward pass (their
gradient is kept): at large ``s`` the sigmoid yields subnormal floats such as 1e-40, which make
CPU kernels downstream an order of magnitude slower, and no global flush setting is relied on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_INITS = ("normal", "uniform", "U01", "U-10", "dense", "last")

# float32's machine epsilon: a gate this far below an open unit's 1.0 contributes nothing that
# float32 arithmetic downstream can tell from zero, and products of a few such gates stay normal.
GATE_FLOOR = float(torch.finfo(torch.float32).eps)


def init_embedding_(row: torch.Tensor, mode: str, previous: torch.Tensor | None = None) -> None:
    """Fill one task's embedding row in place according to ``mode`` (see ``MASK_INITS``)."""
    with torch.no_grad():
        if mode == "normal":
            row.normal_(0.0, 1.0)
        elif mode == "uniform":
            row.uniform_(-1.0, 1.0)
        elif mode == "U01":
            row.uniform_(0.0, 1.0)
        elif mode == "U-10":
            row.uniform_(-1.0, 0.0)
        elif mode == "dense":
            row.fill_(1.0)
        elif mode == "last":
            if previous is None:
                row.normal_(0.0, 1.0)  # no previous task: the paper's N(0, 1)
            else:
                row.copy_(previous)
        else:
            raise ValueError(f"unknown mask_init {mode!r}; choose one of {', '.join(MASK_INITS)}")


def soft_gate(embedding: torch.Tensor, mask_scale: float | torch.Tensor) -> torch.Tensor:
    """``sigmoid(s * e)`` with values below ``GATE_FLOOR`` flushed to 0 (straight-through grad)."""
    a = torch.sigmoid(embedding * mask_scale)
    # a - a.detach() is exactly 0.0 in the forward pass and passes the gradient through unchanged.
    return torch.where(a < GATE_FLOOR, a - a.detach(), a)


def hard_gate(embedding: torch.Tensor) -> torch.Tensor:
    """``1[e > 0]`` as exactly 0.0 or 1.0."""
    return (embedding > 0).to(embedding.dtype)


class HATGate(nn.Module):
    """Task embeddings of one gated layer and the unit-wise multiplication of its output."""

    def __init__(self, num_tasks: int, units: int, unit_dim: int, mask_init: str = "normal",
                 device: torch.device | None = None):
        super().__init__()
        self.unit_dim = unit_dim
        self.embedding = nn.Parameter(torch.empty(num_tasks, units, device=device))
        for t in range(num_tasks):
            init_embedding_(self.embedding[t], "normal" if mask_init == "last" else mask_init)

    @property
    def units(self) -> int:
        return self.embedding.shape[1]

    def mask(self, task_id: int, mask_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """The gate vector ``(units,)`` of ``task_id``: soft with a mask scale, hard without."""
        e = self.embedding[task_id]
        return hard_gate(e) if mask_scale is None else soft_gate(e, mask_scale)

    def forward(self, x: torch.Tensor, task_id: int,
                mask_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        m = self.mask(task_id, mask_scale).to(x.dtype)
        shape = [1] * x.ndim
        shape[self.unit_dim] = self.units
        return x * m.view(shape)

    def extra_repr(self) -> str:
        return f"tasks={self.embedding.shape[0]}, units={self.units}, unit_dim={self.unit_dim}"


def sigmoid_floor_scale() -> float:
    """Largest ``|s*e|`` below which the soft gate stays above ``GATE_FLOOR`` (for docs/tests)."""
    return math.log(1.0 / GATE_FLOOR - 1.0)
