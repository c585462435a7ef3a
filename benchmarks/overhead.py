"""Cost of a HAT network against the plain model, measured side by side in one run.

For timm resnet18 and vit_tiny_patch16_224 at batch 32 on CPU, prints the median time of a
training step (forward, backward, SGD step) at mask scales 1, 50 and 400, of a training step of
task 1 while task 0 is protected (gradient hooks and the optimizer-step guard armed, s=50), and
of eval inference with hard gates, each as a ratio converted / plain; then the time of
hatconvert's own work around one protected step (the step hooks, the NaN check, the restore). Runs alternate between the two models so
that drifting machine load hits both alike.

    python benchmarks/overhead.py [--models resnet18 vit_tiny_patch16_224] [--batch 32] [--reps 5]
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
    return {"pre-step hook": median_ms(lambda: steps._before_any_step(optimizer, (), {})),
            "NaN/inf check of shared weights": median_ms(net._guard._zero_non_finite),
            "restore of held entries": median_ms(net._guard.restore)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny_patch16_224"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
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


if __name__ == "__main__":
    main()
