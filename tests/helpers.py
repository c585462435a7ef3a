"""The HAT training loop the tests share: a few steps of one task, and eval outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hatconvert


def train(net, optimizer, task, x, y, steps=4, forward=None, **begin_options):
    """``steps`` batches of ``(x, y)`` for ``task`` between begin_task and end_task, then the
    statistics pass (every test that trains this way checks that it moves no earlier task).
    ``forward``: what runs the batch (default ``net``; ``torch.compile(net)``, say);
    ``begin_options`` go to ``begin_task``."""
    forward = net if forward is None else forward
    net.train()
    net.begin_task(task, **begin_options)
    for b in range(steps):
        s = hatconvert.mask_scale(b, steps)
        loss = F.cross_entropy(forward(x, task, s), y) + net.regularization(task, s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.update_statistics(task, [x])
    net.end_task()


def eval_out(net, x, task):
    net.eval()
    with torch.no_grad():
        return net(x, task)


def flat(out):
    """The tensors of a model output: a tensor, a tuple or list of them, or a dict."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat(v)]
    return [t for v in out for t in flat(v)]


def run(net, inputs, task):
    args, kwargs = inputs
    return net(*args, task, **kwargs)


def train_and_check(net, make_call, fixed_calls, tasks=3, steps=3):
    """Train ``tasks`` tasks; after each, every earlier task's eval outputs on every call in
    ``fixed_calls`` must be bit-identical to what they were when that task ended."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    ended = {}
    for t in range(tasks):
        net.train()
        net.begin_task(t)
        for b in range(steps):
            s = hatconvert.mask_scale(b, steps)
            out = run(net, make_call(5), t) if b else run(net, fixed_calls[b % len(fixed_calls)],
                                                           t)
            loss = sum(o.pow(2).mean() for o in flat(out)) + net.regularization(t, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            ended[t] = [[o.clone() for o in flat(run(net, c, t))] for c in fixed_calls]
            for u in range(t):
                for before, c in zip(ended[u], fixed_calls):
                    now = flat(run(net, c, u))
                    assert len(now) == len(before) and all(
                        torch.equal(a, b) for a, b in zip(now, before)), \
                        f"task {u} changed in task {t}"
    return ended


