"""Pruning report of a checkpoint or an export: per masked tensor, its weights, kept weights and MACs; the budget
asked and reached, the cut's validation metrics, and file sizes.

Run it as ``python -m lightning_prune.report CHECKPOINT_OR_EXPORT [--csv PATH] [--json PATH] [--plot PATH.png]``.

The package, one job a module: :mod:`~lightning_prune.report.reading` (what a file holds),
:mod:`~lightning_prune.report.macs` (MACs from forward hooks), :mod:`~lightning_prune.report.model` (the model and
input size from the run's ``config.yaml``), :mod:`~lightning_prune.report.sizes` (dense and compact save sizes),
:mod:`~lightning_prune.report.table` (the report and its outputs), :mod:`~lightning_prune.report.assemble`
(:func:`pruning_report`), :mod:`~lightning_prune.report.cli` (the command line).
"""

from lightning_prune.report.assemble import pruning_report
from lightning_prune.report.cli import main
from lightning_prune.report.errors import EXPECTED, ReportError
from lightning_prune.report.macs import MAC_LAYER_TYPES, count_macs
from lightning_prune.report.model import DEFAULT_INPUT_SIZE, build_model, input_size_from_args
from lightning_prune.report.table import MACS_UNIT, PruningReport, TensorRow

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "EXPECTED",
    "MACS_UNIT",
    "MAC_LAYER_TYPES",
    "PruningReport",
    "ReportError",
    "TensorRow",
    "build_model",
    "count_macs",
    "input_size_from_args",
    "main",
    "pruning_report",
]
