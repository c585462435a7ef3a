"""``train_task``: the HAT training loop for users who do not want to write it."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .network import HATNetwork
from .schedules import mask_scale


def train_task(net: HATNetwork, task_id: int, loader: Iterable, optimizer: torch.optim.Optimizer,
               *, epochs: int = 1, loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
               schedule: str = "linear", s_max: float = 400.0, c: float = 0.75,
               reg_mode: str = "original", clip_grad_norm: float | None = 10000.0,
               device: torch.device | str | None = None, progress: bool = True,
               **begin_options: Any) -> list[float]:
    """Train task ``task_id`` on ``loader`` (batches of ``(x, y)``) and end it.

    Runs ``begin_task``, ``epochs`` passes with the mask-scale ``schedule`` restarted every
    epoch, the loss plus ``c`` times the sparsity regularization, and ``end_task``. The
    optimizer may be kept across tasks. Returns the mean loss of each epoch.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    num_batches = len(loader)  # type: ignore[arg-type]
    if num_batches == 0:
        raise ValueError(f"the loader for task {task_id} is empty")
    net.train()
    net.begin_task(task_id, s_max=s_max, **begin_options)
    bar = _progress(epochs * num_batches, f"task {task_id}", progress)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for b, (x, y) in enumerate(loader):
            if device is not None:
                x, y = x.to(device), y.to(device)
            s = mask_scale(b, num_batches, s_max=s_max, schedule=schedule)
            loss = loss_fn(net(x, task_id, s), y) + net.regularization(task_id, s, c, reg_mode)
            optimizer.zero_grad()
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad_norm)
            optimizer.step()
            value = loss.item()
            total += value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
        losses.append(total / num_batches)
    if bar is not None:
        bar.close()
    net.end_task()
    return losses


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)
