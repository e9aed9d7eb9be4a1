import pytest
import torch
from plain_modules import HostReads
from torch.nn.utils import parametrize

from lightning_prune.magnitude_mask import MagnitudeMask


def _masked_linear(temperature: float, grad_temperature: float = 0.1, threshold: float = 1.0):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    scale = float(layer.weight.detach().abs().mean())
    mask = MagnitudeMask(layer.weight.shape, scale, threshold, temperature, grad_temperature)
    parametrize.register_parametrization(layer, "weight", mask)
    return layer, mask


def test_forward_is_theta_times_sigmoid_gate():
    layer, mask = _masked_linear(temperature=0.3)
    theta = layer.parametrizations.weight.original
    expected = theta * torch.sigmoid((theta.abs() / mask.scale - 1.0) / 0.3)
    torch.testing.assert_close(layer.weight, expected)


def test_adds_no_trainable_parameter():
    layer = torch.nn.Linear(8, 8)
    before = sorted(p.numel() for p in layer.parameters())
    parametrize.register_parametrization(layer, "weight", MagnitudeMask(layer.weight.shape, 0.1))
    assert sorted(p.numel() for p in layer.parameters()) == before
    assert all(not b.requires_grad for b in layer.buffers())


def test_gradient_matches_autograd_when_temperature_above_floor():
    layer, mask = _masked_linear(temperature=0.5, grad_temperature=0.1)
    theta = layer.parametrizations.weight.original
    layer.weight.sum().backward()
    ref = theta.detach().clone().requires_grad_(True)
    (ref * torch.sigmoid((ref.abs() / mask.scale - 1.0) / 0.5)).sum().backward()
    torch.testing.assert_close(theta.grad, ref.grad)


def test_gradient_stays_bounded_at_tiny_temperature():
    layer, mask = _masked_linear(temperature=1e-4, grad_temperature=0.1)
    theta = layer.parametrizations.weight.original
    with torch.no_grad():  # put weights right at the threshold, where h' peaks
        theta.copy_(torch.sign(theta) * mask.scale * 1.0)
    layer.weight.sum().backward()
    assert torch.isfinite(theta.grad).all()
    # |dw/dθ| <= h + (|θ|/s)/(4·T_b) = 1 + 1/(4·0.1)
    assert theta.grad.abs().max() <= 1.0 + 1.0 / (4 * 0.1) + 1e-5


def test_unbounded_gradient_would_blow_up():
    """Sanity check of the test above: with the floor as small as T the same gradient is huge."""
    layer, mask = _masked_linear(temperature=1e-4, grad_temperature=1e-4)
    theta = layer.parametrizations.weight.original
    with torch.no_grad():
        theta.copy_(torch.sign(theta) * mask.scale * 1.0)
    layer.weight.sum().backward()
    assert theta.grad.abs().max() > 100


def test_harden_uses_the_fixed_mask():
    layer, mask = _masked_linear(temperature=0.5)
    keep = torch.rand(layer.weight.shape) > 0.5
    mask.harden(keep)
    theta = layer.parametrizations.weight.original
    torch.testing.assert_close(layer.weight, theta * keep)
    assert torch.equal(mask.hard_gate(theta), keep)
    with pytest.raises(ValueError, match="shape"):
        mask.harden(torch.ones(3, 3, dtype=torch.bool))


def test_bfloat16_weight_gate_computed_in_float32():
    from lightning_prune.magnitude_mask import gate

    mask = MagnitudeMask((4,), scale=0.3, threshold=1.0, temperature=0.01)
    theta = torch.tensor([0.30078125, 0.298828125, 0.6, 0.03], dtype=torch.bfloat16)  # exact bf16 values
    h = gate(theta, mask.scale, mask.threshold, mask.temperature)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, gate(theta.float(), mask.scale, mask.threshold, mask.temperature))
    # in bf16 arithmetic |θ|/s would round both first weights to the threshold (gate 0.5 each)
    assert h[0] > 0.55 and h[1] < 0.45
    assert mask(theta).dtype == torch.bfloat16
    assert mask.hard_gate(theta).tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    "bad, message",
    [(dict(scale=0.0), "positive scale"), (dict(scale=1.0, temperature=-0.1), "temperature >= 0"),
     (dict(scale=1.0, grad_temperature=0.0), "grad_temperature > 0")],
)
def test_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        MagnitudeMask((2, 2), **bad)


