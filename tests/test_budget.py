"""The budget's arithmetic: exact counts, the margin gap, the budget step, and the controller."""

from decimal import Decimal

import pytest
import torch
from torch import nn

from lightning_prune import BudgetController, budget_count, budget_step, margin_gap, masked_parameters, reparametrize
from lightning_prune.budget import hard_kept_counts


@pytest.mark.parametrize("total", [15, 35, 135, 1000, 851008])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.98, 0.99, 0.7, 0.5])
def test_budget_count_is_the_decimal_product_rounded_half_to_even(total, sparsity):
    exact = (Decimal(1) - Decimal(str(sparsity))) * total
    assert budget_count(total, sparsity) == int(exact.to_integral_value(rounding="ROUND_HALF_EVEN"))


def test_budget_count_has_no_binary_float_off_by_one():
    # 1 - 0.9 is 0.09999999999999998 in binary floating point: round(0.0999..*15) = 1, but 1.5 rounds half-even to 2
    assert [budget_count(n, 0.9) for n in (15, 35, 135)] == [2, 4, 14]


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
    reparametrize(model)
    return model


def _score_quantile(params, keep):
    scores = torch.cat([p.mask.score(p.latent).flatten() for p in params])
    return torch.sort(scores, descending=True).values[round(keep * scores.numel())]


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.02])
def test_margin_gap_estimates_the_score_at_the_budget_minus_the_threshold(keep):
    params = masked_parameters(_model())
    gap, shares, _ = margin_gap(params, keep, "global", seed=3)
    exact = _score_quantile(params, keep) - 1.0
    assert gap.shape == (1,)
    assert float(gap) == pytest.approx(float(exact), abs=0.05)
    counts = hard_kept_counts(params)
    for share, (kept, numel) in zip(shares.tolist(), counts.values()):
        assert share == pytest.approx(kept / numel, abs=0.03)


def test_margin_gap_in_layer_mode_is_per_tensor_and_the_same_for_the_same_seed():
    params = masked_parameters(_model())
    gap, _, _ = margin_gap(params, 0.1, "layer", seed=1)
    assert gap.shape == (2,)
    for g, p in zip(gap.tolist(), params):
        assert g == pytest.approx(float(_score_quantile([p], 0.1)) - 1.0, abs=0.05)
    torch.testing.assert_close(margin_gap(params, 0.1, "layer", seed=1)[0], gap)


def test_budget_step_is_the_proximal_step_of_the_scaled_l1_norm():
    params = masked_parameters(_model())
    before = [p.latent.detach().clone() for p in params]
    rates = torch.tensor([0.3, -0.1])
    budget_step(params, rates)
    for p, theta, rate in zip(params, before, rates):
        expected = torch.sign(theta) * (theta.abs() - rate * p.mask.scale).clamp_min(0)
        torch.testing.assert_close(p.latent.detach(), expected)
    assert (params[0].latent == 0).any()  # weights under λ·s reach 0 and stop there (their sign is not flipped)


def test_controller_waits_for_the_target_then_holds_it_from_both_sides():
    controller = BudgetController(response_steps=10, max_step=1.0)
    assert float(controller.update(torch.tensor([-0.4]))) == 0.0  # target still above the share: no pressure
    assert float(controller.update(torch.tensor([0.2]))) == pytest.approx(0.2 * 0.2 + 0.2 * 0.01)
    assert float(controller.update(torch.tensor([-0.2]))) < 0  # engaged: under the target, the weights grow
    state = controller.state_dict()
    restored = BudgetController(response_steps=10)
    restored.load_state_dict(state)
    gap = torch.tensor([0.05])
    assert float(restored.update(gap)) == pytest.approx(float(controller.update(gap)))


def test_controller_closes_the_gap_of_a_unit_gain_plant_with_a_constant_pull():
    # the weights at the margin: score q moves by -λ per step, and the task pulls them up by 0.05 per step
    controller, q = BudgetController(response_steps=10), 1.5
    for _ in range(200):
        q += 0.05 - float(controller.update(torch.tensor([q - 1.0])))
    assert q == pytest.approx(1.0, abs=1e-3)
    assert float(controller.integral) == pytest.approx(0.05, abs=1e-3)  # the integral holds the pull


def test_controller_refuses_bad_settings():
    with pytest.raises(ValueError, match="response_steps"):
        BudgetController(response_steps=0.5)
    with pytest.raises(ValueError, match="max_step"):
        BudgetController(max_step=0)


def test_floor_threshold_puts_exactly_the_floors_largest_weights_in_use():
    from lightning_prune.budget import floor_threshold

    params = masked_parameters(_model())
    p = params[1]
    with torch.no_grad():
        p.latent.mul_(0.01)  # every score far under c = 1: nothing in use
    assert int(p.mask.hard_gate(p.latent).sum()) == 0
    threshold = floor_threshold(p, 50, 1.0)
    assert float(threshold) < 1.0
    p.mask.threshold.copy_(threshold)
    kept = p.mask.hard_gate(p.latent)
    assert int(kept.sum()) == 50
    scores = p.mask.score(p.latent)
    assert float(scores[kept].min()) >= float(scores[~kept].max())  # the 50 largest
    q = params[0]  # a tensor with more than its floor above c keeps c
    assert float(floor_threshold(q, 50, 1.0)) == 1.0


def test_margin_gap_takes_the_floor_weights_under_the_threshold_out_of_the_target():
    params = masked_parameters(_model())
    with torch.no_grad():
        params[1].latent.mul_(0.01)  # the small tensor: nothing above c, so its floor is kept under c by the cut
    floor = 1000
    plain = margin_gap(params, 0.1, "global", seed=0, threshold=1.0).gap
    with_floor = margin_gap(params, 0.1, "global", seed=0, threshold=1.0, floors=[0, floor]).gap
    total = sum(p.numel for p in params)
    exact = _score_quantile([params[0]], (0.1 * total - floor) / params[0].numel) - 1.0
    assert float(with_floor) == pytest.approx(float(exact), abs=0.05)
    assert float(with_floor) > float(plain)  # fewer weights may stay above c


def test_the_trimmed_budget_step_leaves_the_largest_weights_alone():
    params = masked_parameters(_model())
    sample = margin_gap(params, 0.1, "global", seed=0, threshold=1.0, exempt=0.05)
    exact = _score_quantile(params, 0.05)
    assert float(sample.exempt_above) == pytest.approx(float(exact), rel=0.05)
    before = [p.latent.detach().clone() for p in params]
    budget_step(params, torch.full((2,), 0.2), sample.exempt_above)
    for p, old in zip(params, before):
        exempt = p.mask.score(old) >= sample.exempt_above
        assert exempt.any() and (~exempt).any()
        assert torch.equal(p.latent[exempt], old[exempt])  # the largest: untouched
        shrunk = (old.abs() - 0.2 * p.mask.scale).clamp_min(0)
        torch.testing.assert_close(p.latent.abs()[~exempt], shrunk[~exempt])
    assert float(margin_gap(params, 0.1, "global", seed=0).exempt_above) == float("inf")  # none by default
