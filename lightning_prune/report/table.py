"""What the report holds (one :class:`TensorRow` per masked tensor, totals, budget, cut, file sizes) and its outputs:
a fixed-width text table, CSV, JSON and a bar chart."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_prune.budget import budget_count
from lightning_prune.report.errors import ReportError

#: What the MAC columns count.
MACS_UNIT = "multiply-accumulates (MACs) per input sample, masked tensors only; 1 MAC = 2 FLOPs"

#: Names of the validation passes of the finalisation, as :attr:`PruningReport.cut_metrics` keys them.
CUT_STAGES = ("before", "after", "after_recalibration")
_CUT_LABELS = {
    "before": "just before",
    "after": "just after the hard cut",
    "after_recalibration": "after BatchNorm re-estimation",
}


@dataclass
class TensorRow:
    """One masked tensor ``<module>.<param>``: its shape, weight count, kept count, and MACs per input sample.

    ``kind`` is the class of the module that holds it (``"Conv2d"``, ``"MultiheadAttention"``), or a guess from the
    shape ending in ``?`` when there is no model. ``dense_macs``/``pruned_macs`` are ``None`` when the report cannot
    tell how often the tensor is applied (no model, or a module it has no rule for).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    weights: int
    kept: int
    dense_macs: int | None = None
    pruned_macs: int | None = None

    @property
    def module_name(self) -> str:
        """``"layers.0.self_attn"`` for ``"layers.0.self_attn.in_proj_weight"`` (``""`` for the root module)."""
        return self.name.rpartition(".")[0]

    @property
    def param_name(self) -> str:
        """``"in_proj_weight"`` for ``"layers.0.self_attn.in_proj_weight"``."""
        return self.name.rpartition(".")[2]

    @property
    def kept_share(self) -> float:
        return self.kept / self.weights if self.weights else 0.0


