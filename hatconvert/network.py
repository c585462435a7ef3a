"""The converted network: a rewritten graph module plus the task bookkeeping around it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import TaskError
from .gates import HATGate
from .report import ConversionReport
from .rewrite import Layout


class HATNetwork(nn.Module):
    """A HAT network: ``net(x, task_id, mask_scale=None)``.

    ``mask_scale=None`` gives hard 0/1 gates (inference); a positive mask scale gives the soft
    gates ``sigmoid(s * e)`` used while training. ``net.model`` is the rewritten graph module;
    its submodules keep the original paths, so ``net.model.layer1[0].conv1`` is the same layer.
    """

    def __init__(self, model: fx.GraphModule, layout: Layout, report: ConversionReport,
                 num_tasks: int, config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.layout = layout
        self.num_tasks = num_tasks
        self.config = config
        self._report = report

    def forward(self, x: Any, task_id: int | torch.Tensor,
                mask_scale: float | torch.Tensor | None = None, **inputs: Any) -> Any:
        t = self.check_task_id(task_id)
        if mask_scale is not None:
            check_mask_scale(mask_scale)
        return self.model(x, **inputs, task_id=t, mask_scale=mask_scale)

    def check_task_id(self, task_id: Any) -> int:
        """``task_id`` as a Python int in ``[0, num_tasks)``, or a ``TaskError`` that says why."""
        if isinstance(task_id, torch.Tensor):
            if task_id.ndim != 0 or task_id.dtype.is_floating_point or task_id.is_complex() \
                    or task_id.dtype == torch.bool:
                raise TaskError(f"task_id must be an int or a 0-dim integer tensor, got a tensor "
                                f"of shape {tuple(task_id.shape)} and dtype {task_id.dtype}")
            task_id = int(task_id.item())
        elif isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TaskError(f"task_id must be an int or a 0-dim integer tensor, "
                            f"got {type(task_id).__name__} {task_id!r}")
        if not 0 <= task_id < self.num_tasks:
            raise TaskError(f"task_id {task_id} is out of range: this network has "
                            f"{self.num_tasks} tasks (0 to {self.num_tasks - 1})")
        return task_id

    def gates(self) -> dict[str, HATGate]:
        """The gate of every gated layer, by the layer's module path."""
        return {path: self.model.get_submodule(g.gate) for path, g in self.layout.gated.items()}

    def masks(self, task_id: int, mask_scale: float | None = None) -> dict[str, torch.Tensor]:
        """Task ``task_id``'s gate vector per gated layer (hard without a mask scale)."""
        t = self.check_task_id(task_id)
        return {path: gate.mask(t, mask_scale) for path, gate in self.gates().items()}

    def report(self) -> ConversionReport:
        """What the conversion did: gated layers, task-indexed and frozen tensors, overhead."""
        return self._report

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, gated_layers={len(self.layout.gated)}"


def check_mask_scale(mask_scale: Any) -> None:
    value = mask_scale.item() if isinstance(mask_scale, torch.Tensor) and mask_scale.numel() == 1 \
        else mask_scale
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"mask_scale must be a positive finite number or None (hard gates), "
                         f"got {mask_scale!r}")
