"""The budget loss: drives the soft share of kept weights towards a target keep share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune.reparametrize import PrunedLayer, pruned_layers

BUDGET_MODES = ("global", "layer")


def soft_kept_shares(layers: list[PrunedLayer], grad_temperature: float | None = None) -> tuple[Tensor, Tensor]:
    """Differentiable kept shares ``Σ h_T(θ) / N``: over all layers together, and per layer (a 1-D tensor).

    ``grad_temperature`` widens the surrogate gradient (see :meth:`MagnitudeMask.soft_gate`); the values are exact.
    """
    if not layers:
        raise ValueError("No reparametrized layer: call lightning_prune.reparametrize(model) first.")
    sums = torch.stack([layer.mask.soft_gate(layer.latent, grad_temperature).float().sum() for layer in layers])
    sizes = torch.tensor([layer.numel for layer in layers], dtype=sums.dtype, device=sums.device)
    return sums.sum() / sizes.sum(), sums / sizes


def budget_loss(
    model: nn.Module | list[PrunedLayer], keep: float, mode: str = "global", grad_temperature: float | None = None
) -> Tensor:
    """Squared relative gap ``((kept_soft − keep)/keep)²`` between the soft kept share and the target keep share.

    Dividing by ``keep`` makes one λ work at every budget: a gap of one budget's worth of weights costs the same at
    50% and at 99% sparsity (the plain squared gap shrinks with ``keep²`` and stalls above small budgets).

    ``mode="global"`` uses one share over all weights in scope (layers compete for the budget, ranked by ``|θ|/s``);
    ``mode="layer"`` averages the squared gap of each layer's own share. ``grad_temperature`` sets how far from the
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
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget mode must be one of {BUDGET_MODES}, got {mode!r}.")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep share must be in (0, 1], got {keep}.")
    layers = model if isinstance(model, list) else pruned_layers(model)
    total, per_layer = soft_kept_shares(layers, grad_temperature)
    if mode == "global":
        return ((total - keep) / keep) ** 2
    return (((per_layer - keep) / keep) ** 2).mean()


@torch.no_grad()
def hard_kept_counts(model: nn.Module | list[PrunedLayer]) -> dict[str, tuple[int, int]]:
    """``{layer name: (kept, numel)}`` of the binary masks in use (``1{|θ|/s > c}`` until finalised)."""
    layers = model if isinstance(model, list) else pruned_layers(model)
    return {layer.name: (int(layer.mask.hard_gate(layer.latent).sum()), layer.numel) for layer in layers}
