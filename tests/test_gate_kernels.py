"""The chunked CPU kernels of the soft gate give the same values and gradients as the plain formulas."""

import pytest
import torch

from lightning_prune import (
    MagnitudeMask,
    add_budget_gradient,
    budget_loss,
    flush_budget_gradient,
    gate_kernels,
    pruned_layers,
    reparametrize,
)
from lightning_prune.magnitude_mask import _MaskedWeight


def _reference_masked_weight(theta, scale, threshold, temperature, grad_temperature):
    """θ·σ((|θ|/s − c)/T) with autograd, and the bounded gradient written out: h_T + (|θ|/(s·T_b))·h_b(1 − h_b)."""
    gate = torch.sigmoid((theta.abs() / scale - threshold) / temperature)
    t_b = max(temperature, grad_temperature)
    gate_b = torch.sigmoid((theta.abs() / scale - threshold) / t_b)
    local = gate + theta.abs() / (scale * t_b) * gate_b * (1 - gate_b)
    return theta * gate, gate.sum(), local


@pytest.fixture
def small_chunks(monkeypatch):
    # 1000 elements per chunk: a 3x7x11x13 weight (3003 elements) takes 4 chunks, the last one partial
    monkeypatch.setattr(gate_kernels, "CPU_CHUNK", 1000)


@pytest.mark.parametrize("temperature", [0.5, 0.02])  # above the gradient floor (one gate), below it (two)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_weight_matches_the_formulas(small_chunks, temperature, layout):
    torch.manual_seed(0)
    theta = torch.randn(3, 7, 11, 13)
    if layout == "channels_last":  # not chunked (not contiguous): the whole-tensor path
        theta = theta.to(memory_format=torch.channels_last)
    theta.requires_grad_(True)
    args = [torch.tensor(v) for v in (0.8, 1.0, temperature, 0.1)]
    grad_out = torch.randn(3, 7, 11, 13)
    weight, kept = _MaskedWeight.apply(theta, *args)
    (grad,) = torch.autograd.grad(weight, theta, grad_out)
    ref_weight, ref_kept, local = _reference_masked_weight(theta.detach(), 0.8, 1.0, temperature, 0.1)
    torch.testing.assert_close(weight, ref_weight)
    torch.testing.assert_close(kept, ref_kept)
    torch.testing.assert_close(grad, grad_out * local)


def test_chunked_and_whole_tensor_budget_gradients_agree(monkeypatch):
    def run(chunk):
        monkeypatch.setattr(gate_kernels, "CPU_CHUNK", chunk)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(70, 100), torch.nn.Linear(100, 3))
        reparametrize(model)
        layers = pruned_layers(model)
        model(torch.randn(4, 70)).square().sum().backward()
        loss = budget_loss(layers, keep=0.3, grad_temperature=1.0)
        loss.backward()
        return loss.detach(), [layer.latent.grad.clone() for layer in layers]

    whole_loss, whole_grads = run(1 << 30)
    chunked_loss, chunked_grads = run(999)  # the 7000-weight layer in 8 chunks, the 300-weight one whole
    torch.testing.assert_close(chunked_loss, whole_loss)
    for chunked, whole in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(chunked, whole)


def test_budget_reads_the_count_of_the_forward_pass(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32))
    reparametrize(model)
    (layer,) = pruned_layers(model)
    expected = float(layer.mask.soft_gate(layer.latent.detach()).sum())
    recomputed = []
    real_gate_sum = gate_kernels.gate_sum

    def counting_gate_sum(*args):
        recomputed.append(1)
        return real_gate_sum(*args)

    monkeypatch.setattr("lightning_prune.magnitude_mask.gate_sum", counting_gate_sum)

    def kept() -> float:
        return float(layer.mask.soft_kept_count(layer.latent).detach())

    model(torch.randn(2, 16))
    assert kept() == pytest.approx(expected) and recomputed == []  # the forward's count

    with torch.no_grad():
        layer.latent.mul_(1.5)  # an optimizer step: θ changed in place
    assert kept() == pytest.approx(float(layer.mask.soft_gate(layer.latent.detach()).sum())) and len(recomputed) == 1

    model(torch.randn(2, 16))
    layer.mask.temperature.fill_(0.05)  # the callback's schedule moved T
    assert kept() == pytest.approx(float(layer.mask.soft_gate(layer.latent.detach()).sum())) and len(recomputed) == 2

    with torch.no_grad():  # validation: no count kept, the stale one stays stale
        model(torch.randn(2, 16))
    kept()
    assert len(recomputed) == 3


