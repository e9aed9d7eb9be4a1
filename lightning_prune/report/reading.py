"""Reading a file for the report: which kind it is (Lightning checkpoint, compact export, plain ``state_dict``), one
row per masked tensor with its kept count, the checkpoint's budget state, and the dense ``state_dict`` it stands for.

A tensor masked by lightning_prune appears in a ``state_dict`` as ``<module>.parametrizations.<param>.original`` (the
latent θ) beside its mask's buffers ``<module>.parametrizations.<param>.0.{scale,threshold,...,hard,mask}``; its row
is named ``<module>.<param>`` (``features.0.weight``, ``layers.0.self_attn.in_proj_weight``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_prune.checkpoint_format import reparametrized_state_dict
from lightning_prune.cut_report import CutReport
from lightning_prune.export import COMPACT_FORMAT, load_pruned
from lightning_prune.magnitude_mask import MagnitudeMask
from lightning_prune.reparametrize import COMPILED, LATENT_KEY
from lightning_prune.report.errors import EXPECTED, ReportError
from lightning_prune.report.table import PruningReport, TensorRow

#: Names of the tensors lightning_prune's rule selects (``weight`` or ``*_weight``), for files without masks.
_WEIGHT_NAME = re.compile(r"(?:^|\.)(?:[^.]*_)?weight$")
_MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_BUFFER = re.compile(r"^(?P<base>(?:.+\.)?parametrizations\.[^.]+\.)0\.(?P<buffer>[^.]+)$")
_BACKBONE = "backbone."


class Reading(NamedTuple):
    """What a file holds: the report's rows and checkpoint facts, the dense ``state_dict`` (θ ⊙ mask under
    ``<module>.<param>``), and the class name the compact save records."""

    report: PruningReport
    dense: dict[str, Tensor]
    class_name: str


def read(path: Path) -> Reading:
    """Read ``path`` and count, per masked tensor, its weights and kept weights.

    Raises:
        ReportError: if the file is missing, not readable with ``torch.load(weights_only=True)``, or none of the
            kinds in :data:`~lightning_prune.report.errors.EXPECTED`.
    """
    payload = _load(path)
    if isinstance(payload, Mapping) and "format" in payload:
        if payload["format"] != COMPACT_FORMAT:
            raise ReportError(
                f"{path} has format {payload['format']!r}, this version reads {COMPACT_FORMAT!r}. Expected {EXPECTED}."
            )
        return _plain(path, _uncompiled(load_pruned(path)), "compact export", str(payload.get("class", "Module")))
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        state = _uncompiled(reparametrized_state_dict(payload))
        if not masked_tensors(state):
            raise ReportError(
                f"{path} is a Lightning checkpoint but holds no tensor masked by lightning_prune (no "
                "'<module>.parametrizations.<param>.original' key with its mask's buffers): the module was not trained "
                f"with lightning_prune.BudgetCallback. Expected {EXPECTED}."
            )
        report, dense, _ = _masked(path, state, "Lightning checkpoint")
        _read_callback_state(report, payload)
        recorded = payload.get("lightning_prune")  # PrunedClassifier records its backbone's class name
        class_name = recorded.get("backbone") if isinstance(recorded, Mapping) else None
        return Reading(report, dense, class_name if isinstance(class_name, str) else "Module")
    if isinstance(payload, Mapping) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        state = _uncompiled(payload)
        if masked_tensors(state):
            return _masked(path, state, "state_dict (reparametrized)")
        return _plain(path, state, "state_dict", "Module")
    kind = type(payload).__name__
    raise ReportError(f"{path} holds a {kind} that is not a checkpoint of lightning_prune. Expected {EXPECTED}.")


def masked_tensors(state: Mapping[str, Any]) -> dict[str, str]:
    """``{"<module>.<param>": latent key}`` of the tensors of ``state`` masked by lightning_prune, in file order.

    Example:
        >>> import torch
        >>> from lightning_prune import reparametrize
        >>> attention = torch.nn.MultiheadAttention(8, 2)
        >>> _ = reparametrize(attention)
        >>> masked_tensors(attention.state_dict())["in_proj_weight"]
        'parametrizations.in_proj_weight.original'
        >>> sorted(masked_tensors(attention.state_dict()))
        ['in_proj_weight', 'out_proj.weight']
    """
    found = {}
    for key in state:
        match = LATENT_KEY.match(key)
        # another parametrization (weight_norm, orthogonal) has no MagnitudeMask buffers
        if match is not None and key.replace(".original", ".0.hard") in state:
            module = match["module"]
            found[f"{module}.{match['param']}" if module else match["param"]] = key
    return found


def kind_guess(name: str, shape: tuple[int, ...]) -> str:
    """The module class a tensor probably belongs to, from its name and shape (``"Conv2d?"``), without a model."""
    param = name.rpartition(".")[2]
    if param == "weight":
        return {2: "Linear?", 3: "Conv1d?", 4: "Conv2d?", 5: "Conv3d?"}.get(len(shape), "?")
    return "MultiheadAttention?" if param in _MHA_PARAMS else "?"


def _load(path: Path) -> Any:
    if not path.is_file():
        raise ReportError(f"{path} does not exist or is not a file. Expected {EXPECTED}.")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it did not write
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a file that is no checkpoint
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ReportError(
            f"{path} is not a checkpoint of lightning_prune: torch.load(weights_only=True) cannot read it "
            f"({type(err).__name__}: {reason}). Expected {EXPECTED}."
        ) from None


def _uncompiled(state: Mapping[str, Any]) -> dict[str, Any]:
    """The keys without torch.compile's ``_orig_mod.``, so that they name the tensors of the plain module."""
    return {".".join(p for p in key.split(".") if p != COMPILED): value for key, value in state.items()}


