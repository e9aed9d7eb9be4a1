"""The budget's arithmetic: exact counts, the margin gap, the budget step, and the controller."""

from decimal import Decimal

import pytest
import torch
from torch import nn

from lightning_prune import budget_count, masked_parameters, reparametrize
from lightning_prune.budget import budget_step, hard_kept_counts, margin_gap, optimizer_metric
from lightning_prune.budget_controller import BudgetController


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


def test_a_growing_step_is_at_most_lambda_in_a_small_scale_tensors_own_units():
    """In global mode every weight moves by λ·s̄; a growing step is capped at λ·s_i, so the zeroed weights of a tensor
    whose scale is far under the mean do not jump across the threshold together (MobileNetV3's classifier)."""
    from lightning_prune.budget_loop import BudgetLoop, LoopSettings

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.mul_(0.1)  # scale 10x under the other tensor's
    reparametrize(model)
    params = masked_parameters(model)
    loop = BudgetLoop(LoopSettings(), "global", 0.0, keep=0.5)
    loop.attach(params)
    assert float(loop._unit[1]) > 1.5  # the premise: a step in the common unit is large in this tensor's units
    loop.latest_lambda = torch.tensor([-0.2])
    with torch.no_grad():
        params[1].latent.view(-1)[:100] = 0.0
    captured = {}
    import lightning_prune.budget_loop as budget_loop

    original = budget_loop.budget_step
    budget_loop.budget_step = lambda ps, rates, *a: captured.setdefault("rates", rates)
    try:
        loop.controller.update = lambda gap, *rest: torch.tensor([-0.2])
        loop.step(torch.optim.SGD(model.parameters(), lr=0.1), 1, target_keep=0.5)
    finally:
        budget_loop.budget_step = original
    assert captured["rates"].tolist() == pytest.approx([-0.2 * float(loop._unit[0]), -0.2])


def test_controller_engages_from_below_once_the_target_reaches_the_share_it_started_with():
    """Weights that fall under the threshold by themselves (SGD lr 0.1 with weight decay) before the target comes down:
    the loop engages when the target reaches the share of its first step, and grows them back."""
    controller = BudgetController(response_steps=10, max_step=1.0)
    below = torch.tensor([-0.3])
    assert float(controller.update(below, torch.tensor([0.45]), 0.9)) == 0.0  # the target is above the start share
    assert float(controller.update(below, torch.tensor([0.20]), 0.6)) == 0.0  # the share fell; the target is still above
    state = controller.state_dict()  # not engaged yet: the first step's share is what it keeps
    lam = float(controller.update(below, torch.tensor([0.15]), 0.45))  # the target reaches the first step's share
    assert lam == pytest.approx(-0.3 * 0.2 - 0.3 * 0.01)  # engaged: the weights grow
    restored, fresh = BudgetController(response_steps=10), BudgetController(response_steps=10)
    restored.load_state_dict(state)
    assert float(restored.update(below, torch.tensor([0.15]), 0.45)) == pytest.approx(lam)  # a resume engages too
    assert float(fresh.update(below, torch.tensor([0.15]), 0.45)) == 0.0  # without it, 0.15 would be the start


def test_controller_engages_once_the_target_reaches_the_budget_under_the_start_share():
    """At sparsity 0.5 the target (0.5) never falls to a start share of 0.45: the loop engages when the target has
    reached the budget, so a share that fell under it is grown back there too."""
    controller = BudgetController(response_steps=10, max_step=1.0)
    below = torch.tensor([-0.3])
    assert float(controller.update(below, torch.tensor([0.45]), 0.8, final_keep=0.5)) == 0.0
    assert float(controller.update(below, None, 0.51, final_keep=0.5)) == 0.0
    assert float(controller.update(below, None, 0.5, final_keep=0.5)) < 0


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
        p.latent.mul_(0.95 / float(p.mask.score(p.latent).max()))  # every score under c = 1: nothing in use
    assert int(p.mask.hard_gate(p.latent).sum()) == 0
    assert int((p.mask.score(p.latent) > 0.5).sum()) > 50  # the premise: the floor's weights are above the lower bound
    threshold = floor_threshold(p, 50, 1.0)
    assert float(threshold) < 1.0
    p.mask.threshold.copy_(threshold)
    kept = p.mask.hard_gate(p.latent)
    assert int(kept.sum()) == 50
    scores = p.mask.score(p.latent)
    assert float(scores[kept].min()) >= float(scores[~kept].max())  # the 50 largest
    q = params[0]  # a tensor with more than its floor above c keeps c
    assert float(floor_threshold(q, 50, 1.0)) == 1.0