def test_cached_count_is_not_carried_by_copies():
    import copy

    mask = MagnitudeMask((4, 4), scale=1.0)
    mask(torch.randn(4, 4, requires_grad=True))
    assert mask._kept_count is not None
    assert copy.deepcopy(mask)._kept_count is None


@pytest.mark.parametrize("mode", ["global", "layer"])
@pytest.mark.parametrize("chunk", [1 << 30, 999])
@pytest.mark.parametrize("existing_grad", [True, False])
def test_add_budget_gradient_equals_the_backward_of_the_budget_loss(monkeypatch, mode, chunk, existing_grad):
    monkeypatch.setattr(gate_kernels, "CPU_CHUNK", chunk)

    def model_and_layers():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(70, 100), torch.nn.Linear(100, 3))
        reparametrize(model)
        layers = pruned_layers(model)
        layers[0].mask.temperature.fill_(0.05)  # below the floor: the value and the slope use different temperatures
        if existing_grad:
            model(torch.randn(4, 70)).square().sum().backward()
        return model, layers

    model, layers = model_and_layers()
    expected_loss = budget_loss(layers, keep=0.3, mode=mode, grad_temperature=1.0)
    (3.0 * expected_loss).backward()
    expected = [layer.latent.grad.clone() for layer in layers]

    model, layers = model_and_layers()
    loss = add_budget_gradient(layers, keep=0.3, mode=mode, grad_temperature=1.0, weight=3.0)
    torch.testing.assert_close(loss, expected_loss.detach())
    for layer, grad in zip(layers, expected):
        torch.testing.assert_close(layer.latent.grad, grad)


def test_add_budget_gradient_skips_frozen_weights():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    reparametrize(model)
    frozen, trained = pruned_layers(model)
    frozen.latent.requires_grad_(False)
    add_budget_gradient(model, keep=0.2)
    assert frozen.latent.grad is None and trained.latent.grad is not None


@pytest.mark.parametrize("temperature, budget_temperature", [(0.5, 0.5), (0.5, 1.0), (0.02, 0.1), (0.02, 1.0)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_weight_backward_adds_a_pending_budget_gradient_once(
    small_chunks, temperature, budget_temperature, layout
):
    """A budget-gradient request is added by the next backward pass (chunked or not, whether or not its temperature
    is the backward's own), and only by that one."""
    torch.manual_seed(0)
    theta = torch.randn(3, 7, 11, 13)
    if layout == "channels_last":
        theta = theta.to(memory_format=torch.channels_last)
    theta.requires_grad_(True)
    mask = MagnitudeMask(theta.shape, scale=0.8, temperature=temperature, grad_temperature=0.1)
    grad_out = torch.randn(3, 7, 11, 13)
    coef = torch.tensor(-2.5)
    mask.request_budget_grad(coef, torch.tensor(budget_temperature))
    (fused,) = torch.autograd.grad(mask(theta), theta, grad_out)
    (plain,) = torch.autograd.grad(mask(theta), theta, grad_out)  # the request is used up
    assert mask.take_budget_grad() is None
    _, _, local = _reference_masked_weight(theta.detach(), 0.8, 1.0, temperature, 0.1)
    torch.testing.assert_close(plain, grad_out * local)
    reference = theta.detach().clone().requires_grad_(True)
    gate = torch.sigmoid((reference.abs() / 0.8 - 1.0) / budget_temperature)
    (budget,) = torch.autograd.grad(coef * gate.sum(), reference)
    torch.testing.assert_close(fused, plain + budget)


def test_flush_adds_the_requests_no_backward_pass_consumed_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    reparametrize(model)
    layers = pruned_layers(model)
    x = torch.randn(4, 10)
    model(x)
    add_budget_gradient(layers, keep=0.3, grad_temperature=1.0, weight=3.0)
    budget = [layer.latent.grad.clone() for layer in layers]
    (task,) = torch.autograd.grad(model[0](x).sum(), layers[0].latent)
    model.zero_grad(set_to_none=True)
    add_budget_gradient(layers, keep=0.3, grad_temperature=1.0, weight=3.0, in_backward=True)
    model[0](x).sum().backward()  # reaches the first layer only
    assert flush_budget_gradient(layers) == 1 and flush_budget_gradient(layers) == 0
    torch.testing.assert_close(layers[0].latent.grad, task + budget[0])
    torch.testing.assert_close(layers[1].latent.grad, budget[1])
