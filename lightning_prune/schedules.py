"""Schedules of λ, temperature and target keep share, as pure functions of training progress in [0, 1]."""

from __future__ import annotations

import math

LAMBDA_SCHEDULES = ("constant", "linear", "cosine")
TEMPERATURE_SCHEDULES = ("constant", "linear", "exponential", "cosine")
TARGET_SCHEDULES = ("constant", "linear", "cubic")


def ramp(progress: float, start: float, end: float) -> float:
    """Position in [0, 1] of ``progress`` inside the window [start, end] (0 before it, 1 after it)."""
    if end <= start:
        return 1.0 if progress >= start else 0.0
    return min(1.0, max(0.0, (progress - start) / (end - start)))


def lambda_at(progress: float, lambda_max: float, schedule: str, warmup: float) -> float:
    """λ: ``constant`` at λ_max, or rising from 0 to λ_max over the first ``warmup`` share of training
    (``linear`` or half-``cosine``), then constant."""
    if schedule == "constant":
        return lambda_max
    r = ramp(progress, 0.0, warmup)
    if schedule == "linear":
        return lambda_max * r
    if schedule == "cosine":
        return lambda_max * 0.5 * (1.0 - math.cos(math.pi * r))
    raise ValueError(f"lambda_schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}.")


def temperature_at(progress: float, start: float, end: float, schedule: str) -> float:
    """Temperature from ``start`` down to ``end`` over the whole training (``exponential`` = geometric)."""
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "exponential":
        return start * (end / start) ** progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}.")


def target_keep_at(progress: float, keep: float, schedule: str, start: float, end: float) -> float:
    """Target keep share from 1 down to ``keep`` between the ``start`` and ``end`` shares of training.

    ``cubic`` is the gradual-pruning schedule ``keep + (1 − keep)(1 − r)³``: fast at first, gentle near the budget.
    """
    if schedule == "constant":
        return keep
    r = ramp(progress, start, end)
    if schedule == "linear":
        return 1.0 - (1.0 - keep) * r
    if schedule == "cubic":
        return keep + (1.0 - keep) * (1.0 - r) ** 3
    raise ValueError(f"target_schedule must be one of {TARGET_SCHEDULES}, got {schedule!r}.")
