"""lightning_prune: train and prune at once, with a weight reparametrization and a closed-loop budget.

Implements "Weight Reparametrization for Budget-Aware Network Pruning" (Dupont, Sahbi, Michel, ICIP 2021).
What a user calls is here; the maths stays importable from its module (:mod:`lightning_prune.budget`,
:mod:`lightning_prune.budget_loop`, :mod:`lightning_prune.magnitude_mask`, ...).
"""

from lightning_prune.budget import budget_count
from lightning_prune.budget_callback import BudgetCallback
from lightning_prune.budget_loop import LoopSettings
from lightning_prune.channel_removal import remove_channels, save_smaller
from lightning_prune.cut_report import CutReport
from lightning_prune.export import load_pruned, make_permanent, save_pruned
from lightning_prune.finalization import finalize
from lightning_prune.non_finite import NonFiniteError
from lightning_prune.pruned_classifier import PrunedClassifier
from lightning_prune.pruning_inspector import PruningInspector
from lightning_prune.reparametrize import (
    coverage,
    masked_parameters,
    plain_named_parameters,
    reparametrize,
    reparametrize_like,
)
from lightning_prune.sparse_export import SparseLinear, sparse_linear_export
from lightning_prune.weight_recompute import recompute_masked_weights

__version__ = "0.4.0"

__all__ = [
    "BudgetCallback",
    "CutReport",
    "LoopSettings",
    "NonFiniteError",
    "PrunedClassifier",
    "PruningInspector",
    "budget_count",
    "coverage",
    "finalize",
    "load_pruned",
    "make_permanent",
    "masked_parameters",
    "plain_named_parameters",
    "recompute_masked_weights",
    "reparametrize",
    "remove_channels",
    "reparametrize_like",
    "save_smaller",
    "save_pruned",
    "SparseLinear",
    "sparse_linear_export",
]
