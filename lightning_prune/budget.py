"""The budget loss: drives the soft share of kept weights towards a target keep share."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from lightning_prune.gate_kernels import add_gate_grad, gate_grad
from lightning_prune.reparametrize import PrunedLayer, pruned_layers

BUDGET_MODES = ("global", "layer")


def soft_kept_shares(layers: list[PrunedLayer], grad_temperature: float | None = None) -> tuple[Tensor, Tensor]:
    """Differentiable kept shares ``Σ h_T(θ) / N``: over all layers together, and per layer (a 1-D tensor).

    ``grad_temperature`` widens the surrogate gradient (see :meth:`MagnitudeMask.soft_gate`); the values are exact.
    Each layer's count comes from its last training forward pass when θ has not changed since.
    """
    return _shares(_kept_counts(layers, grad_temperature), layers)


def _kept_counts(layers: list[PrunedLayer], grad_temperature: float | None = None) -> Tensor:
    """The soft kept count of each layer (1-D, float32), differentiable unless gradients are off."""
    if not layers:
        raise ValueError("No reparametrized layer: call lightning_prune.reparametrize(model) first.")
    return torch.stack([layer.mask.soft_kept_count(layer.latent, grad_temperature).float() for layer in layers])


def _shares(counts: Tensor, layers: list[PrunedLayer]) -> tuple[Tensor, Tensor]:
    sizes = _sizes(tuple(layer.numel for layer in layers), counts.dtype, counts.device)
    return counts.sum() / sizes.sum(), counts / sizes


@functools.lru_cache(maxsize=8)
def _sizes(numels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # built once per set of layers rather than every step (a host-to-device copy on an accelerator)
    return torch.tensor(numels, dtype=dtype, device=device)


#: Width of the quadratic zone of the budget penalty, as a relative gap ``kept/keep − 1``.
BUDGET_HUBER_DELTA = 0.1


def budget_penalty(kept: Tensor, keep: float, delta: float = BUDGET_HUBER_DELTA) -> Tensor:
    """Huber penalty of the relative gap ``g = kept/keep − 1``, divided by ``delta``.

    ``g²/(2δ)`` for ``|g| <= δ``, ``|g| − δ/2`` beyond: the gradient is bounded (at most 1 per unit of relative gap)
    while the kept share is far from the target, and near the target it is ``g/δ``, ten times the plain squared
    gap's ``2g`` at the default ``δ = 0.1``, so the kept share closes the last few percent instead of stalling above
    the budget.

    Example:
        >>> import torch
        >>> round(float(budget_penalty(torch.tensor(0.15), keep=0.1)), 6)  # 50% above the budget: linear zone
        0.45
        >>> round(float(budget_penalty(torch.tensor(0.105), keep=0.1)), 6)  # 5% above: quadratic zone
        0.0125
    """
    gap = kept / keep - 1.0
    magnitude = gap.abs()
    return torch.where(magnitude <= delta, gap * gap / (2 * delta), magnitude - delta / 2)


def budget_loss(
    model: nn.Module | list[PrunedLayer], keep: float, mode: str = "global", grad_temperature: float | None = None
) -> Tensor:
    """Budget loss: :func:`budget_penalty` of the gap between the soft kept share and the target keep share.

    The gap is relative (``kept/keep − 1``), so one λ works at every budget: a gap of one budget's worth of weights
    costs the same at 50% and at 99% sparsity (an absolute gap shrinks with ``keep`` and stalls above small budgets).

    ``mode="global"`` uses one share over all weights in scope (layers compete for the budget, ranked by ``|θ|/s``);
    ``mode="layer"`` averages the penalty of each layer's own share. ``grad_temperature`` sets how far from the
    threshold the budget's gradient reaches (see :meth:`MagnitudeMask.soft_gate`).

    Example:
        >>> import torch
        >>> from lightning_prune import reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = reparametrize(model)
        >>> loss = budget_loss(model, keep=0.1)
        >>> loss.backward()
        >>> bool(loss > 0) and model[0].parametrizations.weight.original.grad is not None
        True
    """
    _check_budget(keep, mode)
    layers = model if isinstance(model, list) else pruned_layers(model)
    return _penalty(*soft_kept_shares(layers, grad_temperature), keep, mode)


def add_budget_gradient(
    model: nn.Module | list[PrunedLayer],
    keep: float,
    mode: str = "global",
    grad_temperature: float | None = None,
    weight: float = 1.0,
    in_backward: bool = False,
) -> Tensor:
    """Add ``weight · ∂budget_loss/∂θ`` to each latent weight's ``.grad`` in place; return the budget loss.

    The same gradients as ``(weight * budget_loss(model, keep, mode, grad_temperature)).backward()``, computed
    without an autograd graph over the weights: the soft kept counts come from the layers' last training forward
    pass (when θ has not changed since), and each layer's gradient is added into ``.grad`` directly instead of
    through a weight-sized gradient tensor. Tensor hooks registered on the latent weights do not see this gradient
    (with ``in_backward=True`` they do, for the layers the backward pass reaches).

    With ``in_backward=True`` the gradients are not added now: each layer's next backward pass adds its share to the
    gradient it computes for θ, in the same pass over the weight (θ is read once per step instead of twice). Call it
    between the forward pass and ``backward()``, then :func:`flush_budget_gradient` after ``backward()`` for the
    layers that pass did not reach. This is what :class:`~lightning_prune.BudgetCallback` does in each optimizer
    step, unless it accumulates gradients, scales the loss (16-bit mixed precision) or optimizes manually: then it
    adds the gradient before the optimizer step with ``in_backward=False``.

    Example:
        >>> import torch
        >>> from lightning_prune import budget_loss, pruned_layers, reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = reparametrize(model)
        >>> theta = pruned_layers(model)[0].latent
        >>> loss = add_budget_gradient(model, keep=0.1, weight=2.0)
        >>> direct = theta.grad.clone()
        >>> theta.grad = None
        >>> (2.0 * budget_loss(model, keep=0.1)).backward()
        >>> torch.allclose(direct, theta.grad)
        True
        >>> theta.grad = None
        >>> x = torch.randn(8, 64)
        >>> _ = add_budget_gradient(model, keep=0.1, weight=2.0, in_backward=True)
        >>> model(x).sum().backward()  # the task's gradient and the budget's, in one pass over θ
        >>> flush_budget_gradient(model)  # layers that backward pass did not reach
        0
        >>> task = torch.autograd.grad(model(x).sum(), theta)[0]
        >>> torch.allclose(theta.grad - task, direct, atol=1e-6)
        True
    """
    _check_budget(keep, mode)
    layers = model if isinstance(model, list) else pruned_layers(model)
    with torch.no_grad():
        counts = _kept_counts(layers)
    with torch.enable_grad():
        counts.requires_grad_(True)
        loss = _penalty(*_shares(counts, layers), keep, mode)
        (coefs,) = torch.autograd.grad(loss * weight, counts)
    with torch.no_grad():
        for layer, coef in zip(layers, coefs):
            if not layer.latent.requires_grad:
                continue
            temperature = layer.mask.slope_temperature(grad_temperature)
            if in_backward:
                layer.mask.request_budget_grad(coef, temperature)
            else:
                _add_layer_budget_gradient(layer, coef, temperature)
    return loss.detach()


def flush_budget_gradient(model: nn.Module | list[PrunedLayer]) -> int:
    """Add the budget gradients requested by ``add_budget_gradient(..., in_backward=True)`` that no backward pass
    added (a layer the loss did not use, or every layer of a model run under ``torch.compile``, whose compiled
    backward does not read requests); return how many layers that was."""
    layers = model if isinstance(model, list) else pruned_layers(model)
    flushed = 0
    with torch.no_grad():
        for layer in layers:
            request = layer.mask.take_budget_grad()
            if request is not None:
                _add_layer_budget_gradient(layer, *request)
                flushed += 1
    return flushed


def _add_layer_budget_gradient(layer: PrunedLayer, coef: Tensor, temperature: Tensor) -> None:
    mask, theta = layer.mask, layer.latent
    if theta.grad is None:
        theta.grad = gate_grad(theta, mask.scale, mask.threshold, temperature, coef)
    else:
        add_gate_grad(theta.grad, theta, mask.scale, mask.threshold, temperature, coef)


def _check_budget(keep: float, mode: str) -> None:
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode must be one of {BUDGET_MODES}, got {mode!r}.")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep share must be in (0, 1], got {keep}.")


def _penalty(total: Tensor, per_layer: Tensor, keep: float, mode: str) -> Tensor:
    if mode == "global":
        return budget_penalty(total, keep)
    return budget_penalty(per_layer, keep).mean()


@torch.no_grad()
def hard_kept_counts(model: nn.Module | list[PrunedLayer]) -> dict[str, tuple[int, int]]:
    """``{layer name: (kept, numel)}`` of the binary masks in use (``1{|θ|/s > c}`` until finalised)."""
    layers = model if isinstance(model, list) else pruned_layers(model)
    return {layer.name: (int(layer.mask.hard_gate(layer.latent).sum()), layer.numel) for layer in layers}
