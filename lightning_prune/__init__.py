"""lightning_prune: train and prune at once, with a weight reparametrization and a budget loss.

Implements "Weight Reparametrization for Budget-Aware Network Pruning" (Dupont, Sahbi, Michel, ICIP 2021).
"""

from lightning_prune.budget import (
    add_budget_gradient,
    budget_loss,
    budget_penalty,
    flush_budget_gradient,
    hard_kept_counts,
    soft_kept_shares,
)
from lightning_prune.budget_callback import BudgetCallback, NonFiniteError
from lightning_prune.export import load_pruned, make_permanent, save_pruned
from lightning_prune.finalization import FinalizeResult, budget_count, finalize
from lightning_prune.magnitude_mask import MagnitudeMask
from lightning_prune.pruned_classifier import PrunedClassifier
from lightning_prune.pruning_inspector import PruningInspector
from lightning_prune.reparametrize import (
    DEFAULT_LAYER_TYPES,
    PrunedLayer,
    is_reparametrized,
    pruned_layers,
    reparametrize,
    reparametrize_like,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetCallback",
    "DEFAULT_LAYER_TYPES",
    "FinalizeResult",
    "MagnitudeMask",
    "NonFiniteError",
    "PrunedClassifier",
    "PrunedLayer",
    "PruningInspector",
    "add_budget_gradient",
    "budget_count",
    "budget_loss",
    "budget_penalty",
    "finalize",
    "flush_budget_gradient",
    "hard_kept_counts",
    "is_reparametrized",
    "load_pruned",
    "make_permanent",
    "pruned_layers",
    "reparametrize",
    "reparametrize_like",
    "save_pruned",
    "soft_kept_shares",
]
