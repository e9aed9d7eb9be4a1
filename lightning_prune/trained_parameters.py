"""Which parameters the module's optimizers train, asked of its ``configure_optimizers`` before anything changes."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks.finetuning import BaseFinetuning
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.utilities import rank_zero_info


def trained_parameter_ids(trainer: pl.Trainer, pl_module: pl.LightningModule) -> set[int] | None:
    """The ``id`` of every parameter in a group of the optimizers ``configure_optimizers`` returns, or ``None`` when
    that cannot say which weights train: no optimizer, a call that fails (it is called again by Lightning, which
    reports the error), or a finetuning callback that adds parameter groups during training (BackboneFinetuning).

    The call happens before the callback changes the module, so a name-based ``configure_optimizers`` sees the plain
    names. The optimizers it builds are thrown away: Lightning calls it again after set-up, as its learning-rate
    finder does.
    """
    if any(isinstance(cb, BaseFinetuning) for cb in trainer.callbacks):
        return None
    loop = trainer.fit_loop
    loader = getattr(loop, "_combined_loader", None)
    try:
        optimizers, _, _ = _configure_optimizers(pl_module.configure_optimizers())
    except Exception as error:  # noqa: BLE001  (Lightning's own call reports it, with the note on the renaming)
        rank_zero_info(f"BudgetCallback: configure_optimizers could not be called at set-up ({type(error).__name__}: "
                       f"{error}); every weight stays in the budget, whether an optimizer trains it or not.")
        return None
    finally:
        if loader is None and getattr(loop, "_combined_loader", None) is not None:
            # it read trainer.estimated_stepping_batches, which built the training loader: Lightning builds it
            # again after a resumed run's checkpoint has restored its state
            loop._combined_loader = None
    groups = [group for optimizer in optimizers for group in getattr(optimizer, "param_groups", [])]
    if not groups:
        return None
    return {id(p) for group in groups for p in group["params"]}
