import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_prune import coverage, masked_parameters, reparametrize, reparametrize_like
from lightning_prune.backbones import VGG19, Conv4, ResNet18
from lightning_prune.reparametrize import prunable_parameters


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "make", [lambda: Conv4(width=4, hidden=8), lambda: VGG19(width_multiplier=0.0625), lambda: ResNet18(width=4)]
)
def test_every_conv_and_linear_weight_is_wrapped_with_equal_parameter_count(make):
    model = make()
    expected = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    before = _count(model)
    names = reparametrize(model)
    assert names == expected
    assert _count(model) == before
    assert [p.name for p in masked_parameters(model)] == expected
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


class _Conv1D(nn.Module):
    """Hugging Face's GPT-2 layer: a plain `weight` parameter used through torch.addmm, not an nn.Linear."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class _TinyLM(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.pos = nn.Parameter(torch.zeros(8, 16))  # positional table: 2-D but not a weight
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = _Conv1D(16, 32)
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.proj(self.norm(self.mlp(x))))


def test_parameter_rule_takes_matrix_weights_of_any_module_and_leaves_embeddings_norms_and_tied_tensors():
    model = _TinyLM(tie=True)
    names = reparametrize(model)
    assert names == ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.weight", "proj.weight"]
    # the tied embedding/head tensor stays one dense tensor, read by both modules
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(0, 50, (2, 8))
    assert model(tokens).shape == (2, 8, 50)
    report = coverage(model)
    assert report.covered == 16 * 48 + 16 * 16 + 16 * 32 + 32 * 16
    assert report.matrix_weights == report.covered + 50 * 16
    assert report.left_out[0][0] == "embed.weight"


@pytest.mark.parametrize("training", [True, False])
def test_an_attention_layer_computes_each_masked_weight_once_per_forward_pass(training):
    """nn.MultiheadAttention reads in_proj_weight three times in a forward pass (its fast path's checks): the gate is
    computed once, and the gradients are those of one computation."""
    torch.manual_seed(0)
    model = _TinyLM(tie=False)
    reparametrize(model)
    model.train(training)
    computed = []
    for p in masked_parameters(model):
        p.mask.register_forward_hook(lambda mask, args, w, name=p.name: computed.append(name))
    tokens = torch.randint(0, 50, (2, 8))
    out = model(tokens)
    assert sorted(computed) == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight", "mlp.weight", "proj.weight"]
    if training:
        out.square().mean().backward()
        uncached = copy.deepcopy(model)
        uncached.attn._forward_pre_hooks.clear()  # the gate computed at each read
        uncached.attn._forward_hooks.clear()
        uncached.zero_grad()
        uncached(tokens).square().mean().backward()
        for (name, a), b in zip(model.named_parameters(), uncached.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_an_attention_layer_with_masked_weights_traces():
    torch.manual_seed(0)
    model = _TinyLM(tie=False)
    reparametrize(model)
    tokens = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values
        traced = torch.jit.trace(model, (tokens,))
    torch.testing.assert_close(traced(tokens), model(tokens))


def test_embeddings_are_pruned_on_request_but_a_tied_table_stays_dense_and_is_named_in_a_warning():
    untied = _TinyLM(tie=False)
    assert "embed.weight" in reparametrize(untied, embeddings=True)
    tied = _TinyLM(tie=True)
    with pytest.warns(UserWarning, match=r"embed.weight \(shared with head.weight\).*stays dense"):
        names = reparametrize(tied, embeddings=True)
    assert "embed.weight" not in names and "head.weight" not in names


def test_a_pattern_that_only_matches_a_tied_tensor_says_so():
    with pytest.raises(ValueError, match=r"It matches embed.weight \(shared with head.weight\), which stays dense"):
        prunable_parameters(_TinyLM(tie=True), include=["head"])


def test_patterns_match_the_tensor_or_its_module_as_glob_or_regex():
    model = ResNet18(width=4)
    assert reparametrize(model, include=["layer1.*"], exclude=["re:.*shortcut.*"]) == [
        "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv1.weight", "layer1.1.conv2.weight"
    ]
    model = ResNet18(width=4)
    names = reparametrize(model, include=["re:layer[34]\\..*conv1"])
    assert names == ["layer3.0.conv1.weight", "layer3.1.conv1.weight", "layer4.0.conv1.weight", "layer4.1.conv1.weight"]
    assert reparametrize(_TinyLM(), include=["*.in_proj_weight"]) == ["attn.in_proj_weight"]


@pytest.mark.parametrize("kw", [dict(include=["nope.*"]), dict(exclude=["re:zzz"])])
def test_pattern_that_matches_nothing_is_an_error_listing_the_prunable_tensors(kw):
    model = Conv4(width=4, hidden=8)
    with pytest.raises(ValueError, match=r"matches no prunable tensor.*features.0.weight"):
        reparametrize(model, **kw)
    assert masked_parameters(model) == []  # nothing changed


def test_string_pattern_is_refused():
    with pytest.raises(TypeError, match="list of patterns"):
        reparametrize(Conv4(width=4, hidden=8), include="features.*")


def test_model_with_nothing_prunable_says_what_to_do():
    with pytest.raises(ValueError, match="no tensor to prune.*embeddings=True"):
        reparametrize(nn.Sequential(nn.Embedding(5, 3), nn.BatchNorm1d(3)))


def test_select_filters_and_an_empty_choice_is_an_error():
    model = Conv4(width=4, hidden=8)
    assert reparametrize(model, select=lambda name, t: t.dim() == 4) == [
        n for n in (p.name for p in masked_parameters(model))
    ]
    assert all(p.latent.dim() == 4 for p in masked_parameters(model))
    with pytest.raises(ValueError, match="leave no tensor"):
        reparametrize(Conv4(width=4, hidden=8), select=lambda name, t: False)


def test_second_call_is_a_no_op():
    model = Conv4(width=4, hidden=8)
    reparametrize(model)
    latents = [p.latent for p in masked_parameters(model)]
    assert reparametrize(model) == []
    assert [p.latent for p in masked_parameters(model)] == latents
    for p in masked_parameters(model):
        assert len(p.module.parametrizations.weight) == 1


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
    assert masked_parameters(fresh) == []
    assert reparametrize_like(fresh, trained.state_dict()) == [p.name for p in masked_parameters(trained)]
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), trained(x))
    with pytest.raises(ValueError, match="has shape .* another model"):
        reparametrize_like(Conv4(width=8, hidden=8), trained.state_dict())
    with pytest.raises(ValueError, match="no such tensor"):
        reparametrize_like(nn.Sequential(nn.Linear(2, 2)), trained.state_dict())


def test_untied_model_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reparametrize(_TinyLM(tie=False))
