"""The fused kernels compute what the eager operations compute (the gate's two passes and the budget step), and a
compiler failure falls back to the eager operations."""

from __future__ import annotations

import pytest
import torch

import lightning_prune.fused_kernels as fused_kernels
from lightning_prune import masked_parameters, reparametrize
from lightning_prune.budget import StepMetric, budget_step
from lightning_prune.magnitude_mask import _MaskedWeight

EAGER, FUSED = 10**15, 0  # FUSED_MIN_NUMEL for each path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_gate_computes_what_the_eager_passes_compute(monkeypatch, dtype):
    torch.manual_seed(0)
    theta = torch.randn(64, 33, dtype=dtype, requires_grad=True)
    grad = torch.randn(33, 64, dtype=dtype).t()  # not contiguous, as autograd may pass it
    buffers = torch.tensor(0.8), torch.tensor(1.0)
    for temperature, step in ((0.3, False), (0.04, False), (0.0, True)):
        results = []
        for smallest in (EAGER, FUSED):
            monkeypatch.setattr(fused_kernels, "FUSED_MIN_NUMEL", smallest)
            theta.grad = None
            w = _MaskedWeight.apply(theta, *buffers, torch.tensor(temperature), torch.tensor(0.1), step)
            w.backward(grad)
            results.append((w.detach(), theta.grad.clone()))
        assert not fused_kernels._state["broken"]
        (w_eager, g_eager), (w_fused, g_fused) = results
        assert w_fused.dtype == dtype and g_fused.dtype == dtype and w_fused.shape == theta.shape
        torch.testing.assert_close(w_fused, w_eager, rtol=0, atol=0)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the result
        torch.testing.assert_close(g_fused.float(), g_eager.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rate", [0.05, -0.02])
@pytest.mark.parametrize("with_metric", [False, True])
@pytest.mark.parametrize("exempt", [None, 2.0])
def test_the_fused_budget_step_computes_what_the_eager_step_computes(monkeypatch, rate, with_metric, exempt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Conv2d(3, 8, 3))
    reparametrize(model)
    params = masked_parameters(model)
    start = [p.latent.detach().clone() for p in params]
    metric = StepMetric([torch.rand_like(p.latent) * 1e-4 for p in params], torch.tensor(3e-3)) if with_metric else None
    limit = None if exempt is None else torch.tensor([exempt])
    results = []
    for smallest in (EAGER, FUSED):
        monkeypatch.setattr(fused_kernels, "FUSED_MIN_NUMEL", smallest)
        with torch.no_grad():
            for p, s in zip(params, start):
                p.latent.copy_(s)
        budget_step(params, torch.full((2,), rate), limit, metric)
        results.append([p.latent.detach().clone() for p in params])
    assert not fused_kernels._state["broken"]
    for eager, fused, before in zip(*results, start):
        assert not torch.equal(eager, before)  # the step moved the weights
        torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_fused_budget_step_writes_theta_where_it_is(monkeypatch, memory_format):
    """In place for a contiguous θ (same storage, version bumped as an eager write bumps it); a channels_last θ goes
    through the copying kernel. Both compute what the eager step computes."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(16, 32, 3).to(memory_format=memory_format)
    reparametrize(model)
    (param,) = masked_parameters(model)
    theta = param.latent
    start = theta.detach().clone()
    results = []
    for smallest in (EAGER, FUSED):
        monkeypatch.setattr(fused_kernels, "FUSED_MIN_NUMEL", smallest)
        with torch.no_grad():
            theta.copy_(start)
        pointer, version = theta.data_ptr(), theta._version
        budget_step([param], torch.tensor([0.05]))
        assert theta.data_ptr() == pointer and theta._version > version
        results.append(theta.detach().clone())
    assert not fused_kernels._state["broken"] and not torch.equal(results[0], start)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-8)


def test_a_compiler_failure_falls_back_to_the_eager_passes_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused_kernels, "FUSED_MIN_NUMEL", FUSED)
    monkeypatch.setattr(fused_kernels, "_compiled", {key: broken for key in fused_kernels._compiled} | _all(broken))
    monkeypatch.setattr(fused_kernels, "_state", {"broken": False})
    theta = torch.randn(10, 10, requires_grad=True)
    args = (torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.1), False)
    with pytest.warns(UserWarning, match="could not be compiled.*no C\\+\\+ compiler"):
        w = _MaskedWeight.apply(theta, *args)
    torch.testing.assert_close(w, theta * torch.sigmoid((theta.abs() - 1.0) / 0.5))
    assert fused_kernels._state["broken"] and not fused_kernels.use_fused(theta)


def _all(fn):
    from lightning_prune.budget import _budget_step_math
    from lightning_prune.magnitude_mask import _backward_math, _forward_math

    kernels = (_forward_math, _backward_math, _budget_step_math, fused_kernels._writer(_budget_step_math))
    return {f: fn for f in kernels}
