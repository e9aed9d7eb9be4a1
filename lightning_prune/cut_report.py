"""CutReport: what the cut at the end of fit did, as fields that the callback, the CLI summary and the report read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CutReport:
    """What :class:`~lightning_prune.BudgetCallback` measured: the coverage at set-up, then the cut's figures.

    Attributes:
        coverage: one line that says which tensors the budget covers (set at set-up).
        step: optimizer step of the cut (None before it).
        planned_steps: optimizer steps the schedules spanned.
        kept, total: weights kept by the hard masks, and covered.
        kept_soft_before, kept_hard_before: shares in use just before the cut (soft gates, binary masks).
        val_before_cut, val_after_cut, val_after_recalibration: what the module's ``validation_step`` logged before
            the cut, after it, and after BatchNorm re-estimation (empty when not measured).
        per_tensor: ``{tensor: (kept, numel)}``.

    Example:
        >>> report = CutReport(coverage="the budget covers 2 tensors", step=100, kept=10, total=100)
        >>> report.kept_share, report.cut_done
        (0.1, True)
        >>> CutReport.from_dict(report.to_dict()) == report
        True
    """

    coverage: str = ""
    step: int | None = None
    planned_steps: int | None = None
    kept: int = 0
    total: int = 0
    kept_soft_before: float | None = None
    kept_hard_before: float | None = None
    val_before_cut: dict[str, float] = field(default_factory=dict)
    val_after_cut: dict[str, float] = field(default_factory=dict)
    val_after_recalibration: dict[str, float] = field(default_factory=dict)
    per_tensor: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def cut_done(self) -> bool:
        return self.step is not None

    @property
    def kept_share(self) -> float | None:
        return self.kept / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (saved in checkpoints, read without lightning_prune's classes)."""
        values = dataclasses.asdict(self)
        values["per_tensor"] = {name: list(v) for name, v in self.per_tensor.items()}
        values["kept_share"] = self.kept_share
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CutReport:
        names = {f.name for f in dataclasses.fields(cls)}
        report = cls(**{k: v for k, v in values.items() if k in names})
        report.per_tensor = {name: tuple(v) for name, v in report.per_tensor.items()}
        return report
