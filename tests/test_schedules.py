"""The shapes of the schedules, not only their ends: the target keep share (cubic, linear, constant) and the gate's
temperature (geometric, then the step gate), and that BudgetCallback follows the ones it is given."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_prune import BudgetCallback, LoopSettings, masked_parameters, reparametrize
from lightning_prune.schedules import target_keep_at, temperature_at

KEEP, START, END = 0.1, 0.2, 0.6  # the target moves from 1 to 0.1 between 20% and 60% of training
INSIDE = [START + (END - START) * k / 8 for k in range(9)]  # nine equally spaced points of the ramp, both ends included


def _remaining(schedule: str, progress: float) -> float:
    """Share of the way from the budget back to 1 that the target still has to go: 1 at the start, 0 at the end."""
    return (target_keep_at(progress, KEEP, schedule, START, END) - KEEP) / (1 - KEEP)


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_the_target_starts_at_one_falls_monotonically_and_stays_at_the_budget(schedule):
    before = [target_keep_at(p, KEEP, schedule, START, END) for p in (0.0, 0.1, START)]
    after = [target_keep_at(p, KEEP, schedule, START, END) for p in (END, 0.8, 1.0)]
    assert before == [1.0, 1.0, 1.0]
    assert after == pytest.approx([KEEP] * 3, abs=1e-12)
    inside = [target_keep_at(p, KEEP, schedule, START, END) for p in INSIDE]
    assert all(a > b for a, b in zip(inside, inside[1:]))


def test_the_linear_target_falls_by_equal_amounts_over_equal_spans():
    remaining = [_remaining("linear", p) for p in INSIDE]
    drops = [a - b for a, b in zip(remaining, remaining[1:])]
    assert drops == pytest.approx([1 / 8] * 8, abs=1e-12)


def test_the_cubic_target_is_the_cube_of_a_linear_ramp_fast_first():
    """Gradual pruning's schedule: the share still to go is (1 − r)³ at position r of the ramp, so its cube root falls
    by equal amounts; 7/8 of the way is done in the first half of the ramp."""
    roots = [_remaining("cubic", p) ** (1 / 3) for p in INSIDE]
    assert [a - b for a, b in zip(roots, roots[1:])] == pytest.approx([1 / 8] * 8, abs=1e-9)
    assert _remaining("cubic", (START + END) / 2) == pytest.approx(1 / 8, abs=1e-12)
    assert _remaining("cubic", START + (END - START) / 3) == pytest.approx(8 / 27, abs=1e-12)


def test_the_constant_target_is_the_budget_from_the_first_step():
    assert [target_keep_at(p, KEEP, "constant", START, END) for p in (0.0, 0.1, *INSIDE, 1.0)] == [KEEP] * 12


T_START, T_END, RAMP_END = 0.5, 0.02, 0.4


def test_the_temperature_falls_geometrically_then_is_the_step_gate():
    """Equal ratios over equal spans (a linear fall would give the arithmetic mean, 0.26, halfway, not 0.1)."""
    points = [RAMP_END * k / 8 for k in range(8)]
    temperatures = [temperature_at(p, T_START, T_END, RAMP_END) for p in points]
    assert temperatures[0] == T_START
    ratios = [b / a for a, b in zip(temperatures, temperatures[1:])]
    assert ratios == pytest.approx([(T_END / T_START) ** (1 / 8)] * 7, rel=1e-9)
    assert temperature_at(RAMP_END / 2, T_START, T_END, RAMP_END) == pytest.approx(math.sqrt(T_START * T_END), rel=1e-9)
    assert temperature_at(RAMP_END * (1 - 1e-9), T_START, T_END, RAMP_END) == pytest.approx(T_END, rel=1e-6)
    assert [temperature_at(p, T_START, T_END, RAMP_END) for p in (RAMP_END, 0.7, 1.0)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("schedule", ["cubic", "linear", "constant"])
def test_the_callback_follows_its_schedule_and_sets_every_masks_temperature(schedule):
    """Halfway up the ramp of a 100-step run: the target of the schedule chosen, the temperature set in every mask."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    reparametrize(model)
    loop = LoopSettings(temperature_start=T_START, temperature_end=T_END)
    callback = BudgetCallback(sparsity=1 - KEEP, target_end=0.6, target_schedule=schedule, loop=loop, total_steps=100)
    callback._attach_state(model)
    callback._total = 100
    callback._apply_schedules(30)
    expected_remaining = {"cubic": 1 / 8, "linear": 1 / 2, "constant": 0.0}[schedule]
    assert (callback.target_keep - KEEP) / (1 - KEEP) == pytest.approx(expected_remaining, abs=1e-9)
    halfway = math.sqrt(T_START * T_END)  # the temperature is halfway along its geometric fall
    assert callback.temperature == pytest.approx(halfway, rel=1e-9)
    assert all(float(p.mask.temperature) == pytest.approx(halfway, rel=1e-6) for p in masked_parameters(model))
    callback._apply_schedules(60)  # the ramp's end: the budget, and the step gate
    assert callback.target_keep == pytest.approx(KEEP, abs=1e-12) and callback.temperature == 0.0
    assert all(p.mask.step_gate for p in masked_parameters(model))
