"""Mask-scale schedules: the ``s`` of ``sigmoid(s * e)`` for batch ``b`` of ``B`` in an epoch."""

from __future__ import annotations

import math

from .options import check_choice, check_s_max

__all__ = ['SCHEDULES', 'mask_scale']

SCHEDULES = ("linear", "cosine", "constant")


def mask_scale(batch: int, num_batches: int, s_max: float = 400.0, schedule: str = "linear",
               s_min: float | None = None) -> float:
    """The mask scale of batch ``batch`` (0-based) of ``num_batches``.

    ``linear`` (the paper): ``1/s_max`` on the first batch rising to ``s_max`` on the last.
    ``cosine`` (HAT-CL): high, low in the middle (masks train), high again; never below
    ``s_min`` (default ``1/s_max``). ``constant``: always ``s_max``.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < num_batches:
        raise ValueError(f"batch must be an int in [0, {num_batches}), got {batch!r}")
    check_s_max(s_max)
    check_choice("schedule", schedule, SCHEDULES)
    p = batch / (num_batches - 1) if num_batches > 1 else 1.0
    if schedule == "linear":
        return 1.0 / s_max + (s_max - 1.0 / s_max) * p
    if schedule == "cosine":
        floor = 1.0 / s_max if s_min is None else s_min
        if floor <= 0:
            raise ValueError(f"s_min must be positive, got {s_min!r}")
        return max(floor, s_max / 2.0 * math.cos(2.0 * math.pi * p) + s_max / 2.0)
    return float(s_max)  # constant