def test_the_step_gate_path_computes_what_the_sigmoid_at_t_0_computes():
    """set_temperature(0) takes a cheaper path (no sigmoid in the forward pass): same weights, same gradient."""
    layer, mask = _masked_linear(temperature=0.0)
    theta = layer.parametrizations.weight.original
    x = torch.randn(8, 64)
    assert not mask.step_gate
    layer(x).square().sum().backward()
    w_sigmoid, g_sigmoid = layer.weight.detach().clone(), theta.grad.clone()
    theta.grad = None
    mask.set_temperature(0.0)
    assert mask.step_gate and float(mask.temperature) == 0.0
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.detach(), w_sigmoid, rtol=0, atol=0)
    torch.testing.assert_close(theta.grad, g_sigmoid)
    assert int((layer.weight == 0).sum()) == int((mask.score(theta) <= 1.0).sum()) > 0
    mask.set_temperature(0.3)
    assert not mask.step_gate


@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.03, 0.0])
def test_gradient_is_h_plus_the_bounded_slope_in_every_regime(temperature):
    """dw/dθ = h_T + (|θ|/(s·T_b))·h_b(1 − h_b), T_b = max(T, 0.1): above the floor (one gate), at it, under it (two
    gates) and at T = 0 (the step gate), against the formula written out here."""
    layer, mask = _masked_linear(temperature=0.5, grad_temperature=0.1)
    mask.set_temperature(temperature)
    theta = layer.parametrizations.weight.original
    grad_out = torch.randn_like(theta)
    (layer.weight * grad_out).sum().backward()
    score = theta.detach().abs() / mask.scale
    t_b = max(temperature, 0.1)
    h = (score > 1.0).float() if temperature == 0 else torch.sigmoid((score - 1.0) / temperature)
    h_b = torch.sigmoid((score - 1.0) / t_b)
    expected = (h + score / t_b * h_b * (1 - h_b)) * grad_out
    torch.testing.assert_close(theta.grad, expected, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("state", ["soft", "step gate", "hard"])
def test_a_masked_layer_reads_nothing_back_to_the_host_in_its_forward_and_backward(monkeypatch, state):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    mask = MagnitudeMask(layer.weight.shape, scale=float(layer.weight.detach().abs().mean()))
    parametrize.register_parametrization(layer, "weight", mask)
    if state == "step gate":
        mask.set_temperature(0.0)
    if state == "hard":
        mask.harden(torch.rand(layer.weight.shape) > 0.5)
    reads = HostReads(monkeypatch)
    for _ in range(3):
        layer(torch.randn(4, 16)).sum().backward()
    assert reads.count == 0
    mask.hard.fill_(not bool(mask.hard))  # the buffer written behind its back is not re-read: counting works
    assert reads.count == 1


def test_the_host_copy_of_hard_follows_harden_reopen_load_and_pickle():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    mask = MagnitudeMask(layer.weight.shape, scale=1.0)
    parametrize.register_parametrization(layer, "weight", mask)
    kept = torch.rand(layer.weight.shape) > 0.5
    mask.harden(kept)
    assert mask.is_hard and torch.equal(layer.weight != 0, kept & (layer.parametrizations.weight.original != 0))
    state = layer.state_dict()

    fresh = torch.nn.Linear(6, 4)
    parametrize.register_parametrization(fresh, "weight", MagnitudeMask(fresh.weight.shape, scale=1.0))
    assert not fresh.parametrizations.weight[0].is_hard
    fresh.load_state_dict(state)  # a hard mask loaded into a soft one: the layer computes with the loaded mask
    assert fresh.parametrizations.weight[0].is_hard and torch.equal(fresh.weight, layer.weight)

    mask.reopen()
    assert not mask.is_hard and not bool(mask.hard) and bool(mask.kept.all())
    soft = layer.weight.detach().clone()
    assert not torch.equal(soft, layer.parametrizations.weight.original * kept)  # the sigmoid gate again



def test_a_mask_pickled_by_0_4_0_reads_its_hard_flag_and_follows_later_loads():
    import pickle

    from lightning_prune.magnitude_mask import _read_hard_flag

    old = MagnitudeMask((2, 2), scale=1.0)
    old.harden(torch.ones(2, 2, dtype=torch.bool))
    hard_state = old.state_dict()
    del old.__dict__["is_hard"]  # what 0.4.0 pickled: no host copy, no post-load hook
    for key in [k for k, hook in old._load_state_dict_post_hooks.items() if hook is _read_hard_flag]:
        del old._load_state_dict_post_hooks[key]
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.is_hard and not loaded.step_gate
    loaded.reopen()
    loaded.load_state_dict(hard_state)  # a resume into the unpickled module: the flag follows the loaded buffer
    assert loaded.is_hard
