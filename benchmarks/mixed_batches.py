"""Throughput of mixed-task batches: ``net(x, task_id=ids)`` against one task and a loop.

For each model, a batch of ``--tasks`` tasks times ``--per-task`` samples runs three ways in eval
mode, interleaved and timed side by side in one run:
  single  the whole batch with one task id (what one-task serving costs)
  mixed   the same batch with one task id per sample (``task_id`` a ``(batch,)`` tensor)
  loop    one call per task on its ``--per-task`` samples (what users write without it)
It prints samples per second and the ratios mixed/single and mixed/loop. The goal: mixed at
least 0.8x single and, for 8 samples per task, at least 2x loop.

    python benchmarks/mixed_batches.py
    python benchmarks/mixed_batches.py --models resnet18 --img-size 224 --per-task 8
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch import nn

import hatconvert

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

MODELS = ("mlp", "resnet18", "convnext_atto", "vit_tiny")


def build(name: str, img: int, classes: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A randomly initialised model and its input shape (without the batch)."""
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * img * img, 1000), nn.ReLU(),
                             nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, classes)), \
            (3, img, img)
    import timm
    kwargs = {"img_size": img, "patch_size": max(img // 8, 2)} if name == "vit_tiny" else {}
    timm_name = "vit_tiny_patch16_224" if name == "vit_tiny" else name
    return timm.create_model(timm_name, num_classes=classes, **kwargs), (3, img, img)


def make_tasks_differ(net: hatconvert.HATNetwork) -> None:
    """Random gates and per-task copies, as after training different tasks."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "embedding" in name:
                p.normal_()
            elif "copies" in name:
                p.add_(0.1 * torch.randn_like(p))


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    model, shape = build(name, args.img_size, 10)
    net = hatconvert.convert(model, num_tasks=args.tasks, num_classes=10).eval()
    batch = args.tasks * args.per_task
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        net(x[:2], 0)
    make_tasks_differ(net)
    ids = torch.arange(args.tasks).repeat(args.per_task)  # interleaved: 0, 1, 2, 3, 0, ...
    parts = [(x[ids == t], t) for t in range(args.tasks)]
    runs = {"single": lambda: net(x, 0), "mixed": lambda: net(x, task_id=ids),
            "loop": lambda: [net(part, t) for part, t in parts]}
    with torch.no_grad():  # the warm-up call builds and checks the mixed graph once
        seconds = interleaved_medians(runs, args.rounds, args.reps)
    per_second = {k: batch / v for k, v in seconds.items()}
    return {**per_second, "mixed/single": per_second["mixed"] / per_second["single"],
            "mixed/loop": per_second["mixed"] / per_second["loop"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--per-task", type=int, default=8)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.tasks} tasks x {args.per_task} samples, {args.img_size}px, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'model':<15}{'single/s':>10}{'mixed/s':>10}{'loop/s':>10}{'mixed/single':>14}"
          f"{'mixed/loop':>12}")
    for name in args.models:
        r = measure(name, args)
        print(f"{name:<15}{r['single']:10.0f}{r['mixed']:10.0f}{r['loop']:10.0f}"
              f"{r['mixed/single']:14.2f}{r['mixed/loop']:12.2f}", flush=True)


if __name__ == "__main__":
    main()
