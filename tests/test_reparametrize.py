import pytest
import torch
from torch import nn

from lightning_prune import is_reparametrized, masked_parameters, reparametrize, reparametrize_like
from lightning_prune.backbones import VGG19, Conv4, ResNet18


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "make", [lambda: Conv4(width=4, hidden=8), lambda: VGG19(width_multiplier=0.0625), lambda: ResNet18(width=4)]
)
def test_every_conv_and_linear_weight_is_wrapped_with_equal_parameter_count(make):
    model = make()
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    before = _count(model)
    names = reparametrize(model)
    assert names == expected
    assert _count(model) == before
    assert [layer.name for layer in masked_parameters(model)] == expected
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_second_call_is_a_no_op():
    model = Conv4(width=4, hidden=8)
    reparametrize(model)
    latents = [layer.latent for layer in masked_parameters(model)]
    assert reparametrize(model) == []
    assert [layer.latent for layer in masked_parameters(model)] == latents
    for layer in masked_parameters(model):
        assert len(layer.module.parametrizations.weight) == 1


def test_include_exclude_globs_and_regexes():
    model = ResNet18(width=4)
    assert reparametrize(model, include=["layer1.*"], exclude=["re:.*shortcut.*"]) == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"
    ]
    model = ResNet18(width=4)
    names = reparametrize(model, include=["re:layer[34]\\..*conv1"])
    assert names == ["layer3.0.conv1", "layer3.1.conv1", "layer4.0.conv1", "layer4.1.conv1"]


@pytest.mark.parametrize("kw", [dict(include=["nope.*"]), dict(exclude=["re:zzz"])])
def test_pattern_that_matches_nothing_is_an_error_listing_layers(kw):
    with pytest.raises(ValueError, match="matches no prunable layer.*features.0"):
        reparametrize(Conv4(width=4, hidden=8), **kw)


def test_string_pattern_is_refused():
    with pytest.raises(TypeError, match="list of patterns"):
        reparametrize(Conv4(width=4, hidden=8), include="features.*")


def test_model_with_nothing_prunable():
    with pytest.raises(ValueError, match="no prunable layer"):
        reparametrize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_rescaling_preserves_effective_weight_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    std = model[0].weight.std().item()
    reparametrize(model, temperature=0.5)
    assert abs(model[0].weight.std().item() - std) / std < 1e-3
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(256, 256))
    reparametrize(plain, temperature=0.5, preserve_scale=False)
    assert plain[0].weight.std().item() < 0.8 * std  # without it the signal shrinks


def test_reparametrize_like_loads_strictly_and_rejects_other_models():
    trained = Conv4(width=4, hidden=8)
    reparametrize(trained)
    fresh = Conv4(width=4, hidden=8)
    assert not is_reparametrized(fresh)
    reparametrize_like(fresh, trained.state_dict())
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), trained(x))
    with pytest.raises(ValueError, match="another"):
        reparametrize_like(Conv4(width=8, hidden=8), trained.state_dict())
