import pytest
import torch
from torch import nn

from lightning_prune import (
    budget_loss,
    budget_penalty,
    hard_kept_counts,
    pruned_layers,
    reparametrize,
    soft_kept_shares,
)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    reparametrize(model, temperature=0.2)
    return model


def _huber(gap: torch.Tensor, delta: float = 0.1) -> torch.Tensor:
    return torch.nn.functional.huber_loss(gap, torch.zeros_like(gap), reduction="none", delta=delta) / delta


def test_loss_is_huber_of_the_relative_gap_of_the_soft_share():
    model = _model()
    share, per_layer = soft_kept_shares(pruned_layers(model))
    assert 0 < share.item() < 1 and per_layer.shape == (2,)
    torch.testing.assert_close(budget_loss(model, keep=0.1), _huber(share / 0.1 - 1))
    torch.testing.assert_close(budget_loss(model, keep=0.1, mode="layer"), _huber(per_layer / 0.1 - 1).mean())


@pytest.mark.parametrize("kept, expected", [(0.10, 0.0), (0.105, 0.0125), (0.095, 0.0125), (0.15, 0.45), (0.03, 0.65)])
def test_penalty_is_quadratic_near_the_budget_and_linear_far_from_it(kept, expected):
    assert budget_penalty(torch.tensor(kept), keep=0.1).item() == pytest.approx(expected, abs=1e-6)


def test_penalty_gradient_is_bounded_far_from_the_budget_and_proportional_near_it():
    for kept, grad in ((0.5, 1 / 0.1), (0.102, 0.2 / 0.1), (0.098, -0.2 / 0.1)):
        share = torch.tensor(kept, dtype=torch.float64, requires_grad=True)
        budget_penalty(share, keep=0.1).backward()
        assert share.grad.item() == pytest.approx(grad, rel=1e-6)  # d/dkept = (dg/dkept = 1/keep)·clip(g/δ, ±1)


def test_gradient_shrinks_weights_when_above_budget_and_grows_them_below():
    for keep, sign in ((0.05, 1.0), (0.99, -1.0)):
        model = _model()
        budget_loss(model, keep=keep).backward()
        theta = model[0].parametrizations.weight.original
        # descent direction −grad: towards zero (|θ| down) above budget, away from zero below it
        moves_out = -(theta.grad * torch.sign(theta.detach()))
        assert (sign * moves_out <= 0).all() and (moves_out != 0).any()


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="budget mode"):
        budget_loss(model, keep=0.5, mode="per-layer")
    with pytest.raises(ValueError, match="keep share"):
        budget_loss(model, keep=0.0)
    with pytest.raises(ValueError, match="reparametrize"):
        budget_loss(nn.Linear(2, 2), keep=0.5)


def test_hard_counts_follow_the_threshold():
    model = _model()
    counts = hard_kept_counts(model)
    layer = model[0]
    theta = layer.parametrizations.weight.original
    assert counts["0"] == (int((theta.abs() / layer.parametrizations.weight[0].scale > 1.0).sum()), theta.numel())
