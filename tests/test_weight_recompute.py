"""recompute_masked_weights: the backward pass computes the masked weights again instead of keeping them; the
gradients are those of the kept weights, bit for bit, and the weights are gone between the two passes."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from plain_modules import PlainClassifier, quiet_trainer
from torch import nn

from lightning_prune import BudgetCallback, masked_parameters, recompute_masked_weights, reparametrize, weight_recompute
from lightning_prune.data import DigitsDataModule
from lightning_prune.weight_recompute import _scope


class Block(nn.Module):
    """A convolution, an attention layer (its out_proj weight is used inside the attention module's forward, not by
    its own) and a Linear (which saves its weight transposed)."""

    def __init__(self, wide: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, wide, 3, padding=1)
        self.attn = nn.MultiheadAttention(wide, 2, batch_first=True)
        self.head = nn.Linear(wide, 5)

    def forward(self, x):
        h = self.conv(x).relu().flatten(2).transpose(1, 2)  # (batch, tokens, wide)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def pair(phase: str, wide: int = 8):
    """Two copies of one reparametrized Block, the second recomputing its masked weights; gates set to ``phase``."""
    torch.manual_seed(0)
    model = Block(wide)
    reparametrize(model)
    for p in masked_parameters(model):
        if phase == "step":
            p.mask.set_temperature(0.0)
        elif phase == "hard":
            p.mask.harden(torch.rand(p.latent.shape) > 0.5)
    other = copy.deepcopy(model)
    handles = recompute_masked_weights(other)
    return model, other, handles


def grads(model, x, create_graph: bool = False):
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    if create_graph:  # a gradient penalty: backward through the gradients
        first = torch.autograd.grad(loss, [p.latent for p in masked_parameters(model)], create_graph=True)
        loss = sum(g.square().sum() for g in first)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("phase", ["soft", "step", "hard"])
def test_gradients_equal_the_kept_weights(phase):
    model, other, _ = pair(phase)
    x = torch.randn(4, 3, 6, 6)
    for a, b in zip(grads(model, x), grads(other, x)):
        assert torch.equal(a, b)


def test_gradients_equal_on_a_fused_tensor():
    model, other, _ = pair("soft", wide=512)  # attn's in_proj: 3 x 512 x 512 weights, over the fused kernels' size
    x = torch.randn(2, 3, 3, 3)
    for a, b in zip(grads(model, x), grads(other, x)):
        assert torch.equal(a, b)


def test_double_backward_equals_the_kept_weights():
    # the hard mask (the soft gate's backward pass is not differentiable again, with or without), no attention (its
    # CPU kernel's backward pass is not either)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    reparametrize(model)
    for p in masked_parameters(model):
        p.mask.harden(torch.rand(p.latent.shape) > 0.5)
    other = copy.deepcopy(model)
    recompute_masked_weights(other)
    x = torch.randn(4, 3, 6, 6)
    for a, b in zip(grads(model, x, create_graph=True), grads(other, x, create_graph=True)):
        torch.testing.assert_close(a, b)


def masked_weight_alive_after_forward(model, x) -> int:
    """How many of the masked weights computed in the forward pass are still alive before the backward pass (the
    attention layer computes its weights once more than it uses them)."""
    refs = []
    hooks = [p.mask.register_forward_hook(lambda m, a, w: refs.append(weakref.ref(w)))
             for p in masked_parameters(model)]
    loss = model(x).square().sum()
    alive = sum(r() is not None for r in refs)
    loss.backward()
    for h in hooks:
        h.remove()
    return alive


@pytest.mark.parametrize("phase", ["soft", "hard"])
def test_masked_weights_are_not_kept_between_the_passes(phase):
    model, other, _ = pair(phase)
    x = torch.randn(4, 3, 6, 6)
    kept = len(masked_parameters(model))
    assert masked_weight_alive_after_forward(model, x) == kept  # without: the layers keep one each for backward
    assert masked_weight_alive_after_forward(other, x) == 0


def test_other_saved_tensor_hooks_keep_their_region():
    _, other, _ = pair("soft")
    x = torch.randn(4, 3, 6, 6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert masked_weight_alive_after_forward(other, x) == len(masked_parameters(other))


def test_removed_handles_turn_it_off():
    _, other, handles = pair("soft")
    for h in handles:
        h.remove()
    assert masked_weight_alive_after_forward(other, torch.randn(4, 3, 6, 6)) == len(masked_parameters(other))


def test_theta_changed_between_the_passes_raises():
    _, other, _ = pair("hard")  # the hard mask's select keeps no θ: only the recompute can notice
    loss = other(torch.randn(4, 3, 6, 6)).sum()
    with torch.no_grad():
        other.head.parametrizations.weight.original.mul_(2)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation \(a masked weight.s θ"):
        loss.backward()


def test_scope_is_clean_after_inference_and_errors():
    _, other, _ = pair("soft")
    with torch.no_grad():
        other(torch.randn(4, 3, 6, 6))
    assert _scope.depth == 0 and _scope.recorder is None
    with pytest.raises(RuntimeError):
        other(torch.randn(4, 5, 6, 6))  # wrong channels: the convolution raises inside the module's forward
    assert _scope.depth == 0 and _scope.recorder is None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_a_fit_with_it_trains_the_same_weights(monkeypatch):
    """Through Trainer.fit, soft and step gates, the cut and all: the same weights bit for bit, every step's masked
    weights computed again in the backward pass, and the module's hooks gone after fit."""
    recomputed = []
    weight = weight_recompute._Note.weight
    monkeypatch.setattr(weight_recompute._Note, "weight", lambda note: recomputed.append(note.source.hard) or weight(note))
    states = []
    for recompute in (False, True):
        torch.manual_seed(0)
        module = PlainClassifier()
        trainer = quiet_trainer(max_epochs=2, limit_train_batches=6, callbacks=[
            BudgetCallback(sparsity=0.8, recompute_masked_weights=recompute, measure_cut=False)])
        trainer.fit(module, DigitsDataModule(image_size=16, batch_size=32))
        states.append(module.state_dict())
        assert not any(m._forward_pre_hooks for m in module.modules())
    assert len(recomputed) == 12 * 4  # 12 steps, 4 masked layers, no weight kept from a forward pass
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def linear_pair():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    reparametrize(model)
    other = copy.deepcopy(model)
    recompute_masked_weights(other)
    return model, other


