"""The HAT training loop the tests share: a few steps of one task, and eval outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hatconvert


def train(net, optimizer, task, x, y, steps=4):
    """``steps`` batches of ``(x, y)`` for ``task`` between begin_task and end_task."""
    net.train()
    net.begin_task(task)
    for b in range(steps):
        s = hatconvert.mask_scale(b, steps)
        loss = F.cross_entropy(net(x, task, s), y) + net.regularization(task, s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.end_task()


def eval_out(net, x, task):
    net.eval()
    with torch.no_grad():
        return net(x, task)