def test_a_collapsed_tensor_does_not_put_all_its_weights_in_use_at_its_floor():
    """Weights all at 0 but the optimizer's noise: the floor threshold stays at half of c, not at the noise (or at 0
    on ties), so the next steps' noise cannot lift the whole tensor into use (MobileNetV3's squeeze-excitation)."""
    from lightning_prune.budget import FLOOR_THRESHOLD_MIN, floor_threshold

    p = masked_parameters(_model())[1]
    with torch.no_grad():
        p.latent.zero_()
        p.latent.view(-1)[:10] = 1e-3 * p.mask.scale  # a few weights just off zero
    threshold = floor_threshold(p, 50, 1.0)
    assert float(threshold) == FLOOR_THRESHOLD_MIN
    with torch.no_grad():
        p.latent.add_(torch.randn_like(p.latent) * 0.05 * p.mask.scale)  # one more step of noise
    p.mask.threshold.copy_(threshold)
    assert int(p.mask.hard_gate(p.latent).sum()) == 0


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


def _small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))  # 5,120 weights: every one is in the margin sample
    reparametrize(model)
    return model


def _adam_with_moments(params, seed=0):
    """An Adam whose running means of squared gradients are set by hand (log-uniform over four decades)."""
    optimizer = torch.optim.Adam([p.latent for p in params])
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        optimizer.state[p.latent]["exp_avg_sq"] = 10 ** (-4 * torch.rand(p.latent.shape, generator=generator))
    return optimizer


def test_optimizer_metric_is_none_for_sgd_and_before_adams_first_step():
    model = _small_model()
    params = masked_parameters(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters())
    assert optimizer_metric(params, adam) is None  # no state yet: the uniform step
    for optimizer in (sgd, adam):
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
    assert optimizer_metric(params, sgd) is None  # momentum buffers are not a metric: SGD steps every weight alike
    metric = optimizer_metric(params, adam)
    assert all(v is adam.state[p.latent]["exp_avg_sq"] for v, p in zip(metric.second_moments, params))


def test_optimizer_metric_reference_is_the_median_root_of_the_weights_near_the_threshold():
    params = masked_parameters(_small_model())
    optimizer = _adam_with_moments(params)
    # most weights of the first tensor never had a gradient (a 3x3 convolution over a 1x1 map: eight taps of nine)
    optimizer.state[params[0].latent]["exp_avg_sq"].view(-1)[:3000] = 0.0
    scores = torch.cat([p.mask.score(p.latent).flatten() for p in params])
    roots = torch.cat([optimizer.state[p.latent]["exp_avg_sq"].sqrt().flatten() for p in params])
    near, moving = (scores > 1 / 1.5) & (scores < 1.5), roots > 0
    assert 0 < int(near.sum()) < scores.numel()
    assert float(roots[near].median()) == 0  # the zeros would set the reference without the rule
    metric = optimizer_metric(params, optimizer)
    assert float(metric.reference) == pytest.approx(float(roots[near & moving].median()))
    assert float(metric.reference) != pytest.approx(float(roots[moving].median()), rel=0.02)  # not that of all
    for p in params:  # no weight near the threshold: the median of all those that moved
        p.mask.threshold.fill_(1e6)
    assert float(optimizer_metric(params, optimizer).reference) == pytest.approx(float(roots[moving].median()))


def test_budget_step_in_the_metric_shrinks_each_weight_in_proportion_to_its_optimizer_step():
    params = masked_parameters(_small_model())
    optimizer = _adam_with_moments(params)
    first = optimizer.state[params[0].latent]["exp_avg_sq"]
    first.view(-1)[:10] = 0.0  # weights that never had a gradient
    metric = optimizer_metric(params, optimizer)
    before = [p.latent.detach().clone() for p in params]
    budget_step(params, torch.tensor([0.02, 0.0]), metric=metric)
    v, old, new = first, before[0], params[0].latent.detach()
    expected = (old.abs() - 0.02 * params[0].mask.scale * metric.reference / v.sqrt()).clamp_min(0)
    torch.testing.assert_close(new.abs().view(-1)[10:], expected.view(-1)[10:])
    assert (new.view(-1)[:10] == 0).all()  # no gradient at all: the step takes them to 0
    torch.testing.assert_close(params[1].latent.detach(), before[1])  # λ = 0: unchanged, and finite where v = 0
    # weights with four times the squared gradient lose half as much
    big, small = v > 4 * v.median(), (v < v.median() / 4) & (v > 0)
    lost = old.abs() - new.abs()
    unclipped = new.abs() > 0
    assert float(lost[big & unclipped].mean()) < float(lost[small & unclipped].mean()) / 2
    # a growing step (λ < 0) is uniform
    before = params[1].latent.detach().clone()
    budget_step(params, torch.tensor([0.0, -0.1]), metric=metric)
    torch.testing.assert_close(params[1].latent.detach().abs(), before.abs() + 0.1 * params[1].mask.scale)
