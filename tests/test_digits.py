"""A small run of benchmarks/continual_digits.py, and train_task on the same data."""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import hatconvert

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import continual_digits as digits  # noqa: E402


def test_hat_never_forgets_and_beats_fine_tuning_on_digits():
    results = digits.run(epochs=3, seed=0)
    hat_avg, hat_bwt = digits.summary(results["HAT"])
    ft_avg, ft_bwt = digits.summary(results["fine-tuning"])
    assert hat_bwt == 0.0
    hat = results["HAT"]
    for j in range(digits.NUM_TASKS):  # each column is frozen from the row its task was trained
        assert all(hat[i][j] == hat[j][j] for i in range(j, digits.NUM_TASKS))
    assert hat_avg > ft_avg and ft_bwt < 0
    assert min(hat[j][j] for j in range(digits.NUM_TASKS)) > 0.85


def test_train_task_runs_the_whole_loop():
    tasks = digits.digit_tasks(seed=1)[:2]
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    accuracies = []
    for t, task in enumerate(tasks):
        loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=32, shuffle=True)
        losses = hatconvert.train_task(net, t, loader, optimizer, epochs=3, progress=False)
        assert len(losses) == 3 and net.trained_tasks() == list(range(t + 1))
        net.eval()
        with torch.no_grad():
            accuracies.append(digits.accuracy(net(tasks[0].x_test, 0), tasks[0].y_test))
    assert accuracies[0] > 0.85
    assert accuracies[1] == accuracies[0]


def test_train_task_steps_the_scheduler_after_every_optimizer_step():
    task = digits.digit_tasks(seed=0)[0]
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=64)
    seen = []
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: seen.append(k) or 0.5 ** k)
    hatconvert.train_task(net, 0, loader, optimizer, epochs=2, progress=False,
                          scheduler=scheduler)
    assert seen == list(range(2 * len(loader) + 1))  # built at 0, then one step per batch
    assert optimizer.param_groups[0]["lr"] == 1e-3 * 0.5 ** (2 * len(loader))
