"""The target keep share and the gate's temperature, as pure functions of training progress in [0, 1]."""

from __future__ import annotations

import math
from typing import Literal

TargetSchedule = Literal["cubic", "linear", "constant"]


def ramp(progress: float, start: float, end: float) -> float:
    """Position in [0, 1] of ``progress`` inside the window [start, end] (0 before it, 1 after it)."""
    if end <= start:
        return 1.0 if progress >= start else 0.0
    return min(1.0, max(0.0, (progress - start) / (end - start)))


def target_keep_at(progress: float, keep: float, schedule: TargetSchedule, start: float, end: float) -> float:
    """Target keep share from 1 down to ``keep`` between the ``start`` and ``end`` shares of training.

    ``cubic`` is the gradual-pruning schedule ``keep + (1 − keep)(1 − r)³``: fast at first, gentle near the budget.

    Example:
        >>> [round(target_keep_at(p, 0.1, "cubic", 0.0, 0.4), 4) for p in (0.0, 0.2, 0.4, 1.0)]
        [1.0, 0.2125, 0.1, 0.1]
        >>> [round(target_keep_at(p, 0.1, "linear", 0.0, 0.4), 4) for p in (0.0, 0.2, 0.4)]
        [1.0, 0.55, 0.1]
    """
    if schedule == "constant":
        return keep
    r = ramp(progress, start, end)
    if schedule == "linear":
        return 1.0 - (1.0 - keep) * r
    if schedule == "cubic":
        return keep + (1.0 - keep) * (1.0 - r) ** 3
    raise ValueError(f"target_schedule must be one of {TargetSchedule.__args__}, got {schedule!r}.")


def temperature_at(progress: float, start: float, end: float, ramp_end: float) -> float:
    """The gate's temperature: geometric from ``start`` to ``end`` over ``[0, ramp_end]``, then 0 (the step gate).

    Example:
        >>> [round(temperature_at(p, 0.5, 0.02, 0.4), 4) for p in (0.0, 0.2, 0.3999, 0.4, 1.0)]
        [0.5, 0.1, 0.02, 0.0, 0.0]
    """
    if progress >= ramp_end:
        return 0.0
    return start * (end / start) ** (progress / ramp_end) if math.isfinite(progress) else start
