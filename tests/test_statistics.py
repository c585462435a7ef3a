"""Norm statistics are recomputed under a task's final masks before it ends (statistics.py)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import hatconvert
from hatconvert.errors import TaskError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import continual_digits as digits  # noqa: E402


def digits_batches(t: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    task = digits.digit_tasks(seed=0)[t]
    n = len(task.y_train) // size * size  # equal batches: the cumulative average is exact
    return [(task.x_train[i:i + size], task.y_train[i:i + size]) for i in range(0, n, size)]


def task_norms(net: hatconvert.HATNetwork, t: int) -> dict[str, _BatchNorm]:
    return {path: net.model.get_submodule(path).copies[t] for path in net.layout.norms}


def expected_statistics(net, t, batches):
    """Per norm of task ``t``: the mean over batches of each batch's mean and unbiased
    variance of the norm's input, seen with hooks on a copy that runs in eval mode except for
    these norms, which normalise with batch statistics (as in training)."""
    net = copy.deepcopy(net)
    net.eval()
    with torch.no_grad():
        net(batches[0][0], t)  # the copy arms itself (and runs its example) before the hooks
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for path, norm in task_norms(net, t).items():
        norm.train()
        def hook(module, args, path=path):
            x = args[0].transpose(0, 1).flatten(1)
            seen.setdefault(path, []).append((x.mean(1), x.var(1, unbiased=True)))
        hooks.append(norm.register_forward_pre_hook(hook))
    with torch.no_grad():
        for x, _ in batches:
            net(x, t)
    for h in hooks:
        h.remove()
    return {path: (torch.stack([m for m, _ in stats]).mean(0),
                   torch.stack([v for _, v in stats]).mean(0)) for path, stats in seen.items()}


def trained_on_task_0():
    torch.manual_seed(0)
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    hatconvert.train_task(net, 0, digits_batches(0), optimizer, epochs=2, progress=False)
    return net, optimizer


def test_the_pass_leaves_each_norm_with_the_statistics_of_the_final_masks():
    net, optimizer = trained_on_task_0()
    batches = digits_batches(1)
    net.train()
    net.begin_task(1)
    for b, (x, y) in enumerate(batches * 2):  # soft gates early in the schedule: stale averages
        s = hatconvert.mask_scale(b % len(batches), len(batches))
        loss = torch.nn.functional.cross_entropy(net(x, 1, s), y) + net.regularization(1, s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stale = {p: n.running_var.clone() for p, n in task_norms(net, 1).items()}
    assert net.update_statistics(1, batches) == len(batches)
    expected = expected_statistics(net, 1, batches)
    for path, norm in task_norms(net, 1).items():
        mean, var = expected[path]
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5)
        assert norm.momentum == 0.1 and norm.training  # as before the pass (training)
    worst = max(float((stale[p] / expected[p][1].clamp_min(1e-12)).log().abs().max())
                for p in stale)
    assert worst > 0.1  # the averages of training were off by more than 10 % somewhere
    net.end_task()


def test_train_task_runs_the_pass_and_earlier_tasks_stay_bit_identical():
    net, optimizer = trained_on_task_0()
    x0 = digits_batches(0)[0][0]
    net.eval()
    with torch.no_grad():
        before = net(x0, 0).clone()
    statistics_0 = [(n.running_mean.clone(), n.running_var.clone())
                    for n in task_norms(net, 0).values()]
    for norm in task_norms(net, 0).values():  # task 0's own pass: a count of its batches
        assert int(norm.num_batches_tracked) == len(digits_batches(0))
    batches = digits_batches(1)
    calls = []
    original = net.update_statistics
    net.update_statistics = lambda *a, **k: calls.append(a) or original(*a, **k)
    hatconvert.train_task(net, 1, batches, optimizer, epochs=2, progress=False)
    assert len(calls) == 1 and calls[0][0] == 1
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x0, 0), before)
    for norm, (mean, var) in zip(task_norms(net, 0).values(), statistics_0):
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)


def test_update_statistics_refuses_tasks_that_are_not_being_trained():
    net, _ = trained_on_task_0()
    with pytest.raises(TaskError, match=r"task 0 is trained and protected"):
        net.update_statistics(0, digits_batches(0))
    with pytest.raises(TaskError, match=r"task 1 is not being trained"):
        net.update_statistics(1, digits_batches(1))


def test_a_failed_pass_leaves_the_statistics_as_they_were():
    net, _ = trained_on_task_0()
    net.train()
    net.begin_task(1)
    before = {p: (n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone())
              for p, n in task_norms(net, 1).items()}
    with pytest.raises(ValueError, match="no batches"):
        net.update_statistics(1, [])
    bad = digits_batches(1)[:2] + [(torch.zeros(4, 3, 8, 8), None)]  # wrong channel count
    with pytest.raises(Exception):
        net.update_statistics(1, bad)
    for path, norm in task_norms(net, 1).items():
        for saved, now in zip(before[path], (norm.running_mean, norm.running_var,
                                             norm.num_batches_tracked)):
            assert torch.equal(saved, now)
        assert norm.momentum == 0.1
    assert net.training
    net.abort_task()


def test_batches_may_be_tensors_or_dicts_of_named_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 2)

        def forward(self, features):
            return self.head(torch.relu(self.bn(self.fc(features))))

    torch.manual_seed(0)
    net = hatconvert.convert(Net(), num_tasks=2, mask_init="dense")
    data = [torch.randn(16, 4) + 3.0 for _ in range(3)]
    net.begin_task(0)
    assert net.update_statistics(0, data) == 3
    tensor_mean = net.model.bn.copies[0].running_mean.clone()
    assert net.update_statistics(0, [{"features": x} for x in data]) == 3
    torch.testing.assert_close(net.model.bn.copies[0].running_mean, tensor_mean)
    assert float(tensor_mean.abs().max()) > 0.1  # moved from the initial zeros
    net.abort_task()
