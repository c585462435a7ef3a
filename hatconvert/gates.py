"""The per-task gate of one layer's output units.

Training with mask scale ``s``: ``a = sigmoid(s * e[t])``; without one: ``m = 1[e[t] > 0]``.
Soft gate values below ``GATE_FLOOR`` are flushed to exactly zero in the forward pass (their
gradient is kept): at large ``s`` the sigmoid yields subnormal floats such as 1e-40, which make
CPU kernels downstream an order of magnitude slower, and no global flush setting is relied on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .options import DEFAULT_MASK_INIT, MASK_INITS, check_choice

__all__ = ['GATE_FLOOR', 'SMALL_NORMAL_STD', 'init_embedding_', 'soft_gate',
           'straight_through', 'hard_gate', 'HATGate', 'can_fold_into_weight',
           'can_fold_into_norm', 'apply_gate', 'scale_rows', 'gated_layer', 'gated_batch_norm']


# float32's machine epsilon: a gate this far below an open unit's 1.0 contributes nothing that
# float32 arithmetic downstream can tell from zero, and products of a few such gates stay normal.
GATE_FLOOR = float(torch.finfo(torch.float32).eps)

# ``small_normal``'s spread (the default init). Adaptive optimizers (Adam, AdamW, RMSprop) move
# an embedding by about the learning rate per step whatever its gradient, so embeddings drawn
# from N(0, 1) keep the sign they were drawn with for hundreds of steps: a task opened about half
# of every layer because of the draw. From N(0, 0.05^2) a few dozen steps decide each sign, so the
# task's loss and the sparsity penalty choose the units. Without the penalty's floor
# (``penalty.KEEP_OPEN``) small draws let it shut a whole layer whose scale a norm behind it hides
# from the loss. Narrower draws (0.02) keep more capacity on short tasks but left some tasks
# unlearnt on split MNIST (benchmarks/continual_digits.py --study and continual.py).
SMALL_NORMAL_STD = 0.05


def init_embedding_(row: torch.Tensor, mode: str, previous: torch.Tensor | None = None) -> None:
    """Fill one task's embedding row in place according to ``mode`` (see ``MASK_INITS``)."""
    with torch.no_grad():
        if mode == "small_normal":
            row.normal_(0.0, SMALL_NORMAL_STD)
        elif mode == "normal":
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
                init_embedding_(row, DEFAULT_MASK_INIT)  # no previous task
            else:
                row.copy_(previous)
        else:
            check_choice("mask_init", mode, MASK_INITS)


def soft_gate(embedding: torch.Tensor, mask_scale: float | torch.Tensor) -> torch.Tensor:
    """``sigmoid(s * e)`` with values below ``GATE_FLOOR`` flushed to 0 (straight-through grad)."""
    a = torch.sigmoid(embedding * mask_scale)
    # a - a.detach() is exactly 0.0 in the forward pass and passes the gradient through unchanged.
    return torch.where(a < GATE_FLOOR, a - a.detach(), a)


