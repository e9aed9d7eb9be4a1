"""compile_gate=True: the gate's forward and backward as kernels compiled by torch.compile give the eager kernels'
values and gradients, fall back to eager (with one warning) when compiling fails, and are switched on by
reparametrize and BudgetCallback.

``aot_eager`` traces and runs the same formulas without inductor's C++ code generation, so CI needs no compiler; the
``inductor`` case (the real default) is slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from plain_modules import PlainClassifier, quiet_trainer

from lightning_prune import BudgetCallback, MagnitudeMask, compiled_gate, pruned_layers, reparametrize
from lightning_prune.data import DigitsDataModule

INDUCTOR = pytest.param("inductor", marks=pytest.mark.slow)


@pytest.fixture
def backend(request, monkeypatch):
    """A fresh compiled-kernel state with the given torch.compile backend."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_gate, "BACKEND", getattr(request, "param", "aot_eager"))
    compiled_gate.reset()
    yield compiled_gate.BACKEND
    compiled_gate.reset()
    torch._dynamo.reset()


def _masks(shape, temperature: float) -> tuple[MagnitudeMask, MagnitudeMask]:
    return tuple(
        MagnitudeMask(shape, scale=0.8, temperature=temperature, grad_temperature=0.1, compile_gate=fused)
        for fused in (False, True)
    )


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR], indirect=True)
@pytest.mark.parametrize("temperature", [0.5, 0.02])  # above the gradient floor (one gate), below it (two)
@pytest.mark.parametrize("with_budget", [False, True])
def test_compiled_kernels_give_the_eager_values_and_gradients(backend, temperature, with_budget):
    torch.manual_seed(0)
    theta = torch.randn(16, 8, 3, 3, requires_grad=True)
    grad_out = torch.randn(16, 8, 3, 3)
    results = []
    for mask in _masks(theta.shape, temperature):
        if with_budget:
            mask.request_budget_grad(torch.tensor(-3.0), torch.tensor(1.0))
        weight = mask(theta)
        (grad,) = torch.autograd.grad(weight, theta, grad_out)
        results.append((weight, mask.soft_kept_count(theta), grad))
    (eager_w, eager_kept, eager_grad), (fused_w, fused_kept, fused_grad) = results
    assert set(compiled_gate._compiled) == {"forward", "backward_budget" if with_budget else "backward"}
    assert not compiled_gate._failed
    torch.testing.assert_close(fused_w, eager_w)
    torch.testing.assert_close(fused_kept, eager_kept)
    torch.testing.assert_close(fused_grad, eager_grad)


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler here")


@pytest.mark.parametrize("backend", [_broken_backend], indirect=True)
def test_a_failed_compile_warns_once_and_the_eager_kernels_take_over(backend):
    torch.manual_seed(0)
    theta = torch.randn(6, 5, requires_grad=True)
    eager, fused = _masks(theta.shape, 0.5)
    with pytest.warns(RuntimeWarning, match="compiling the fused gate kernels failed.*no C\\+\\+ compiler here"):
        weight = fused(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        (grad,) = torch.autograd.grad(fused(theta).sum(), theta)
    torch.testing.assert_close(weight, eager(theta))
    torch.testing.assert_close(grad, torch.autograd.grad(eager(theta).sum(), theta)[0])


def test_a_channels_last_weight_takes_the_eager_kernels(backend):
    theta = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_(True)
    eager, fused = _masks(theta.shape, 0.5)
    torch.autograd.grad(fused(theta).sum(), theta)
    assert compiled_gate._compiled == {}
    torch.testing.assert_close(fused(theta), eager(theta))


def test_reparametrize_and_the_callback_switch_the_compiled_kernels_on(backend, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    reparametrize(model)
    assert not pruned_layers(model)[0].mask.compile_gate
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    reparametrize(model, compile_gate=True)
    assert pruned_layers(model)[0].mask.compile_gate

    torch.manual_seed(0)
    module = PlainClassifier()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[BudgetCallback(compile_gate=True)])
    trainer.fit(module, DigitsDataModule(image_size=16, batch_size=32))
    assert all(layer.mask.compile_gate for layer in pruned_layers(module))
    assert {"forward", "backward_budget"} <= set(compiled_gate._compiled) and not compiled_gate._failed


def test_an_error_after_a_kernel_has_run_is_raised_not_taken_for_a_failed_compile(backend):
    theta = torch.randn(6, 5)
    _, fused = _masks(theta.shape, 0.5)
    fused(theta)  # compiles and runs once

    def failing_kernel(*args):
        raise ValueError("a real error inside the kernel")

    compiled_gate._compiled["forward"] = failing_kernel
    with pytest.raises(ValueError, match="a real error inside the kernel"):
        fused(theta)
    assert not compiled_gate._failed  # the compiled kernels stay on
