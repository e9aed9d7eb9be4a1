"""The budget loss: drives the soft share of kept weights towards a target keep share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune.reparametrize import PrunedLayer, pruned_layers

BUDGET_MODES = ("global", "layer")


def soft_kept_shares(layers: list[PrunedLayer]) -> tuple[Tensor, Tensor]:
    """Differentiable kept shares ``Σ h_T(θ) / N``: over all layers together, and per layer (a 1-D tensor)."""
    if not layers:
        raise ValueError("No reparametrized layer: call lightning_prune.reparametrize(model) first.")
    sums = torch.stack([layer.mask.soft_gate(layer.latent).float().sum() for layer in layers])
    sizes = torch.tensor([layer.numel for layer in layers], dtype=sums.dtype, device=sums.device)
    return sums.sum() / sizes.sum(), sums / sizes


def budget_loss(model: nn.Module | list[PrunedLayer], keep: float, mode: str = "global") -> Tensor:
    """Squared gap between the soft kept share and the target keep share ``keep = 1 − sparsity``.

    ``mode="global"`` uses one share over all weights in scope (layers compete for the budget, ranked by ``|θ|/s``);
    ``mode="layer"`` averages the squared gap of each layer's own share.

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
    total, per_layer = soft_kept_shares(layers)
    if mode == "global":
        return (total - keep) ** 2
    return ((per_layer - keep) ** 2).mean()


@torch.no_grad()
def hard_kept_counts(model: nn.Module | list[PrunedLayer]) -> dict[str, tuple[int, int]]:
    """``{layer name: (kept, numel)}`` of the binary masks in use (``1{|θ|/s > c}`` until finalised)."""
    layers = model if isinstance(model, list) else pruned_layers(model)
    return {layer.name: (int(layer.mask.hard_gate(layer.latent).sum()), layer.numel) for layer in layers}