def straight_through(embedding: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The exact 0/1 mask ``e > 0`` in the forward pass, ``soft``'s gradient in the backward
    pass. Late in a task's schedule this trains the weights behind the very mask inference
    will apply: an embedding that ends just below 0 would otherwise have trained its unit at
    close to half strength and then be cut from it."""
    return (embedding > 0).to(soft.dtype) + (soft - soft.detach())


def hard_gate(embedding: torch.Tensor) -> torch.Tensor:
    """``e > 0`` as a bool tensor: applied with ``torch.where``, not multiplied, so that a closed
    unit gives exactly 0 even where a later task's free weights hold NaN or inf (``0 * nan``
    would be NaN)."""
    return embedding > 0


class HATGate(nn.Module):
    """Task embeddings ``(num_tasks, units)`` of one gated layer; ``forward`` gives the gate."""

    def __init__(self, num_tasks: int, units: int, mask_init: str = DEFAULT_MASK_INIT,
                 device: torch.device | None = None):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(num_tasks, units, device=device))
        # binary mask m[t] stored when task t ends (rows of untrained tasks stay 0)
        self.register_buffer("task_masks", torch.zeros(num_tasks, units, device=device))
        for t in range(num_tasks):
            init_embedding_(self.embedding[t],
                            DEFAULT_MASK_INIT if mask_init == "last" else mask_init)
        # the mask scale from which the soft gate's forward value is the exact 0/1 mask (set by
        # begin_task for the task being trained; None: soft values at every scale)
        self.hard_from: float | None = None

    @property
    def units(self) -> int:
        """Number of output units the gate covers."""
        return self.embedding.shape[1]

    def forward(self, task_id: int, mask_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """The gate ``(units,)`` of ``task_id`` as the graph applies it: soft values with a
        mask scale, a bool mask without (see ``hard_gate``). From ``hard_from`` on, the soft
        gate's value is the exact 0/1 mask and its gradient is the soft gate's (see
        ``straight_through``)."""
        e = self.embedding[task_id]
        if mask_scale is None:
            return hard_gate(e)
        a = soft_gate(e, mask_scale)
        if self.hard_from is None:
            return a
        if isinstance(mask_scale, torch.Tensor):  # no host sync, no graph break
            return torch.where(mask_scale >= self.hard_from, straight_through(e, a), a)
        return straight_through(e, a) if mask_scale >= self.hard_from else a

    def mask(self, task_id: int, mask_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """The gate vector as numbers: soft with a mask scale, exactly 0.0 or 1.0 without."""
        return self(task_id, mask_scale).to(self.embedding.dtype)

    def cumulative(self, tasks: list[int]) -> torch.Tensor:
        """``max`` of the stored masks of ``tasks`` (zeros for no task): which units they use."""
        if not tasks:
            return torch.zeros_like(self.task_masks[0])
        return self.task_masks[tasks].amax(dim=0)

    def extra_repr(self) -> str:
        return f"tasks={self.embedding.shape[0]}, units={self.units}"


def can_fold_into_weight(layer: nn.Module) -> bool:
    """Exact Linear/ConvNd: the gate can scale its weight rows instead of its output."""
    return type(layer) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def can_fold_into_norm(norm: nn.Module) -> bool:
    """Exact affine BatchNorm: the gate can scale its affine instead of its output."""
    return type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and norm.affine


def _unit_view(gate: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = gate.shape[0]
    return gate.view(shape)


def apply_gate(x: torch.Tensor, gate: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``x`` times ``gate`` along ``unit_dim``; a hard (bool) gate selects, so closed is 0."""
    g = _unit_view(gate, x.ndim, unit_dim)
    if g.dtype == torch.bool:
        return torch.where(g, x, 0.0)
    return x * g.to(x.dtype)


def scale_rows(tensor: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A layer's weight or bias with row ``o`` (output unit ``o``) times ``gate[o]``."""
    return apply_gate(tensor, gate, 0)


def gated_layer(x: torch.Tensor, layer: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    """``gate * layer(x)`` for an exact Linear or ConvNd, with the gate folded into its rows."""
    weight = scale_rows(layer.weight, gate)
    bias = None if layer.bias is None else scale_rows(layer.bias, gate)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def closed_rows_zeroed(x: torch.Tensor, layer: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with closed units' outputs exactly 0 when the gate is hard (the gate itself
    is applied by the norm that follows): whatever a later task left in their rows, the norm
    then sees zeros, where an overflow to inf would make its ``inf * 0`` NaN.

    Either the closed rows are zeroed or the closed outputs are selected away, whichever
    touches fewer numbers: the weight for large batches, the output for a batch of one.
    """
    if gate.dtype != torch.bool or layer._forward_hooks or layer._forward_pre_hooks:
        return layer(x)  # soft gates (training); a hook registered after conversion still runs
    features = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    outputs = x.numel() // max(features, 1) * gate.numel()
    if outputs < layer.weight.numel():
        dim = -1 if isinstance(layer, nn.Linear) else 1
        return apply_gate(layer(x), gate, dim)
    return gated_layer(x, layer, gate)


def gated_batch_norm(bn: nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``gate * bn(x)`` for an exact affine BatchNorm, with the gate folded into its affine.

    Mirrors ``_BatchNorm.forward`` (running statistics, momentum, ``num_batches_tracked``).
    """
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                        scale_rows(bn.weight, gate), scale_rows(bn.bias, gate), use_batch, factor,
                        bn.eps)
