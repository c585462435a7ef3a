"""Side-by-side timing for the benchmarks: several ways of doing one thing, interleaved."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, reps: int = 1
                        ) -> dict[str, float]:
    """Seconds per call of each run: after one warm-up call each, ``rounds`` rounds that time
    every run in turn (``reps`` calls each), so drift on a busy machine hits all alike; the
    median round."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[key].append((time.perf_counter() - start) / reps)
    return {k: statistics.median(v) for k, v in times.items()}
