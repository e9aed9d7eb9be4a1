"""How long a run is, in optimizer steps: the span of the budget's schedules, or a refusal that names the fix."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.fabric.utilities.data import has_len

from lightning_prune.module_passes import loaders_of

_UNKNOWN_LENGTH = (
    "BudgetCallback needs a finite training length to schedule the target and the temperature: set max_epochs or "
    "max_steps on the Trainer (with max_time, or a training loader without a length such as an IterableDataset, set "
    "max_steps on the Trainer or the steps it will take as total_steps on the callback)."
)


def check_known_length(trainer: pl.Trainer) -> None:
    """Refuse, before the module changes, a run whose length cannot be known: no max_steps and no max_epochs, or
    epochs of a loader without a length (an IterableDataset)."""
    if trainer.max_steps != -1:
        return
    if (trainer.max_epochs or -1) < 0:
        raise ValueError(_UNKNOWN_LENGTH)
    try:
        loaders = trainer.fit_loop._data_source.dataloader()
    except Exception:  # noqa: BLE001 - no loader to look at yet: on_fit_start checks the estimate
        return
    for loader in loaders_of(loaders):
        if not has_len(loader):
            raise ValueError(f"{_UNKNOWN_LENGTH} The training loader has no length.")


def planned_steps(trainer: pl.Trainer) -> int:
    # called in on_fit_start, not setup: it builds the training loader, which must come after a resumed run's
    # checkpoint restored its state (and a resumed run takes the span saved in its checkpoint)
    estimated = trainer.estimated_stepping_batches
    if not math.isfinite(estimated) or estimated <= 0:
        raise ValueError(_UNKNOWN_LENGTH)
    return int(estimated)


def planned_manual_steps(trainer: pl.Trainer, steps: int, batches: int) -> int | None:
    """Under manual optimization Lightning counts batches, but a module may step several optimizers per batch (a GAN)
    or one every few batches: the optimizer steps of the run, from ``steps`` taken over its first ``batches``
    batches (None while none was taken, or when the batches are not counted)."""
    total_batches = trainer.num_training_batches * max(1, trainer.max_epochs or 1)
    if steps <= 0 or not math.isfinite(total_batches):
        return None
    planned = round(steps / batches * total_batches)
    return min(planned, trainer.max_steps) if trainer.max_steps > 0 else planned
