"""Cost of a HAT network against the plain model, measured side by side in one run.

For timm resnet18 and vit_tiny_patch16_224 at batch 32 on CPU, prints the median time of a
training step (forward, backward, SGD step) at mask scales 1, 50 and 400, of a training step of
task 1 while task 0 is protected (gradient hooks and the optimizer-step guard armed, s=50), and
of eval inference with hard gates, each as a ratio converted / plain; then the time of
hatconvert's own work around one protected step (the step hooks, the gradient-rate hooks, the
NaN check, the restore). Runs alternate between the two models so that drifting machine load
hits both alike.

Then the memory protection holds while a task trains, for timm resnet50 and vit_small (AdamW,
a few steps of random 64 px images per task): after 1 and after 4 trained tasks, the bytes the
armed guard holds (``Guard.nbytes``: held values, their positions, the hooks' factors) as a
ratio to the parameter memory, next to the fraction of all parameter entries that are
protected. The goal: at most that fraction plus 0.10. (Process memory is no measure here: the
allocator hands arming the memory the last step's activations left free.)

    python benchmarks/overhead.py [--models resnet18 vit_tiny_patch16_224] [--batch 32] [--reps 5]
                                  [--memory-models resnet50 vit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import hatconvert


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def train_step(model, x, y, opt, **kw):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x, **kw), y)
        loss.backward()
        opt.step()
    return step


def infer(model, x, **kw):
    def run():
        with torch.inference_mode():
            model(x, **kw)
    return run


def side_by_side(plain_fn, hat_fn, reps: int) -> tuple[float, float]:
    plain_fn(), hat_fn()  # warm-up
    plain, hat = [], []
    for _ in range(reps):
        plain += timed(plain_fn, 1)
        hat += timed(hat_fn, 1)
    return statistics.median(plain), statistics.median(hat)


def guard_costs(net, optimizer, reps: int) -> dict[str, float]:
    """hatconvert's own work around one optimizer step while task 0 is held, timed directly
    (the side-by-side ratios above are noisier than these few milliseconds)."""
    from hatconvert import steps

    def median_ms(fn) -> float:
        return statistics.median(timed(fn, max(reps, 5) * 4)) * 1e3
    hooked = [(p, list(p._backward_hooks.values())) for p in net.parameters()
              if getattr(p, "_backward_hooks", None)]
    grads = [torch.randn_like(p) for p, _ in hooked]

    def rate_hooks() -> None:
        for (_, hooks), grad in zip(hooked, grads):
            for hook in hooks:
                hook(grad)
    return {"pre-step hook": median_ms(lambda: steps._before_any_step(optimizer, (), {})),
            "gradient-rate hooks": median_ms(rate_hooks),
            "NaN/inf check of shared weights": median_ms(net._guard._zero_non_finite),
            "restore of held entries": median_ms(net._guard.restore)}


def protection_memory(name: str, after: list[int], steps: int = 2) -> list[tuple]:
    """(tasks trained, protected fraction of all parameter entries, guard bytes / params)."""
    torch.manual_seed(0)
    net = hatconvert.convert(timm.create_model(name, num_classes=10, img_size=64)
                             if "vit" in name else timm.create_model(name, num_classes=10),
                             num_tasks=max(after) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    param_count = sum(p.numel() for p in net.parameters())
    rows = []
    net.train()
    for t in range(max(after) + 1):
        net.begin_task(t)
        if t in after:
            guard = net._guard
            gated = {id(w) for w in guard.shared.values()}
            protected = sum(h.reference.numel() for h in guard.held if id(h.tensor) in gated)
            rows.append((t, protected / param_count, guard.nbytes() / param_bytes))
        for b in range(steps):
            loss = F.cross_entropy(net(x, t, hatconvert.mask_scale(b, steps)), y) \
                + net.regularization(t, hatconvert.mask_scale(b, steps))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_task()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny_patch16_224"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-models", nargs="*",
                        default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--memory-after", nargs="+", type=int, default=[1, 4],
                        help="measure protection memory after this many trained tasks")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'model':<24}{'measure':<22}{'plain ms':>10}{'HAT ms':>10}{'ratio':>8}")
    for name in args.models:
        plain = timm.create_model(name, num_classes=10)
        net = hatconvert.convert(plain, num_tasks=5)
        x = torch.randn(args.batch, 3, 224, 224)
        y = torch.randint(0, 10, (args.batch,))
        plain.train(), net.train()
        opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3)
        opt_h = torch.optim.SGD(net.parameters(), lr=1e-3)
        rows = []
        for s in (1.0, 50.0, 400.0):
            rows.append((f"train step s={s:g}", *side_by_side(
                train_step(plain, x, y, opt_p), train_step(net, x, y, opt_h, task_id=1,
                                                           mask_scale=s), args.reps)))
        # Task 1 with task 0 protected: gradient hooks and the optimizer-step guard are armed.
        net.begin_task(0)
        net.end_task()
        net.begin_task(1)
        rows.append(("train, task 0 held", *side_by_side(
            train_step(plain, x, y, opt_p), train_step(net, x, y, opt_h, task_id=1,
                                                       mask_scale=50.0), args.reps)))
        costs = guard_costs(net, opt_h, args.reps)
        net.end_task()
        plain.eval(), net.eval()
        rows.append(("eval hard gates", *side_by_side(infer(plain, x), infer(net, x, task_id=1),
                                                      args.reps)))
        for label, tp, th in rows:
            print(f"{name:<24}{label:<22}{tp * 1e3:>10.1f}{th * 1e3:>10.1f}{th / tp:>8.3f}")
        held_step = rows[3][2]
        for label, ms in costs.items():
            print(f"{name:<24}{label:<32}{ms:>10.2f} ms  ({100 * ms / 1e3 / held_step:.2f}% of "
                  "the held step)")
    if args.memory_models:
        print(f"\n{'model':<24}{'tasks':>6}{'protected':>11}{'guard/params':>14}{'goal':>9}")
    for name in args.memory_models:
        for tasks, fraction, guard in protection_memory(name, args.memory_after):
            met = "met" if guard <= min(fraction + 0.10, 1.10) else "not met"
            print(f"{name:<24}{tasks:>6}{fraction:>11.3f}{guard:>14.3f}{met:>9}")


if __name__ == "__main__":
    main()
