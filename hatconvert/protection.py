"""Keeping earlier tasks fixed while a later task trains.

Three mechanisms, all armed by ``HATNetwork.begin_task`` and removed by ``end_task``:

* gradient hooks scale the gradient of every gated weight ``w[o, i]`` by the adjustment rate
  ``1 - min(M_out[o], M_in[i])`` (and a bias ``b[o]`` by ``1 - M_out[o]``);
* an optimizer step post-hook (torch's global one, so any ``torch.optim`` optimizer kept across
  tasks is covered) puts every protected entry back to its value at ``begin_task``: momentum,
  Adam moments and weight decay move parameters whose gradient is zero, so hooks alone leak;
  the same hook clamps the active task's embeddings to ``[-6, 6]``;
* an embedding gradient hook applies HAT's compensation for the mask scale of the forward pass.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .layers import is_cond_conv, uses_weight_as_is

ADJUSTMENTS = ("hat", "hat_random", "hat_const_alpha", "hat_const_1")
EMBEDDING_CLAMP = 6.0
COMPENSATION_CLAMP = 50.0


def weight_protection(layer: nn.Module, out_mask: torch.Tensor, in_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(M_out[o], M_in[i])`` laid out like the layer's weight, and ``M_out`` for its bias.

    Handles Linear ``(out, in)``, ConvNd ``(out, in/groups, *k)``, ConvTransposeNd
    ``(in, out/groups, *k)``, grouped convolutions included, and timm's CondConv2d, whose
    weight holds one conv weight per expert ``(experts, out * in/groups * k)``. A layer that
    transforms its weight (weight standardization) has every input counted as used.
    """
    weight = layer.weight
    out_mask = out_mask.to(weight.device, torch.float32)
    in_mask = in_mask.to(weight.device, torch.float32)
    if not uses_weight_as_is(layer):
        in_mask = torch.ones_like(in_mask)
    if is_cond_conv(layer):
        shape = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        protect = _conv_protection(shape, layer.groups, out_mask, in_mask)
        bias = None if layer.bias is None else out_mask.expand_as(layer.bias).contiguous()
        return protect.reshape(1, -1).expand_as(weight).contiguous(), bias
    kernel = [1] * (weight.ndim - 2)
    if isinstance(layer, nn.Linear):
        protect = torch.minimum(out_mask[:, None], in_mask[None, :])
    elif getattr(layer, "transposed", False):
        groups = layer.groups
        in_per, out_per = weight.shape[0] // groups, weight.shape[1]
        out_by_in = out_mask.view(groups, out_per).repeat_interleave(in_per, dim=0)  # (in, out/g)
        protect = torch.minimum(in_mask[:, None], out_by_in).view(*weight.shape[:2], *kernel)
    else:
        protect = _conv_protection(tuple(weight.shape), layer.groups, out_mask, in_mask)
    return protect.expand_as(weight).contiguous(), out_mask


def _conv_protection(shape: tuple[int, ...], groups: int, out_mask: torch.Tensor,
                     in_mask: torch.Tensor) -> torch.Tensor:
    """``min(M_out[o], M_in[i])`` for a conv weight of ``shape`` ``(out, in/groups, *k)``."""
    out_per, in_per = shape[0] // groups, shape[1]
    in_by_out = in_mask.view(groups, in_per).repeat_interleave(out_per, dim=0)  # (out, in/g)
    protect = torch.minimum(out_mask[:, None], in_by_out)
    return protect.view(*shape[:2], *([1] * (len(shape) - 2))).expand(shape)


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


def compensate(grad: torch.Tensor, embedding: torch.Tensor, s: float, s_max: float) -> torch.Tensor:
    """HAT's embedding gradient compensation for a forward pass at mask scale ``s``."""
    e = embedding.detach()
    num = torch.cosh(torch.clamp(s * e, -COMPENSATION_CLAMP, COMPENSATION_CLAMP)) + 1.0
    return grad * (s_max / s) * num / (torch.cosh(e) + 1.0)


@dataclass
class Held:
    """A tensor kept at its value from ``begin_task``: wholly, or where ``where`` is True."""

    tensor: torch.Tensor
    reference: torch.Tensor
    where: torch.Tensor | None = None

    def restore(self) -> None:
        data = self.tensor.data if isinstance(self.tensor, nn.Parameter) else self.tensor
        if self.where is None:
            data.copy_(self.reference)
        else:
            data.copy_(torch.where(self.where, self.reference, data))


def hold(tensor: torch.Tensor, where: torch.Tensor | None = None) -> Held | None:
    if where is not None:
        if not bool(where.any()):
            return None
        if bool(where.all()):
            where = None
    return Held(tensor, tensor.detach().clone(), where)


class Guard:
    """The armed protection of one network during one task."""

    def __init__(self, params: Iterable[nn.Parameter], after_step: Callable[[], None]):
        self.param_ids = {id(p) for p in params}
        self.held: list[Held] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._after_step = after_step

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self.param_ids for group in optimizer.param_groups
                   for p in group["params"])

    def after_step(self) -> None:
        with torch.no_grad():
            for item in self.held:
                item.restore()
            self._after_step()

    def arm(self) -> None:
        _ensure_step_hook()
        _armed.add(self)

    def disarm(self) -> None:
        _armed.discard(self)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.held.clear()


_armed: "weakref.WeakSet[Guard]" = weakref.WeakSet()
_step_hook = None


def _after_any_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for guard in list(_armed):
        if guard.owns(optimizer):
            guard.after_step()


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_after_any_step)
