"""``train_task``: the HAT training loop for users who do not want to write it."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .network import HATNetwork
from .options import check_regularization
from .penalty import KEEP_OPEN, check_keep_open
from .schedules import mask_scale

__all__ = ['train_task']


def train_task(net: HATNetwork, task_id: int, loader: Iterable, optimizer: torch.optim.Optimizer,
               *, epochs: int = 1, loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
               schedule: str = "linear", s_max: float = 400.0, c: float = 0.75,
               reg_mode: str = "original", keep_open: float = KEEP_OPEN,
               clip_grad_norm: float | None = 10000.0, update_statistics: bool = True,
               scheduler: Any = None, device: torch.device | str | None = None,
               progress: bool = True, **begin_options: Any) -> list[float]:
    """Train task ``task_id`` on ``loader`` (batches of ``(x, y)``) and end it.

    Runs ``begin_task``, ``epochs`` passes with the mask-scale ``schedule`` restarted every
    epoch, the loss plus ``c`` times the sparsity regularization (``reg_mode``, ``keep_open``:
    see ``HATNetwork.regularization``), with ``update_statistics`` one more pass without
    gradients that recomputes the task's norm statistics under its final masks
    (``HATNetwork.update_statistics``), and ``end_task``. ``scheduler``, a torch LR scheduler
    built for this task, is stepped after every optimizer step: with an optimizer kept across
    tasks use one that scales the initial rate, such as ``LambdaLR`` (``CosineAnnealingLR``
    rebuilt on it goes on from the previous task's final rate). The
    optimizer may be kept across tasks. Returns the mean loss of each epoch. Arguments are
    checked before the task begins; if training raises, the task is aborted (``abort_task``).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    num_batches = len(loader)  # type: ignore[arg-type]
    if num_batches == 0:
        raise ValueError(f"the loader for task {task_id} is empty")
    mask_scale(num_batches - 1, num_batches, s_max=s_max, schedule=schedule)  # checks both
    check_regularization(c, reg_mode)
    check_keep_open(keep_open)
    net.train()
    net.begin_task(task_id, s_max=s_max, **begin_options)
    try:
        losses = _epochs(net, task_id, loader, (optimizer, scheduler), epochs, loss_fn, schedule,
                         s_max, (c, reg_mode, keep_open), clip_grad_norm, device, progress)
        if update_statistics:
            net.update_statistics(task_id, loader, device=device)
    except BaseException:
        net.abort_task()  # trained tasks are untouched; this one is not marked trained
        raise
    net.end_task()
    return losses


def _epochs(net: HATNetwork, task_id: int, loader: Iterable, steps: tuple[Any, Any],
            epochs: int, loss_fn: Callable[..., torch.Tensor], schedule: str, s_max: float,
            penalty: tuple[float, str, float], clip_grad_norm: float | None,
            device: torch.device | str | None, progress: bool) -> list[float]:
    optimizer, scheduler = steps
    num_batches = len(loader)  # type: ignore[arg-type]
    bar = _progress(epochs * num_batches, f"task {task_id}", progress)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for b, (x, y) in enumerate(loader):
            if device is not None:
                x, y = x.to(device), y.to(device)
            s = mask_scale(b, num_batches, s_max=s_max, schedule=schedule)
            loss = loss_fn(net(x, task_id, s), y) + net.regularization(task_id, s, *penalty)
            optimizer.zero_grad()
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            value = loss.item()
            total += value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
        losses.append(total / num_batches)
    if bar is not None:
        bar.close()
    return losses


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)