def _masked(path: Path, state: dict[str, Tensor], kind: str) -> Reading:
    """Rows from the masks of a reparametrized ``state_dict`` (a PrunedClassifier's ``backbone.`` prefix dropped)."""
    names = {key: name for name, key in masked_tensors(state).items()}
    prefix = _BACKBONE if all(name.startswith(_BACKBONE) for name in names.values()) else ""
    buffers: dict[str, dict[str, Tensor]] = {key[: -len("original")]: {} for key in names}
    for key, value in state.items():
        match = _BUFFER.match(key)
        if match is not None and match["base"] in buffers:
            buffers[match["base"]][match["buffer"]] = value
    rows, dense, hard = [], {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        if key in names:
            name = names[key][len(prefix) :]
            keep, is_hard = _keep(path, name, value, buffers[key[: -len("original")]])
            hard.append(is_hard)
            dense[name] = torch.where(keep, value, value.new_zeros(()))
            shape = tuple(value.shape)
            rows.append(TensorRow(name, kind_guess(name, shape), shape, value.numel(), int(keep.sum())))
        elif (match := _BUFFER.match(key)) is None or match["base"] not in buffers:
            dense[key[len(prefix) :]] = value
    masks = "hard" if all(hard) else "soft"
    report = PruningReport(source=str(path), source_kind=kind, masks=masks, tensors=rows)
    if masks == "soft":
        report.notes.append("the masks are not hardened yet: this checkpoint was written before finalisation.")
    return Reading(report, dense, "Module")


def _keep(path: Path, name: str, theta: Tensor, buffers: dict[str, Tensor]) -> tuple[Tensor, bool]:
    """The binary mask in use, as the tensor's own :class:`MagnitudeMask` computes it (``|θ|/s > c`` until hard)."""
    mask = MagnitudeMask(theta.shape, 1.0)
    try:
        mask.load_state_dict(buffers)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise ReportError(
            f"{path}: '{name}' is reparametrized but its mask's buffers do not fit a lightning_prune.MagnitudeMask "
            f"({reason}). Expected {EXPECTED}."
        ) from None
    return mask.hard_gate(theta), bool(mask.hard)


def _plain(path: Path, state: dict[str, Tensor], kind: str, class_name: str) -> Reading:
    """Rows of a file without masks: every floating tensor of 2+ dims named ``weight`` or ``*_weight``."""
    rows = [
        TensorRow(key, kind_guess(key, tuple(v.shape)), tuple(v.shape), v.numel(), int(v.count_nonzero()))
        for key, v in state.items()
        if _WEIGHT_NAME.search(key) and v.is_floating_point() and v.dim() >= 2
    ]
    if not rows or all(r.kept == r.weights for r in rows):
        what = "no weight tensor of 2+ dims" if not rows else "no pruned weight (no zero in any weight tensor)"
        raise ReportError(f"{path} is a {kind} with {what}: it is not a pruned network. Expected {EXPECTED}.")
    report = PruningReport(source=str(path), source_kind=kind, masks="non-zero weights", tensors=rows)
    report.notes.append(
        "an export holds no masks: the rows are all tensors of 2+ dims named weight or *_weight (tensors the budget "
        "did not cover count as kept)."
    )
    return Reading(report, state, class_name)


def _read_callback_state(report: PruningReport, payload: Mapping[str, Any]) -> None:
    """Step, sparsity, coverage and the finalisation's validation metrics from a checkpoint's BudgetCallback state."""
    report.step = payload.get("global_step")
    callbacks = payload.get("callbacks") or {}
    budget = next((v for k, v in callbacks.items() if "BudgetCallback" in str(k)), None)
    if not isinstance(budget, Mapping):
        return
    report.sparsity = budget.get("sparsity")
    final = CutReport.from_dict(budget.get("report") or {})
    report.finalized_step = final.step
    report.coverage = final.coverage or None
    for stage, metrics in (("before", final.val_before_cut), ("after", final.val_after_cut),
                           ("after_recalibration", final.val_after_recalibration)):
        if metrics:
            report.cut_metrics[stage] = {str(k): float(v) for k, v in metrics.items()}
