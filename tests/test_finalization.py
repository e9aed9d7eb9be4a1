import pytest
import torch
from torch import nn

from lightning_prune import budget_count, finalize, masked_parameters, reparametrize


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 33), nn.Linear(33, 7))
    reparametrize(model)
    return model


def _kept(model):
    return {layer.name: int(layer.mask.kept.sum()) for layer in masked_parameters(model)}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.98, 0.99, 0.999])
@pytest.mark.parametrize("mode", ["global", "layer"])
def test_finalize_keeps_exactly_the_budget_count_in_both_modes(sparsity, mode):
    model = _model()
    total = sum(layer.numel for layer in masked_parameters(model))
    result = finalize(model, sparsity, min_layer_keep=0.0, mode=mode)
    assert result.kept == round((1 - sparsity) * total) == budget_count(total, sparsity)
    assert sum(_kept(model).values()) == result.kept
    assert all(bool(layer.mask.hard) for layer in masked_parameters(model))
    # the network now computes with θ ⊙ M exactly
    for layer in masked_parameters(model):
        torch.testing.assert_close(layer.module.weight, layer.latent * layer.mask.kept)


def test_global_mode_keeps_the_largest_normalised_magnitudes():
    model = _model()
    scores = torch.cat([layer.mask.score(layer.latent).flatten() for layer in masked_parameters(model)])
    finalize(model, 0.9)
    kept = torch.cat([layer.mask.kept.flatten() for layer in masked_parameters(model)])
    assert scores[kept].min() >= scores[~kept].max()


def test_ties_are_broken_deterministically_by_position():
    model = nn.Sequential(nn.Linear(10, 10))
    reparametrize(model)
    layer = masked_parameters(model)[0]
    with torch.no_grad():
        layer.latent.fill_(0.5)  # every score equal
    finalize(model, 0.75)
    flat = layer.mask.kept.flatten()
    assert flat[:25].all() and not flat[25:].any()
    again = nn.Sequential(nn.Linear(10, 10))
    reparametrize(again)
    with torch.no_grad():
        masked_parameters(again)[0].latent.fill_(0.5)
    finalize(again, 0.75)
    assert torch.equal(masked_parameters(again)[0].mask.kept, layer.mask.kept)


def test_floor_keeps_every_layer_alive():
    model = _model()
    with torch.no_grad():  # make the first conv the weakest by far: a global cut would empty it
        masked_parameters(model)[0].latent.mul_(1e-3)
    finalize(_clone_and_keep := model, 0.95, min_layer_keep=0.0)
    assert _kept(_clone_and_keep)["0.weight"] == 0
    model = _model()
    with torch.no_grad():
        masked_parameters(model)[0].latent.mul_(1e-3)
    result = finalize(model, 0.95, min_layer_keep=0.02)
    kept = _kept(model)
    total = sum(layer.numel for layer in masked_parameters(model))
    assert result.kept == round(0.05 * total)
    for layer in masked_parameters(model):
        assert kept[layer.name] >= max(1, -(-0.02 * layer.numel // 1))


def test_floor_larger_than_budget_is_an_error():
    with pytest.raises(ValueError, match="min_layer_keep"):
        finalize(_model(), 0.99, min_layer_keep=0.5)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        finalize(_model(), sparsity)
