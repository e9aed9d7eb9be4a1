"""Per-step gradual magnitude pruning (GMP, Zhu & Gupta 2017, "To prune, or not to prune"), a baseline of
``accuracy_at_budget.py``.

Every ``prune_every`` optimizer steps, one global magnitude threshold over the Conv/Linear weights sets the masks
to the cubic schedule ``s·(1 − (1 − r)³)``, ``r = step / (target_end·total_steps)``; the masked weights are zero in
every forward pass from then on (their gradients are zeroed before each optimizer step and the weights after it),
and training goes on with fixed masks once the schedule reaches ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_prune import budget_count

#: The layers whose ``weight`` is pruned: the same set as the other methods of the benchmark.
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Default pruning interval, as a share of the ramp's optimizer steps.
PRUNE_EVERY_SHARE = 0.015


def gmp_sparsity(step: int, sparsity: float, ramp_steps: int) -> float:
    """The schedule's sparsity after ``step`` optimizer steps: ``s·(1 − (1 − r)³)``, ``r = min(1, step/ramp_steps)``.

    Example:
        >>> [round(gmp_sparsity(t, 0.9, 100), 4) for t in (0, 50, 100, 150)]
        [0.0, 0.7875, 0.9, 0.9]
    """
    r = min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0
    return sparsity if r >= 1.0 else sparsity * (1.0 - (1.0 - r) ** 3)


class GradualMagnitudePruning(pl.Callback):
    """Gradual magnitude pruning with a global threshold, on the optimizer-step count.

    The target sparsity follows :func:`gmp_sparsity`: it reaches ``sparsity`` after ``ramp_steps =
    ceil(target_end·total_steps)`` optimizer steps. Pruning steps are the multiples of ``prune_every`` below
    ``ramp_steps``, and ``ramp_steps`` itself; at each, right after that optimizer step, the ``budget_count(N, s_t)``
    weights of largest magnitude among those still kept (over all covered tensors together: one threshold) keep their
    mask, so the last pruning step keeps exactly ``round((1 − sparsity)·N)`` weights. Masks only shrink. Weights
    outside the mask are zero in every forward pass: their gradients are zeroed before each optimizer step and the
    weights themselves after it (momentum or Adam's running averages cannot revive them).

    Args:
        sparsity: share of the covered weights removed at the end, in [0, 1).
        target_end: share of training (optimizer steps) at which the schedule reaches ``sparsity``, in (0, 1].
        prune_every: optimizer steps between pruning steps (Δt); default ``max(1, round(0.015·ramp_steps))``.
        total_steps: optimizer steps the schedule spans; default ``trainer.estimated_stepping_batches``.
        parameters_to_prune: ``(module, name)`` pairs to prune; default the ``weight`` of every Conv/Linear layer of
            the LightningModule.

    Attributes:
        masks: one boolean mask per covered tensor (True: kept), once the fit has started.
        ramp_steps: optimizer steps after which the schedule is at ``sparsity``, once the fit has started.
        every: the pruning interval in use (``prune_every`` or its default), once the fit has started.
        history: one entry per pruning step: ``step``, ``target_sparsity``, ``kept``, ``total`` and the global
            ``threshold`` (smallest magnitude kept).

    Example:
        >>> callback = GradualMagnitudePruning(sparsity=0.9, prune_every=5)
        >>> callback.sparsity, callback.target_end
        (0.9, 0.6)
    """

    def __init__(
        self,
        *,
        sparsity: float,
        target_end: float = 0.6,
        prune_every: int | None = None,
        total_steps: int | None = None,
        parameters_to_prune: Sequence[tuple[nn.Module, str]] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
        if not 0.0 < target_end <= 1.0:
            raise ValueError(f"target_end must be in (0, 1], got {target_end}.")
        if prune_every is not None and prune_every < 1:
            raise ValueError(f"prune_every must be >= 1, got {prune_every}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        self.sparsity = float(sparsity)
        self.target_end = float(target_end)
        self.prune_every = prune_every
        self.total_steps = total_steps
        self.parameters_to_prune = list(parameters_to_prune) if parameters_to_prune is not None else None
        self.masks: list[Tensor] = []
        self.history: list[dict[str, Any]] = []
        self.ramp_steps = 0
        self.every = prune_every or 1
        self._params: list[tuple[nn.Module, str]] = []
        self._last_step = -1

    # ------------------------------------------------------------------ schedule
    def pruning_steps(self) -> list[int]:
        """The optimizer-step counts after which the masks are updated (set once the fit has started)."""
        return sorted({*range(self.every, self.ramp_steps, self.every), self.ramp_steps})

    def kept_at(self, step: int) -> int:
        """Weights the schedule keeps after ``step`` optimizer steps."""
        return budget_count(self.total, gmp_sparsity(step, self.sparsity, self.ramp_steps))

    @property
    def total(self) -> int:
        """Weights covered."""
        return sum(m.numel() for m in self.masks)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = self.parameters_to_prune or [(m, "weight") for m in pl_module.modules() if isinstance(m, PRUNABLE)]
        if not self._params:
            raise ValueError("GradualMagnitudePruning: no Conv/Linear weights to prune.")
        if not self.masks:
            self.masks = [torch.ones_like(getattr(m, name), dtype=torch.bool) for m, name in self._params]
        total = self.total_steps
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError("GradualMagnitudePruning needs max_epochs or max_steps, or total_steps.")
            total = int(estimated)
        self.ramp_steps = max(1, math.ceil(self.target_end * total))
        self.every = self.prune_every or max(1, round(PRUNE_EVERY_SHARE * self.ramp_steps))
        self._pruning_steps = set(self.pruning_steps())
        self._last_step = trainer.global_step
        self.apply_masks()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        with torch.no_grad():
            for (module, name), mask in zip(self._params, self.masks):
                grad = getattr(module, name).grad
                if grad is not None:
                    grad.mul_(mask)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if step in self._pruning_steps:
            self.update_masks(self.kept_at(step), step)
        self.apply_masks()

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zeroes the weights outside the masks."""
        for (module, name), mask in zip(self._params, self.masks):
            getattr(module, name).mul_(mask)

    @torch.no_grad()
    def update_masks(self, kept: int, step: int = -1) -> float:
        """Keeps the ``kept`` weights of largest magnitude among those still kept, over all tensors at once; returns
        the global threshold (the smallest magnitude kept)."""
        weights = [getattr(m, name) for m, name in self._params]
        # a weight already pruned scores below every kept one, so masks only shrink and ties cannot revive it
        scores = torch.cat([torch.where(mask, w.abs(), -1.0).flatten() for w, mask in zip(weights, self.masks)])
        kept = min(kept, int(sum(int(mask.sum()) for mask in self.masks)))
        top = torch.topk(scores, kept, sorted=False)
        flat = torch.zeros_like(scores, dtype=torch.bool)
        flat[top.indices] = True
        threshold = float(top.values.min()) if kept else math.inf
        self.masks = [part.view_as(w) for part, w in zip(flat.split([w.numel() for w in weights]), weights)]
        self.history.append({"step": step, "target_sparsity": gmp_sparsity(step, self.sparsity, self.ramp_steps),
                             "kept": kept, "total": self.total, "threshold": threshold})
        self.apply_masks()
        return threshold
