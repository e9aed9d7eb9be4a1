"""lightning_prune: train and prune at once, with a weight reparametrization and a closed-loop budget.

Implements "Weight Reparametrization for Budget-Aware Network Pruning" (Dupont, Sahbi, Michel, ICIP 2021).
"""

from lightning_prune.budget import budget_count, budget_step, hard_kept_counts, margin_gap, optimizer_metric
from lightning_prune.budget_callback import BudgetCallback
from lightning_prune.budget_controller import BudgetController
from lightning_prune.export import load_pruned, make_permanent, save_pruned
from lightning_prune.finalization import FinalizeResult, finalize
from lightning_prune.magnitude_mask import MagnitudeMask
from lightning_prune.non_finite import NonFiniteError
from lightning_prune.pruned_classifier import PrunedClassifier
from lightning_prune.pruning_inspector import PruningInspector
from lightning_prune.reparametrize import (
    Coverage,
    MaskedParameter,
    coverage,
    masked_parameters,
    prunable_parameters,
    reparametrize,
    reparametrize_like,
)

__version__ = "0.2.0"

__all__ = [
    "BudgetCallback",
    "BudgetController",
    "Coverage",
    "FinalizeResult",
    "MagnitudeMask",
    "MaskedParameter",
    "NonFiniteError",
    "PrunedClassifier",
    "PruningInspector",
    "budget_count",
    "budget_step",
    "coverage",
    "finalize",
    "hard_kept_counts",
    "load_pruned",
    "make_permanent",
    "margin_gap",
    "masked_parameters",
    "optimizer_metric",
    "prunable_parameters",
    "reparametrize",
    "reparametrize_like",
    "save_pruned",
]
