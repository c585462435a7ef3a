"""What pruning buys: one task's pruned ``.pt2`` program against the task's unpruned export.

Each model is converted and trained on a few tasks of data this script makes (class templates
plus noise, so a task is learnable in a few dozen steps) with HAT's sparsity penalty, one AdamW
kept across tasks. For the last task, ``hatconvert.export(net, t, path, prune=True)`` is
compared side by side in one run with the unpruned export: ``hatconvert.export(net, t)``'s
weights loaded into the original timm model, run as a ``torch.export`` program too. Parameters,
FLOPs (torch's FlopCounterMode) and CPU latency (median of ``--reps`` rounds, alternating) are
given as pruned / unpruned, next to the fraction of gated units the task uses. The goal:
latency ratio <= FLOPs ratio + 0.10. The pruned program also cuts convolution taps that read
only padding (conv_taps.py); the last column times the unpruned export with the same cut, so
that the units' share of the gain shows on its own.

    python benchmarks/pruned_export.py
    python benchmarks/pruned_export.py --models resnet18 --img-size 64 --c 2.0
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

import hatconvert
from hatconvert.conv_taps import without_padding_taps

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

MODELS = {
    "resnet18": lambda img: ("resnet18", {}),
    "convnext_atto": lambda img: ("convnext_atto", {}),
    "vit_tiny": lambda img: ("vit_tiny_patch16_224", {"img_size": img, "patch_size": img // 8}),
}


def task_data(t: int, classes: int, n: int, img: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    templates = torch.randn(classes, 3, img, img, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return templates[y] + 0.8 * torch.randn(n, 3, img, img, generator=g), y


def build(name: str, args: argparse.Namespace):
    import timm
    timm_name, kwargs = MODELS[name](args.img_size)
    return timm.create_model(timm_name, num_classes=args.classes, **kwargs)


def trained(name: str, args: argparse.Namespace) -> hatconvert.HATNetwork:
    torch.manual_seed(0)
    net = hatconvert.convert(build(name, args), num_tasks=args.tasks, num_classes=args.classes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    for t in range(args.tasks):
        x, y = task_data(t, args.classes, args.batch * args.steps, args.img_size)
        loader = list(zip(x.split(args.batch), y.split(args.batch)))
        hatconvert.train_task(net, t, loader, optimizer, epochs=args.epochs, c=args.c,
                              progress=False)
    return net.eval()


def unpruned(net: hatconvert.HATNetwork, name: str, args: argparse.Namespace, x: torch.Tensor,
             cut_taps: bool = False) -> torch.nn.Module:
    """The task's plain export in the original model, as a ``torch.export`` program."""
    model = build(name, args)
    model.load_state_dict(hatconvert.export(net, args.tasks - 1))
    model.eval()
    if cut_taps:
        cut_padding_taps(model, x)
    return torch.export.export(model, (x,)).module()


def cut_padding_taps(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Every convolution of ``model`` with the taps that read only padding cut, for ``x``."""
    shapes, hooks = {}, []

    def record(path: str, args: tuple) -> None:
        shapes.setdefault(path, tuple(args[0].shape))

    for path, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, path=path: record(path, args)))
    model(x)
    for h in hooks:
        h.remove()
    for path, shape in shapes.items():
        owner, _, attr = path.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        setattr(parent, attr, without_padding_taps(getattr(parent, attr), shape))


def flops(module, x) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    net = trained(name, args)
    with torch.no_grad():
        return compare(net, name, args)


def compare(net: hatconvert.HATNetwork, name: str, args: argparse.Namespace
            ) -> dict[str, float]:
    t = args.tasks - 1
    x = torch.randn(args.eval_batch, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        hatconvert.export(net, t, f"{tmp}/pruned.pt2", prune=True)
        pruned = torch.export.load(f"{tmp}/pruned.pt2").module()
    full, cut = unpruned(net, name, args, x), unpruned(net, name, args, x, cut_taps=True)
    masks = net.masks(t)
    used = float(sum(m.sum() for m in masks.values()) / sum(m.numel() for m in masks.values()))
    params = [sum(p.numel() for p in m.parameters()) for m in (pruned, full)]
    flop = [flops(m, x) for m in (pruned, full, cut)]
    runs = {"pruned": pruned, "full": full, "cut": cut}
    if args.compile:  # inductor, as AOTInductor would build each program for deployment
        runs = {k: torch.compile(m, dynamic=False) for k, m in runs.items()}
    lat = interleaved_medians({k: lambda m=m: m(x) for k, m in runs.items()}, args.reps)
    assert torch.allclose(pruned(x), net(x, t), rtol=1e-4, atol=1e-4)
    assert torch.allclose(full(x), net(x, t), rtol=1e-4, atol=1e-4)
    return {"units used": used, "params": params[0] / params[1], "flops": flop[0] / flop[1],
            "latency": lat["pruned"] / lat["full"], "full ms": lat["full"] * 1e3,
            "vs cut": lat["pruned"] / lat["cut"], "cut ms": lat["cut"] * 1e3,
            "flops vs cut": flop[0] / flop[2]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="batches per task and epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--c", type=float, default=0.75, help="the sparsity penalty's weight")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--compile", action="store_true",
                   help="time the programs compiled by torch.compile (inductor) instead of eager")
    args = p.parse_args(argv)
    mode = "compiled" if args.compile else "eager"
    print(f"{args.tasks} tasks of {args.steps * args.batch} samples x {args.epochs} epochs, "
          f"{args.img_size}px, c={args.c}; latency at batch {args.eval_batch}, "
          f"{torch.get_num_threads()} threads, {mode}; ratios pruned / unpruned program of the "
          "last task")
    print(f"{'model':<15}{'units used':>11}{'params':>9}{'FLOPs':>8}{'latency':>9}"
          f"{'unpruned ms':>13}{'| vs taps cut: FLOPs':>21}{'latency':>9}{'ms':>7}")
    for name in args.models:
        r = measure(name, args)
        print(f"{name:<15}{r['units used']:11.3f}{r['params']:9.3f}{r['flops']:8.3f}"
              f"{r['latency']:9.3f}{r['full ms']:13.1f}{r['flops vs cut']:21.3f}"
              f"{r['vs cut']:9.3f}{r['cut ms']:7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
