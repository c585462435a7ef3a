"""Running statistics recomputed under the masks inference applies, before a task ends.

While a task trains, its norms average their running statistics over forwards whose masks are
still moving: the mask-scale schedule starts every epoch from soft gates near 0.5 (units the
task will close are half open), and units near the threshold open and close from batch to batch.
Behind a task's few open units a BatchNorm may see a variance of 1e-4, so these averages can be
off by a factor of several, and the task that scored 1.000 in training scores 0.811 in eval
(resnet18 on MNIST 0/1 after five Fashion-MNIST tasks; 1.000 once recomputed). Recomputing them
in one pass over the task's data with the final masks and weights, as
``torch.optim.swa_utils.update_bn`` does after weight averaging, gives eval the statistics of
what it computes. ``train_task`` does it at the end of every task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from .errors import TaskError
from .layers import updates_statistics

if TYPE_CHECKING:
    from .network import HATNetwork

__all__ = ['statistics_modules', 'update_statistics']

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def statistics_modules(net: "HATNetwork", t: int) -> list[nn.Module]:
    """The modules whose running statistics task ``t`` owns: those in its norm copies, heads and
    leaves, and, before any task is trained, those in leaves frozen after task 0."""
    roots = [net.model.get_submodule(p).copies[t] for p in net.layout.task_indexed_modules()]
    if not bool(net.trained.any()):
        roots += [net.model.get_submodule(p) for p in net.layout.frozen_leaves]
    return [m for root in roots for m in root.modules() if updates_statistics(m)]


def update_statistics(net: "HATNetwork", task_id: int, batches: Iterable,
                      device: torch.device | str | None = None) -> int:
    """Recompute the running statistics of the active task ``task_id`` from ``batches``: one
    pass without gradients, hard gates, every other module in eval mode, each norm's average
    taken over the pass. Returns the number of batches; 0 without any such norm."""
    t = net.check_task_id(task_id)
    if net.active_task != t:
        state = "trained and protected" if bool(net.trained[t]) else "not being trained"
        raise TaskError(f"update_statistics({t}): task {t} is {state}; recompute its "
                        f"statistics after training and before end_task()")
    modules = statistics_modules(net, t)
    if not modules:
        return 0
    saved = [{n: b.clone() for n in _STATISTICS if (b := m._buffers.get(n)) is not None}
             for m in modules]
    momenta, was_training = [m.momentum for m in modules], net.training
    count = 0
    try:
        net.eval()
        for m in modules:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
            m.train()
        with torch.no_grad():
            for batch in batches:
                _run(net, batch, t, device)
                count += 1
        if count == 0:
            raise ValueError(f"update_statistics({t}): no batches to compute statistics from")
    except BaseException:
        with torch.no_grad():  # no half-updated statistics
            for m, values in zip(modules, saved):
                for name, value in values.items():
                    m._buffers[name].copy_(value)
        raise
    finally:
        for m, momentum in zip(modules, momenta):
            m.momentum = momentum
        net.train(was_training)
    return count


def _run(net: "HATNetwork", batch: Any, t: int, device: torch.device | str | None) -> None:
    """One forward of ``batch``: a tensor, ``(x, y, ...)`` (the first is the input) or a dict
    of named inputs (``net(**batch, task_id=t)``)."""
    def move(value: Any) -> Any:
        return value.to(device) if device is not None and isinstance(value, torch.Tensor) \
            else value
    if isinstance(batch, dict):
        net(**{k: move(v) for k, v in batch.items()}, task_id=t)
    elif isinstance(batch, (tuple, list)):
        net(move(batch[0]), t)
    else:
        net(move(batch), t)
