"""The report's one error type, and the sentence that says which files it reads."""

from __future__ import annotations

EXPECTED = (
    "a Lightning checkpoint (.ckpt) of a module trained with lightning_prune.BudgetCallback, a compact export "
    "written by lightning_prune.save_pruned (pruned_backbone.pt), or the plain state_dict of a pruned network "
    "saved with torch.save (backbone_state_dict.pt)"
)


class ReportError(ValueError):
    """The file (or the model given for it) cannot be reported on; the message says what was expected."""
