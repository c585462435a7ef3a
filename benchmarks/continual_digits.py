"""Continual learning on scikit-learn's bundled digits: HAT against plain fine-tuning.

The 8x8 digits (``sklearn.datasets.load_digits``, no download) are split into 5 tasks of two
classes each (0/1, 2/3, ...). The same small CNN learns them one after another, once converted
by hatconvert and once fine-tuned plainly with one head per task; both keep one AdamW optimizer
(weight decay 0.01) across tasks. Prints the accuracy matrix (row: after training task i,
column: task j), the average accuracy after the last task and the backward transfer
``BWT = mean_j<T-1 (acc[T-1][j] - acc[j][j])`` side by side.

    python benchmarks/continual_digits.py [--epochs 10] [--seed 0]
    python benchmarks/continual_digits.py --study [--study-epochs 3 10 20]   # the README's study
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import hatconvert
from hatconvert.penalty import KEEP_OPEN

NUM_TASKS = 5


class DigitsNet(nn.Module):
    def __init__(self, classes: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, classes)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return F.relu(self.fc(torch.flatten(x, 1)))

    def forward(self, x):
        return self.head(self.features(x))


@dataclass
class Task:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digit_tasks(seed: int = 0, test_fraction: float = 0.3) -> list[Task]:
    """Five two-class tasks; labels become 0/1 within each task."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(NUM_TASKS):
        idx = torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(len(idx) * test_fraction)
        test, train = idx[:n_test], idx[n_test:]
        tasks.append(Task(x[train], y[train] - 2 * t, x[test], y[test] - 2 * t))
    return tasks


def batches(task: Task, batch_size: int, g: torch.Generator):
    order = torch.randperm(len(task.y_train), generator=g)
    return [(task.x_train[order[i:i + batch_size]], task.y_train[order[i:i + batch_size]])
            for i in range(0, len(order), batch_size)]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def run_hat(tasks, epochs, batch_size, seed, lr=2e-3) -> list[list[float]]:
    torch.manual_seed(seed)
    net = hatconvert.convert(DigitsNet(), num_tasks=NUM_TASKS)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    matrix = []
    for t, task in enumerate(tasks):
        loader = [batches(task, batch_size, g) for _ in range(epochs)]
        net.train()
        net.begin_task(t)
        for epoch_batches in loader:
            for b, (x, y) in enumerate(epoch_batches):
                s = hatconvert.mask_scale(b, len(epoch_batches))
                loss = F.cross_entropy(net(x, t, s), y) + net.regularization(t, s)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            matrix.append([accuracy(net(tasks[j].x_test, j), tasks[j].y_test)
                           for j in range(NUM_TASKS)])
    return matrix


class MultiHead(nn.Module):
    """Fine-tuning baseline: one shared body, one head per task."""

    def __init__(self, body: DigitsNet):
        super().__init__()
        self.body = body
        self.heads = nn.ModuleList(copy.deepcopy(body.head) for _ in range(NUM_TASKS))

    def forward(self, x, t):
        return self.heads[t](self.body.features(x))


