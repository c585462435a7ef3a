"""Which torch layers hatconvert rewrites, and the task-indexed containers it rewrites them into.

Matching is by ``isinstance`` so that subclasses (timm's ``Conv2dSame``, ``StdConv2d``,
``BatchNormAct2d``, ``LayerNorm2d``) are rewritten with their own behaviour kept.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .gates import gated_batch_norm

GATABLE_TYPES: tuple[type, ...] = (nn.Linear, _ConvNd)
NORM_TYPES: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def is_gatable(module: nn.Module) -> bool:
    """Linear, ConvNd and ConvTransposeNd, subclasses included."""
    return isinstance(module, GATABLE_TYPES)


def is_norm(module: nn.Module) -> bool:
    """BatchNorm, InstanceNorm, LayerNorm, GroupNorm and RMSNorm, subclasses included."""
    return isinstance(module, NORM_TYPES)


def normalizes_each_unit(norm: nn.Module) -> bool:
    """True when the norm's statistics never mix units (channels): BatchNorm, InstanceNorm,
    GroupNorm with one channel per group.

    Only behind such a norm can a gate sit: behind LayerNorm or grouped GroupNorm, the units a
    task leaves free would still move the statistics of the units it uses.
    """
    if isinstance(norm, (_BatchNorm, _InstanceNorm)):
        return True
    return isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels


def output_units(module: nn.Module) -> int:
    """Number of output units a gate of this layer has."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


def unit_dim(module: nn.Module) -> int:
    """The dim of the layer's output that holds its units: channels for convs, last for Linear."""
    return -1 if isinstance(module, nn.Linear) else 1


def own_tensors(module: nn.Module) -> int:
    """Number of parameter and buffer elements in ``module`` and its children."""
    return sum(t.numel() for t in module.parameters()) + sum(b.numel() for b in module.buffers())


class TaskIndexed(nn.Module):
    """One copy of a module per task; ``task_id`` picks the copy that runs.

    Used for norms (affine parameters and running statistics per task), heads and leaves whose
    weights hatconvert cannot gate. Each copy starts as an exact copy of the original module.
    """

    def __init__(self, module: nn.Module, num_tasks: int, copies: list[nn.Module] | None = None):
        super().__init__()
        if copies is None:
            copies = [copy.deepcopy(module) for _ in range(num_tasks)]
        self.copies = nn.ModuleList(copies)

    def forward(self, *args: Any, task_id: int, gate: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        module = self.copies[task_id]
        if gate is not None:  # only set for exact BatchNorms (see gates.GATE_IN_NORM)
            return gated_batch_norm(module, args[0], gate)
        return module(*args, **kwargs)


class TaskParameter(nn.Module):
    """One copy of a loose parameter (``pos_embed``, ``cls_token``, layer-scale ``gamma``) per task."""

    def __init__(self, param: torch.Tensor, num_tasks: int):
        super().__init__()
        self.copies = nn.ParameterList(
            [nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
             for _ in range(num_tasks)])

    def forward(self, task_id: int) -> torch.Tensor:
        return self.copies[task_id]
