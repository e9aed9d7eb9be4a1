import pytest
import torch
from torch import nn

from lightning_prune import budget_loss, hard_kept_counts, pruned_layers, reparametrize, soft_kept_shares


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    reparametrize(model, temperature=0.2)
    return model


def test_loss_is_relative_squared_gap_of_the_soft_share():
    model = _model()
    share, per_layer = soft_kept_shares(pruned_layers(model))
    assert 0 < share.item() < 1 and per_layer.shape == (2,)
    torch.testing.assert_close(budget_loss(model, keep=0.1), ((share - 0.1) / 0.1) ** 2)
    torch.testing.assert_close(budget_loss(model, keep=0.1, mode="layer"), (((per_layer - 0.1) / 0.1) ** 2).mean())


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