def run_finetune(tasks, epochs, batch_size, seed, lr=2e-3) -> list[list[float]]:
    torch.manual_seed(seed)
    model = MultiHead(DigitsNet())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    matrix = []
    for t, task in enumerate(tasks):
        model.train()
        for _ in range(epochs):
            for x, y in batches(task, batch_size, g):
                loss = F.cross_entropy(model(x, t), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            matrix.append([accuracy(model(tasks[j].x_test, j), tasks[j].y_test)
                           for j in range(NUM_TASKS)])
    return matrix


def summary(matrix: list[list[float]]) -> tuple[float, float]:
    """Average accuracy after the last task, and backward transfer."""
    last = matrix[-1]
    avg = sum(last) / len(last)
    bwt = sum(last[j] - matrix[j][j] for j in range(len(last) - 1)) / (len(last) - 1)
    return avg, bwt


def run(epochs: int = 10, batch_size: int = 32, seed: int = 0) -> dict[str, list[list[float]]]:
    tasks = digit_tasks(seed)
    return {"HAT": run_hat(tasks, epochs, batch_size, seed),
            "fine-tuning": run_finetune(tasks, epochs, batch_size, seed)}


# The study's settings, each a change from the defaults (N(0, 0.05^2) draws, the penalty's floor
# keep_open=0.05, exact masks from half of s_max, c=0.75, linear schedule); 1.0 is the paper's
# N(0, 1) draw.
STUDY = [("N(0,1), paper's penalty", dict(std=1.0, keep_open=0.0)),
         ("N(0,1)", dict(std=1.0)),
         ("N(0,0.05^2) (default)", dict()),
         ("N(0,0.05^2), paper's penalty", dict(keep_open=0.0)),
         ("N(0,0.02^2), paper's penalty", dict(std=0.02, keep_open=0.0)),
         ("N(0,0.02^2)", dict(std=0.02)),
         ("N(0,0.02^2), soft gates", dict(std=0.02, hard_from=None)),
         ("N(0,0.01^2)", dict(std=0.01)),
         ("N(0,0.02^2), c=0.25", dict(std=0.02, c=0.25)),
         ("N(0,0.02^2), c=2", dict(std=0.02, c=2.0)),
         ("N(0,0.02^2), cosine schedule", dict(std=0.02, schedule="cosine"))]


def study_run(change: dict, seed: int, epochs: int) -> tuple:
    """Five tasks through ``train_task`` with AdamW: (min accuracy, ACC, capacity left)."""
    import hatconvert.gates as gates
    default_std = gates.SMALL_NORMAL_STD
    options = dict(std=default_std, keep_open=KEEP_OPEN, hard_from=0.5, c=0.75, schedule="linear")
    options.update(change)
    std = options.pop("std")
    gates.SMALL_NORMAL_STD = std  # begin_task draws every task's embeddings again
    try:
        return _study_tasks("normal" if std == 1.0 else "small_normal", seed, epochs, options)
    finally:
        gates.SMALL_NORMAL_STD = default_std


def _study_tasks(mask_init: str, seed: int, epochs: int, options: dict) -> tuple:
    tasks = digit_tasks(seed)
    torch.manual_seed(seed)
    net = hatconvert.convert(DigitsNet(), num_tasks=NUM_TASKS, mask_init=mask_init)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    accuracies = []
    for t, task in enumerate(tasks):
        data = torch.utils.data.TensorDataset(task.x_train, task.y_train)
        loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed * 10 + t))
        hatconvert.train_task(net, t, loader, optimizer, epochs=epochs, progress=False, **options)
        net.eval()
        with torch.no_grad():
            accuracies.append(accuracy(net(task.x_test, t), task.y_test))
    return min(accuracies), sum(accuracies) / NUM_TASKS, net.capacity()


def study(seeds: int = 3, epochs: list[int] = (3,)) -> None:
    """How the embedding draw, the penalty's floor, c, exact late masks and the schedule trade
    accuracy for capacity, at each training length."""
    print(f"{'setting':<30}{'epochs':>7}  per seed: min task accuracy / ACC / capacity left")
    for label, change in STUDY:
        for n in epochs:
            runs = [study_run(change, seed, n) for seed in range(seeds)]
            cells = "  ".join(f"{m:.3f}/{a:.3f}/{c:.3f}" for m, a, c in runs)
            print(f"{label:<30}{n:>7}  {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--study", action="store_true",
                        help="the learning-quality study: 3 seeds per setting")
    parser.add_argument("--study-epochs", type=int, nargs="+", default=[3],
                        help="epochs per task in --study (several: one row each)")
    args = parser.parse_args()
    if args.study:
        study(epochs=args.study_epochs)
        return
    results = run(args.epochs, args.batch_size, args.seed)
    for name, matrix in results.items():
        print(f"\n{name}: accuracy after training task i (rows) on task j (columns)")
        print("      " + "".join(f"  task{j}" for j in range(NUM_TASKS)))
        for i, row in enumerate(matrix):
            print(f"  {i}:  " + "".join(f"{a:7.3f}" for a in row))
    print(f"\n{'method':<14}{'avg acc':>9}{'BWT':>9}")
    for name, matrix in results.items():
        avg, bwt = summary(matrix)
        print(f"{name:<14}{avg:>9.4f}{bwt:>9.4f}")


if __name__ == "__main__":
    main()
