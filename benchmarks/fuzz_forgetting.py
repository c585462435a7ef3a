"""Fuzz zero forgetting and dense-mask fidelity on random small models.

    python benchmarks/fuzz_forgetting.py --graphs 500 --seed 0

Each graph is a random program of tests/random_graphs.py (weighted layers, norms over the right
and the wrong axis, element-wise ops with random arguments, residual adds, products,
concatenations, flattening, pooling, transposes, reshapes, slices, loose parameters, a Linear
head), drawn with ``random.Random`` so that it runs without Hypothesis. For every graph:

- fidelity: ``convert(model, num_tasks=3, mask_init="dense")`` (head kept) gives, for every task,
  eval outputs equal to the original model's (``allclose(rtol=1e-5, atol=1e-6)``);
- zero forgetting: ``convert(model, num_tasks=3, num_classes=...)`` trains tasks 0, 1, 2 in turn
  (3 steps each) with one optimizer (SGD momentum 0.9 lr 0.1, Adam lr 0.05 or AdamW lr 0.05
  weight decay 0.1, drawn per graph); the eval outputs of tasks 0 and 1 after task 2 must be
  bit-identical to those recorded when each task ended.

A ``ConversionError`` counts as refused. Any other exception is a failure. Failing programs are
shrunk (ops dropped while the failure stays) and printed as Python that rebuilds them:
``check_program(Program(...), seed=S, optimizer=O)`` in tests/random_graphs.py repeats one.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from random_graphs import (OPTIMIZERS, RandomChooser, check_program, error_line,  # noqa: E402
                           generate, refusal_key, shrink)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=500, help="how many random models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the program generator")
    parser.add_argument("--max-blocks", type=int, default=4,
                        help="blocks (layer, norm, element-wise ops, structure) per program")
    parser.add_argument("--optimizer", choices=["random", *OPTIMIZERS], default="random")
    parser.add_argument("--no-shrink", action="store_true", help="print failures as drawn")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the models are tiny: 1 is fastest)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--index", type=int, nargs="+", metavar="I",
                        help="run only these graph indices (of --seed), e.g. to repeat a failure")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    counts: collections.Counter = collections.Counter()
    refusals: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    warned: collections.Counter = collections.Counter()
    failures = []
    start = time.perf_counter()
    indices = args.index if args.index else range(args.graphs)
    for n_done, i in enumerate(indices, start=1):
        rng = random.Random(args.seed * 1_000_003 + i)
        counts["tried"] += 1
        try:
            program = generate(RandomChooser(rng), max_blocks=args.max_blocks)
        except Exception as exc:  # a bug of the generator, not of hatconvert
            counts["invalid"] += 1
            print(f"\ngraph {i}: the generator failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        optimizer = rng.choice(list(OPTIMIZERS)) if args.optimizer == "random" else args.optimizer
        result = check_program(program, seed=i, optimizer=optimizer)
        if result.invalid:
            counts["invalid"] += 1
        elif result.refused and not (result.forgetting or result.fidelity or result.error):
            counts["refused"] += 1
            refusals[refusal_key(result.refused)] += 1
        else:
            counts["converted"] += 1
        counts["forgetting"] += bool(result.forgetting)
        counts["fidelity"] += bool(result.fidelity)
        counts["nonfinite"] += result.nonfinite
        counts["warned"] += bool(result.warnings)
        for w in {refusal_key(re.sub(r"(left NaN or inf in ).*", r"\1...", w))
                  for w in result.warnings}:
            warned[w[:160]] += 1
        if result.error:
            counts["error"] += 1
            errors[refusal_key(error_line(result.error))[:200]] += 1
        if not result.ok:
            failures.append((i, result))
        if not args.quiet:
            print(f"\r{n_done}/{len(indices)} graphs, {len(failures)} failing", end="",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(file=sys.stderr)

    for i, result in failures:
        shown = result if args.no_shrink else shrink(result)
        note = "" if shown is result else \
            f" (shrunk from {len(result.program)} ops to {len(shown.program)})"
        print(f"\n=== graph {i}{note}: {shown.describe()}")

    print(f"\n{counts['tried']} graphs tried (seed {args.seed}, {elapsed:.1f} s, "
          f"{elapsed / max(1, counts['tried']) * 1000:.0f} ms each)")
    print(f"  converted:            {counts['converted']}")
    print(f"  refused:              {counts['refused']}")
    for reason, n in refusals.most_common():
        print(f"    {n:4d}  {reason}")
    print(f"  forgetting failures:  {counts['forgetting']}")
    print(f"  fidelity failures:    {counts['fidelity']}")
    print(f"  other exceptions:     {counts['error']}")
    for reason, n in errors.most_common():
        print(f"    {n:4d}  {reason}")
    if counts["invalid"]:
        print(f"  invalid programs (generator bug): {counts['invalid']}")
    print(f"  non-finite outputs (compared NaN-aware): {counts['nonfinite']}")
    print(f"  graphs with warnings: {counts['warned']}")
    for w, n in warned.most_common():
        print(f"    {n:4d}  {w}")
    print(f"  failing graphs:       {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
