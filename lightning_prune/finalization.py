"""Finalisation with no fine-tuning: hard masks that meet the budget exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import get_args

import torch
from torch import Tensor, nn

from lightning_prune.budget import BudgetMode, layer_floor, rounded_budget
from lightning_prune.reparametrize import MaskedParameter, masked_parameters


@dataclass
class FinalizeResult:
    """What :func:`finalize` kept: totals and ``{layer: (kept, numel)}``."""

    kept: int
    total: int
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def kept_share(self) -> float:
        return self.kept / self.total


@torch.no_grad()
def finalize(
    model: nn.Module | list[MaskedParameter],
    sparsity: float,
    min_layer_keep: float = 0.0,
    mode: BudgetMode = "global",
    round_to: int = 1,
) -> FinalizeResult:
    """Replace the soft masks by hard ones that keep exactly ``round((1 − sparsity)·N)`` weights.

    ``mode="global"`` keeps the weights with the largest ``|θ|/s`` over all layers; ``mode="layer"`` gives each layer
    its own share of the budget (largest remainders, so the total is still exact). Each layer keeps at least
    ``layer_floor(numel, min_layer_keep)`` weights. Ties are broken by position (earlier layer, then lower index),
    so the result is deterministic on every device and rank.

    ``round_to`` (channels): each tensor keeps a multiple of ``round_to`` entries (at least one unit; a tensor whose
    size is not a multiple keeps all of its last, smaller unit or none of it), and the budget is
    :func:`~lightning_prune.budget.rounded_budget`, exact when every size is a multiple. Units are ranked over all
    tensors by their weakest entry: a tensor's second unit goes before another's first only if all of its entries
    score higher. Global mode only.

    Raises:
        ValueError: for a sparsity outside [0, 1), floors that need more weights than the budget allows, or
            ``round_to`` with ``mode="layer"``.

    Example:
        >>> import torch
        >>> from lightning_prune import reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10))
        >>> _ = reparametrize(model)
        >>> finalize(model, sparsity=0.9).kept
        10
    """
    if mode not in get_args(BudgetMode):
        raise ValueError(f"mode must be one of {get_args(BudgetMode)}, got {mode!r}.")
    if not 0.0 <= min_layer_keep <= 1.0:
        raise ValueError(f"min_layer_keep is a share of each layer in [0, 1], got {min_layer_keep}.")
    if not (isinstance(round_to, int) and round_to >= 1) or (round_to > 1 and mode != "global"):
        raise ValueError(f"round_to takes a whole number of entries >= 1, in global mode only; got {round_to} "
                         f"with mode={mode!r}.")
    layers = model if isinstance(model, list) else masked_parameters(model)
    if not layers:
        raise ValueError("No reparametrized tensor to finalise: call lightning_prune.reparametrize(model) first.")
    sizes = [layer.numel for layer in layers]
    total = sum(sizes)
    budget = rounded_budget(total, sparsity, round_to)
    floors = [layer_floor(n, min_layer_keep, round_to) for n in sizes]
    if sum(floors) > budget:
        raise ValueError(
            f"min_layer_keep={min_layer_keep} needs {sum(floors)} weights but the budget keeps {budget}: "
            "lower min_layer_keep or the sparsity."
        )
    scores = [layer.mask.score(layer.latent).flatten().double().cpu() for layer in layers]
    if mode == "layer":
        quotas = _apportion(sizes, budget)
        masks = [_top(s, max(q, f)) for s, q, f in zip(scores, quotas, floors)]
        excess = sum(int(m.sum()) for m in masks) - budget
        if excess:  # a floor above a layer's quota: take the excess from the others' weakest weights
            masks = _global_fill(scores, [_top(s, f) for s, f in zip(scores, floors)], budget, allowed=masks)
    elif round_to > 1:
        counts = _unit_counts(scores, floors, budget, round_to)
        masks = [_top(s, k) for s, k in zip(scores, counts)]
    else:
        masks = _global_fill(scores, [_top(s, f) for s, f in zip(scores, floors)], budget)
    per_layer = {}
    for layer, mask in zip(layers, masks):
        layer.mask.harden(mask.view(layer.latent.shape).to(layer.latent.device))
        per_layer[layer.name] = (int(mask.sum()), layer.numel)
    return FinalizeResult(kept=sum(k for k, _ in per_layer.values()), total=total, per_layer=per_layer)


def _top(score: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries, ties to the lower index."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        order = torch.sort(score, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask


def _global_fill(scores: list[Tensor], reserved: list[Tensor], budget: int, allowed: list[Tensor] | None = None):
    """Keep the reserved weights, then fill up to ``budget`` with the best remaining scores over all layers."""
    flat = torch.cat(scores)
    chosen = torch.cat(reserved)
    candidates = ~chosen if allowed is None else (~chosen & torch.cat(allowed))
    remaining = budget - int(chosen.sum())
    ranked = torch.where(candidates, flat, torch.full_like(flat, -math.inf))
    order = torch.sort(ranked, descending=True, stable=True).indices[:remaining]
    chosen[order] = True
    return list(torch.split(chosen, [s.numel() for s in scores]))


def _unit_counts(scores: list[Tensor], floors: list[int], budget: int, unit: int) -> list[int]:
    """How many entries each tensor keeps, in units of ``unit``: the floors, then the units with the best weakest
    entry over all tensors, while they fit in ``budget``."""
    counts = list(floors)
    units = []  # (weakest score of the unit, tensor, start, size), the units after each tensor's floor
    for i, score in enumerate(scores):
        ranked = torch.sort(score, descending=True, stable=True).values
        for start in range(floors[i], score.numel(), unit):
            size = min(unit, score.numel() - start)
            units.append((-float(ranked[start + size - 1]), i, start, size))
    left = budget - sum(counts)
    for _, i, start, size in sorted(units):
        if size <= left and counts[i] == start:  # a tensor's units in order
            counts[i] += size
            left -= size
    return counts


def _apportion(sizes: list[int], budget: int) -> list[int]:
    """Split ``budget`` over layers in proportion to their sizes, largest remainders first (exact total)."""
    total = sum(sizes)
    exact = [budget * n / total for n in sizes]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[: budget - sum(quotas)]:
        quotas[i] += 1
    return quotas
