"""Opt-in fused gate kernels: the forward and backward of ``w = θ ⊙ h_T(θ)`` compiled with torch.compile.

Eager PyTorch runs the gate as six to ten elementwise passes over each weight (:mod:`lightning_prune.gate_kernels`).
Compiled, the forward (``w`` and ``Σh``) and the backward (with the budget gradient when one is pending) are one fused
loop each: C++/OpenMP on the CPU, Triton on a GPU. Turn it on with ``BudgetCallback(compile_gate=True)`` or
``reparametrize(model, compile_gate=True)``.

Compiling needs a working inductor backend (a C++ compiler on the CPU, Triton on a GPU) and takes a few seconds per
kernel, on the first steps. If compiling fails, a warning says why, once, and the eager kernels are used from then on.
Weights that are not contiguous (``channels_last``) take the eager kernels. When the whole model is compiled
(``torch.compile(model)``) the gate is traced into the model's own graph instead.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_prune.gate_kernels import gate_factors, same_value, slope_temperature, wide

#: The torch.compile backend of the fused kernels (tests use "aot_eager", which needs no compiler).
BACKEND = "inductor"

_compiled: dict[str, Callable] = {}
_ready: set[str] = set()  # kernels that have run once: their errors are the caller's, not a failed compile
_failed: list[str] = []  # the first compile error, once one happened: eager from then on
_lock = threading.Lock()


def reset() -> None:
    """Forget the compiled kernels and any failed compile (after changing :data:`BACKEND`; the tests use it)."""
    with _lock:
        _compiled.clear()
        _ready.clear()
        _failed.clear()


def fused_masked_weight(
    theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor
) -> tuple[Tensor, Tensor] | None:
    """``(θ ⊙ h_T(θ), Σ h_T(θ))`` from one compiled kernel; None when it cannot run (then use the eager kernels)."""
    if not theta.is_contiguous():
        return None
    result = _call("forward", _forward, theta.view(-1), scale, threshold, temperature)
    return None if result is None else (result[0].view_as(theta), result[1])


def fused_masked_weight_grad(
    theta: Tensor,
    grad_out: Tensor,
    scale: Tensor,
    threshold: Tensor,
    temperature: Tensor,
    grad_temperature: Tensor,
    budget: tuple[Tensor, Tensor] | None = None,
) -> Tensor | None:
    """:func:`~lightning_prune.gate_kernels.masked_weight_grad` from one compiled kernel; None when it cannot run."""
    if not (theta.is_contiguous() and grad_out.is_contiguous()) or grad_out.requires_grad:
        return None
    # T ≥ T_grad (read on the CPU only: no device synchronisation): one gate serves both terms, one sigmoid fewer
    same = same_value(temperature, slope_temperature(temperature, grad_temperature))
    args = (theta.view(-1), grad_out.view(-1), scale, threshold, temperature, grad_temperature, same)
    if budget is None:
        result = _call("backward", _backward, *args)
    else:
        result = _call("backward_budget", _backward_with_budget, *args, *budget)
    return None if result is None else result.view_as(theta)


def _call(name: str, formula: Callable, *args: Tensor | bool):
    if _failed:
        return None
    if name in _ready:
        return _compiled[name](*args)
    with _lock:  # the first call compiles: once, even with several threads
        return _first_call(name, formula, *args)


def _first_call(name: str, formula: Callable, *args: Tensor | bool):
    if _failed:
        return None
    if name not in _compiled:
        _compiled[name] = torch.compile(formula, backend=BACKEND, dynamic=True)
    try:
        result = _compiled[name](*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any compile failure: say why and fall back to eager
        _failed.append(" ".join(f"{type(error).__name__}: {error}".split()))  # one line
        warnings.warn(
            "lightning_prune: compiling the fused gate kernels failed, so the eager kernels are used from now on "
            f"(training is unaffected, only slower). torch.compile said: {_failed[0][:500]}. Install a C++ compiler "
            "(CPU) or Triton (GPU), or set compile_gate=False to silence this.",
            RuntimeWarning,
            stacklevel=5,
        )
        return None
    _ready.add(name)
    return result


def _gate(magnitude: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> Tensor:
    factor, offset = gate_factors(scale, threshold, temperature)
    return torch.sigmoid(magnitude * factor - offset)


def _forward(theta: Tensor, scale: Tensor, threshold: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    gate = _gate(wide(theta).abs(), scale, threshold, temperature)
    return theta * gate.to(theta.dtype), gate.sum()


def _local_grad(theta, scale, threshold, temperature, grad_temperature, same: bool) -> Tensor:
    # h_T + (|θ|/(s·T_b))·h_b(1 − h_b); ``same``: T = T_b, so h_T = h_b (a Python bool: one graph for each value)
    magnitude = wide(theta).abs()
    factor_b, offset_b = gate_factors(scale, threshold, slope_temperature(temperature, grad_temperature))
    scaled = magnitude * factor_b
    gate_b = torch.sigmoid(scaled - offset_b)
    gate = gate_b if same else _gate(magnitude, scale, threshold, temperature)
    return gate + scaled * gate_b * (1 - gate_b)


def _backward(theta, grad_out, scale, threshold, temperature, grad_temperature, same: bool) -> Tensor:
    return (grad_out * _local_grad(theta, scale, threshold, temperature, grad_temperature, same)).to(theta.dtype)


def _backward_with_budget(
    theta, grad_out, scale, threshold, temperature, grad_temperature, same: bool, coef, budget_temperature
) -> Tensor:
    gate = _gate(wide(theta).abs(), scale, threshold, budget_temperature)
    factor = torch.reciprocal(scale * budget_temperature)  # d/d|θ| of the gate's logit
    budget = (coef * factor) * torch.sign(theta) * gate * (1 - gate)
    local = _local_grad(theta, scale, threshold, temperature, grad_temperature, same)
    return (grad_out * local + budget).to(theta.dtype)