@pytest.mark.parametrize("change", ["input", "temperature", "kept"])
def test_a_saved_tensor_changed_before_backward_raises_as_without(change):
    """Autograd refuses a backward pass through a saved tensor changed in place; so it does with the notes."""
    for model in linear_pair():
        mask = masked_parameters(model)[0].mask
        if change == "kept":
            mask.harden(torch.rand(8, 8) > 0.5)
        x = torch.randn(4, 8, requires_grad=True)
        y = model(x).square().sum()
        with torch.no_grad():
            if change == "input":
                x.mul_(2)
            elif change == "temperature":
                mask.set_temperature(0.05)
            else:
                mask.reopen()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_a_weight_changed_in_place_in_the_forward_pass_is_kept_not_recomputed():
    class Scaled(nn.Linear):
        def forward(self, x):
            w = self.weight
            w.mul_(3.0)  # the masked weight is a computed tensor: a layer may change it before using it
            return nn.functional.linear(x, w, self.bias)

    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = Scaled(8, 8)
        reparametrize(layer)
        if recompute:
            recompute_masked_weights(layer)
        x = torch.randn(4, 8, requires_grad=True)
        layer(x).square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_a_forward_pass_without_backward_frees_its_graph():
    """Outputs that their own node saves (softmax's, in attention with need_weights=True) are not held in a cycle."""
    _, other, _ = pair("soft")
    attn = other.attn
    x = torch.randn(2, 5, 8)
    out = attn(x, x, x)[1]  # the attention weights: softmax's output, saved by softmax
    ref = weakref.ref(out)
    del out
    assert ref() is None


def test_a_sparse_tensor_saved_in_the_forward_pass():
    class GraphConvolution(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, adjacency, x):
            return torch.sparse.mm(adjacency, x @ self.weight)

    layer = GraphConvolution()
    reparametrize(layer)
    recompute_masked_weights(layer)
    adjacency = (torch.eye(5) + torch.diag(torch.ones(4), 1)).to_sparse().requires_grad_()
    layer(adjacency, torch.randn(5, 8)).sum().backward()
    assert layer.parametrizations.weight.original.grad is not None


def test_hooks_are_added_once_and_removed_when_fit_raises():
    _, other, handles = pair("soft")
    assert recompute_masked_weights(other) == []  # hooked already

    class Failing(PlainClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise ValueError("a bug in the user's step")
            return super().training_step(batch, batch_idx)

    module = Failing()
    callback = BudgetCallback(sparsity=0.8, recompute_masked_weights=True, measure_cut=False)
    with pytest.raises(ValueError, match="a bug in the user's step"):
        quiet_trainer(max_epochs=1, limit_train_batches=6, callbacks=[callback]).fit(
            module, DigitsDataModule(image_size=16, batch_size=32))
    assert not any(m._forward_pre_hooks for m in module.modules())