@dataclass
class PruningReport:
    """What :func:`~lightning_prune.report.pruning_report` found.

    Attributes:
        source: the file reported on.
        source_kind: ``"Lightning checkpoint"``, ``"state_dict (reparametrized)"``, ``"compact export"`` or
            ``"state_dict"``.
        masks: ``"hard"`` (finalised), ``"soft"`` (kept = ``|θ|/s > c``, not finalised) or ``"non-zero weights"``
            (an export: kept = weights that are not zero).
        tensors: one row per masked tensor (for an export: per tensor of 2+ dimensions named ``weight`` or
            ``*_weight``), in the order of the file.
        model: the model whose forward gave the tensors' MACs (class path), or ``None``.
        model_source: where the model came from (``"argument"`` or the ``config.yaml`` path).
        input_size: size of one input sample used for the MACs (without the batch dimension).
        sparsity: the budget asked for (``BudgetCallback.sparsity``), when the file or its config.yaml says.
        coverage: what the budget covered, as ``BudgetCallback`` wrote it in the checkpoint.
        dense_bytes: size of ``torch.save`` of the dense ``state_dict`` (pruned weights as zeros).
        compact_bytes: size of the :func:`~lightning_prune.save_pruned` file of the same weights.
        source_bytes: size of the file itself.
        step: the global step of a checkpoint.
        finalized_step: the step at which the masks were hardened, when known.
        cut_metrics: validation metrics of the finalisation, ``{"before"|"after"|"after_recalibration": {name:
            value}}`` (just before the hard cut, just after it, after BatchNorm re-estimation), when known.
        notes: remarks printed under the table.
    """

    source: str
    source_kind: str
    masks: str
    tensors: list[TensorRow]
    model: str | None = None
    model_source: str | None = None
    input_size: tuple[int, ...] | None = None
    sparsity: float | None = None
    coverage: str | None = None
    dense_bytes: int = 0
    compact_bytes: int = 0
    source_bytes: int = 0
    step: int | None = None
    finalized_step: int | None = None
    cut_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------- totals
    @property
    def weights(self) -> int:
        return sum(row.weights for row in self.tensors)

    @property
    def kept(self) -> int:
        return sum(row.kept for row in self.tensors)

    @property
    def kept_share(self) -> float:
        return self.kept / self.weights if self.weights else 0.0

    @property
    def dense_macs(self) -> int | None:
        """Sum over the rows, ``None`` when any row's MACs are unknown."""
        return _sum_or_none(row.dense_macs for row in self.tensors)

    @property
    def pruned_macs(self) -> int | None:
        return _sum_or_none(row.pruned_macs for row in self.tensors)

    @property
    def keep_asked(self) -> float | None:
        """The keep share asked for, ``1 − sparsity``."""
        return None if self.sparsity is None else 1.0 - self.sparsity

    @property
    def kept_asked(self) -> int | None:
        """The number of weights the budget keeps over these tensors, :func:`~lightning_prune.budget_count`."""
        return None if self.sparsity is None else budget_count(self.weights, self.sparsity)

    # ------------------------------------------------------------ outputs
    def table(self) -> str:
        """The report as fixed-width text: a header, one row per tensor, the totals, budget, cut and files."""
        head = [
            "lightning_prune pruning report",
            f"  file      {self.source} ({_kb(self.source_bytes)})",
            f"  source    {self._source_line()}",
            f"  model     {self._model_line()}",
            f"  MACs      {MACS_UNIT}",
            "",
        ]
        headers = ["tensor", "module", "shape", "weights", "kept", "kept %", "dense MACs", "pruned MACs"]
        rows = [
            [r.name, r.kind, _shape(r.shape), f"{r.weights:,}", f"{r.kept:,}", f"{r.kept_share:.2%}"]
            + [_int(r.dense_macs), _int(r.pruned_macs)]
            for r in self.tensors
        ]
        total = ["total", "", "", f"{self.weights:,}", f"{self.kept:,}", f"{self.kept_share:.2%}"]
        total += [_int(self.dense_macs), _int(self.pruned_macs)]
        tail = ["", f"budget    {self._budget_line()}"]
        if self.coverage:
            tail.append(f"covers    {self.coverage}")
        if self.dense_macs and self.pruned_macs is not None:
            tail.append(
                f"MACs      {self.pruned_macs:,} of {self.dense_macs:,} = {self.pruned_macs / self.dense_macs:.2%} "
                f"of the masked tensors' dense MACs ({self.dense_macs / max(self.pruned_macs, 1):.1f}x fewer)"
            )
        if self.cut_metrics.get("before") and self.cut_metrics.get("after"):
            tail.append(f"cut       {self._cut_line()}")
        ratio = self.compact_bytes / self.dense_bytes if self.dense_bytes else float("nan")
        tail.append(
            f"files     dense state_dict (torch.save) {_kb(self.dense_bytes)}; compact (save_pruned) "
            f"{_kb(self.compact_bytes)} = {ratio:.1%} of dense"
        )
        tail += [f"note      {note}" for note in self.notes]
        return "\n".join(head + _fixed_width(headers, rows, total, right=set(range(3, 8))) + tail)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as plain JSON types."""
        return {
            "source": self.source,
            "source_kind": self.source_kind,
            "masks": self.masks,
            "model": self.model,
            "model_source": self.model_source,
            "input_size": list(self.input_size) if self.input_size else None,
            "macs_unit": MACS_UNIT,
            "tensors": [{**asdict(r), "shape": list(r.shape), "kept_share": r.kept_share} for r in self.tensors],
            "totals": {
                "weights": self.weights,
                "kept": self.kept,
                "kept_share": self.kept_share,
                "dense_macs": self.dense_macs,
                "pruned_macs": self.pruned_macs,
            },
            "budget": {
                "sparsity": self.sparsity,
                "keep_asked": self.keep_asked,
                "kept_asked": self.kept_asked,
                "keep_reached": self.kept_share,
                "kept_reached": self.kept,
                "met": None if self.kept_asked is None else self.kept == self.kept_asked,
                "coverage": self.coverage,
            },
            "cut_metrics": {stage: dict(values) for stage, values in self.cut_metrics.items()},
            "files": {
                "source_bytes": self.source_bytes,
                "dense_bytes": self.dense_bytes,
                "compact_bytes": self.compact_bytes,
            },
            "step": self.step,
            "finalized_step": self.finalized_step,
            "notes": list(self.notes),
        }

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write one row per tensor and a ``total`` row: tensor, kind, shape, weights, kept, kept_share, MACs."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["tensor", "kind", "shape", "weights", "kept", "kept_share", "dense_macs", "pruned_macs"])
            for r in self.tensors:
                writer.writerow([r.name, r.kind, _shape(r.shape), r.weights, r.kept, f"{r.kept_share:.6f}"]
                                + [_blank(r.dense_macs), _blank(r.pruned_macs)])  # fmt: skip
            writer.writerow(["total", "", "", self.weights, self.kept, f"{self.kept_share:.6f}"]
                            + [_blank(self.dense_macs), _blank(self.pruned_macs)])  # fmt: skip

    def plot(self, path: str | os.PathLike) -> None:
        """Save a bar chart of the kept share per tensor (with the budget as a dashed line) as a PNG.

        Raises:
            ReportError: if matplotlib is not installed.
        """
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ReportError("--plot needs matplotlib: pip install matplotlib") from None
        from lightning_prune.pruning_inspector import kept_share_figure

        figure = kept_share_figure(
            [r.name for r in self.tensors],
            [r.kept_share for r in self.tensors],
            budget=self.keep_asked,
            title=f"{Path(self.source).name}: kept {self.kept:,}/{self.weights:,} = {self.kept_share:.2%} "
            f"({self.masks})",
        )
        figure.savefig(path, format="png", dpi=100)
        figure.clear()

    # ----------------------------------------------------------- internals
    def _source_line(self) -> str:
        parts = [self.source_kind]
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.masks == "hard":
            at = f" at step {self.finalized_step}" if self.finalized_step is not None else ""
            parts.append(f"masks hard (finalised{at})")
        elif self.masks == "soft":
            parts.append("masks soft, not finalised (kept = |θ|/s > c)")
        else:
            parts.append("kept = non-zero weights")
        return ", ".join(parts)

    def _model_line(self) -> str:
        if self.model is None:
            return "none (MACs need --model CLASS_PATH --model-args JSON, or config.yaml next to the file)"
        size = "x".join(str(d) for d in self.input_size) if self.input_size else "?"
        origin = f" (from {self.model_source})" if self.model_source else ""
        return f"{self.model}{origin}, input {size}"

    def _budget_line(self) -> str:
        reached = f"reached {self.kept_share:.2%} = {self.kept:,} of {self.weights:,} weights"
        if self.sparsity is None or self.kept_asked is None:
            return f"asked: unknown (no BudgetCallback state or config.yaml); {reached}"
        asked = f"asked {self.keep_asked:.2%} kept (sparsity {self.sparsity:g}) = {self.kept_asked:,} weights"
        gap = self.kept - self.kept_asked
        verdict = "met exactly" if gap == 0 else f"{'over' if gap > 0 else 'under'} by {abs(gap):,} weights"
        if self.masks == "soft":
            verdict += " (not finalised: the hard cut at the end of fit meets it exactly)"
        return f"{asked}; {reached}: {verdict}"

    def _cut_line(self) -> str:
        stages = [s for s in CUT_STAGES if self.cut_metrics.get(s)]
        names = sorted(set.intersection(*(set(self.cut_metrics[s]) for s in stages)))
        label = " -> ".join(_CUT_LABELS[s] for s in stages)
        values = "; ".join(f"{n} " + " -> ".join(f"{self.cut_metrics[s][n]:.4g}" for s in stages) for n in names)
        return f"validation {label}: {values}"


def _sum_or_none(values: Any) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _fixed_width(headers: list[str], rows: list[list[str]], total: list[str], right: set[int]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, total)]

    def line(cells: list[str]) -> str:
        out = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [line(headers), rule, *(line(r) for r in rows), rule, line(total)]


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _int(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _blank(value: int | None) -> int | str:
    return "" if value is None else value


def _kb(n: int) -> str:
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.2f} MB"
