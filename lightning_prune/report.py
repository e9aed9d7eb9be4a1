"""Pruning report of a checkpoint or an export: per-layer kept weights and MACs, the budget, and file sizes.

Run it as ``python -m lightning_prune.report CHECKPOINT_OR_EXPORT [--csv PATH] [--json PATH] [--plot PATH.png]``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.export import COMPACT_FORMAT, load_pruned, save_pruned
from lightning_prune.budget import budget_count

#: Module types whose MACs the report counts (the output size per sample comes from a forward hook).
MAC_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: What the MAC columns count.
MACS_UNIT = "multiply-accumulates (MACs) per input sample, prunable layers only; 1 MAC = 2 FLOPs"

DEFAULT_INPUT_SIZE: tuple[int, ...] = (3, 32, 32)

EXPECTED = (
    "a Lightning checkpoint (.ckpt) of a module trained with lightning_prune.BudgetCallback, a compact export "
    "written by lightning_prune.save_pruned (pruned_backbone.pt), or the plain state_dict of a pruned network "
    "saved with torch.save (backbone_state_dict.pt)"
)

_LATENT = re.compile(r"^(?P<name>.+)\.parametrizations\.weight\.original$")
_BACKBONE = "backbone."


class ReportError(ValueError):
    """The file (or the model given for it) cannot be reported on; the message says what was expected."""


@dataclass
class LayerRow:
    """One prunable weight: its shape, weight count, kept count, and MACs per input sample, dense and pruned.

    ``dense_macs``/``pruned_macs`` are ``None`` when the output size of the layer is unknown (a convolution and no
    model to run).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    weights: int
    kept: int
    dense_macs: int | None = None
    pruned_macs: int | None = None

    @property
    def kept_share(self) -> float:
        return self.kept / self.weights if self.weights else 0.0


@dataclass
class PruningReport:
    """What :func:`pruning_report` found: one :class:`LayerRow` per prunable weight, totals, budget and file sizes.

    Attributes:
        source: the file reported on.
        source_kind: ``"Lightning checkpoint"``, ``"state_dict (reparametrized)"``, ``"compact export"`` or
            ``"state_dict"``.
        masks: ``"hard"`` (finalised), ``"soft"`` (kept = ``|θ|/s > c``, not finalised) or ``"non-zero weights"``
            (an export: kept = weights that are not zero).
        layers: the rows, in the order of the file.
        model: the model whose forward gave the layers' output sizes (class path), or ``None``.
        model_source: where the model came from (``"--model"``, ``"config.yaml"`` path, ``"argument"``).
        input_size: size of one input sample used for the MACs (without the batch dimension).
        sparsity: the budget asked for (``BudgetCallback.sparsity``), when the file or its config.yaml says.
        dense_bytes: size of ``torch.save`` of the dense ``state_dict`` (pruned weights as zeros).
        compact_bytes: size of the :func:`~lightning_prune.save_pruned` file of the same weights.
        source_bytes: size of the file itself.
        step: the global step of a checkpoint.
        finalized_step: the step at which the masks were hardened, when known.
        accuracy: top-1 validation accuracy before / after the hard cut (``acc_soft``/``acc_hard``), when known.
        notes: remarks printed under the table.
    """

    source: str
    source_kind: str
    masks: str
    layers: list[LayerRow]
    model: str | None = None
    model_source: str | None = None
    input_size: tuple[int, ...] | None = None
    sparsity: float | None = None
    dense_bytes: int = 0
    compact_bytes: int = 0
    source_bytes: int = 0
    step: int | None = None
    finalized_step: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------- totals
    @property
    def weights(self) -> int:
        return sum(row.weights for row in self.layers)

    @property
    def kept(self) -> int:
        return sum(row.kept for row in self.layers)

    @property
    def kept_share(self) -> float:
        return self.kept / self.weights if self.weights else 0.0

    @property
    def dense_macs(self) -> int | None:
        values = [row.dense_macs for row in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def pruned_macs(self) -> int | None:
        values = [row.pruned_macs for row in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def keep_asked(self) -> float | None:
        """The keep share asked for, ``1 − sparsity``."""
        return None if self.sparsity is None else 1.0 - self.sparsity

    @property
    def kept_asked(self) -> int | None:
        """The number of weights the budget keeps over these layers, ``round((1 − sparsity)·N)``."""
        return None if self.sparsity is None else budget_count(self.weights, self.sparsity)

    # ------------------------------------------------------------ outputs
    def table(self) -> str:
        """The report as fixed-width text: a header, one row per layer, the totals, budget, accuracy and files."""
        head = [
            "lightning_prune pruning report",
            f"  file      {self.source} ({_kb(self.source_bytes)})",
            f"  source    {self._source_line()}",
            f"  model     {self._model_line()}",
            f"  MACs      {MACS_UNIT}",
            "",
        ]
        headers = ["layer", "kind", "shape", "weights", "kept", "kept %", "dense MACs", "pruned MACs"]
        rows = [
            [
                r.name,
                r.kind,
                _shape(r.shape),
                f"{r.weights:,}",
                f"{r.kept:,}",
                f"{r.kept_share:.2%}",
                _int(r.dense_macs),
                _int(r.pruned_macs),
            ]
            for r in self.layers
        ]
        total = ["total", "", "", f"{self.weights:,}", f"{self.kept:,}", f"{self.kept_share:.2%}"]
        total += [_int(self.dense_macs), _int(self.pruned_macs)]
        body = _fixed_width(headers, rows, total, right=set(range(3, 8)))
        tail = ["", f"budget    {self._budget_line()}"]
        if self.dense_macs:
            tail.append(
                f"MACs      {self.pruned_macs:,} of {self.dense_macs:,} = {self.pruned_macs / self.dense_macs:.2%} "
                f"of the dense layers ({self.dense_macs / max(self.pruned_macs, 1):.1f}x fewer)"
            )
        if self.accuracy.get("acc_soft") is not None and self.accuracy.get("acc_hard") is not None:
            tail.append(
                f"accuracy  validation top-1 just before / after the masks became hard: "
                f"{self.accuracy['acc_soft']:.4f} / {self.accuracy['acc_hard']:.4f}"
            )
        ratio = self.compact_bytes / self.dense_bytes if self.dense_bytes else float("nan")
        tail.append(
            f"files     dense state_dict (torch.save) {_kb(self.dense_bytes)}; compact (save_pruned) "
            f"{_kb(self.compact_bytes)} = {ratio:.1%} of dense"
        )
        tail += [f"note      {note}" for note in self.notes]
        return "\n".join(head + body + tail)

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
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "weights": r.weights,
                    "kept": r.kept,
                    "kept_share": r.kept_share,
                    "dense_macs": r.dense_macs,
                    "pruned_macs": r.pruned_macs,
                }
                for r in self.layers
            ],
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
            },
            "accuracy": dict(self.accuracy),
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
        """Write one row per layer and a ``total`` row: layer, kind, shape, weights, kept, kept_share, MACs."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "kind", "shape", "weights", "kept", "kept_share", "dense_macs", "pruned_macs"])
            for r in self.layers:
                writer.writerow(
                    [r.name, r.kind, _shape(r.shape), r.weights, r.kept, f"{r.kept_share:.6f}"]
                    + ["" if r.dense_macs is None else r.dense_macs, "" if r.pruned_macs is None else r.pruned_macs]
                )
            writer.writerow(
                ["total", "", "", self.weights, self.kept, f"{self.kept_share:.6f}"]
                + ["" if self.dense_macs is None else self.dense_macs]
                + ["" if self.pruned_macs is None else self.pruned_macs]
            )

    def plot(self, path: str | os.PathLike) -> None:
        """Save a bar chart of the kept share per layer (with the budget as a dashed line) as a PNG.

        Raises:
            ReportError: if matplotlib is not installed.
        """
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ReportError("--plot needs matplotlib: pip install matplotlib") from None
        from lightning_prune.pruning_inspector import kept_share_figure

        figure = kept_share_figure(
            [r.name for r in self.layers],
            [r.kept_share for r in self.layers],
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
            return "none (convolution MACs need --model CLASS_PATH --model-args JSON, or config.yaml next to the file)"
        size = "x".join(str(d) for d in self.input_size) if self.input_size else "?"
        origin = f" (from {self.model_source})" if self.model_source else ""
        return f"{self.model}{origin}, input {size}"

    def _budget_line(self) -> str:
        reached = f"reached {self.kept_share:.2%} = {self.kept:,} of {self.weights:,} weights"
        if self.sparsity is None:
            return f"asked: unknown (no BudgetCallback state or config.yaml); {reached}"
        asked = f"asked {self.keep_asked:.2%} kept (sparsity {self.sparsity:g}) = {self.kept_asked:,} weights"
        gap = self.kept - self.kept_asked
        verdict = "met exactly" if gap == 0 else f"{'over' if gap > 0 else 'under'} by {abs(gap):,} weights"
        if self.masks == "soft":
            verdict += " (not finalised: the hard cut at the end of fit meets it exactly)"
        return f"{asked}; {reached}: {verdict}"


def pruning_report(
    source: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    model: nn.Module | None = None,
) -> PruningReport:
    """Read a checkpoint or an export of a pruned network and count, per layer, its weights, kept weights and MACs.

    Layer names are those of the backbone (a :class:`~lightning_prune.PrunedClassifier` checkpoint's ``backbone.``
    prefix is dropped), so a checkpoint and the export of the same run give the same rows.

    Args:
        source: a Lightning checkpoint of a module trained with :class:`~lightning_prune.BudgetCallback` (kept =
            mask sums; ``|θ|/s > c`` for masks not yet hardened), a :func:`~lightning_prune.save_pruned` file, or a
            plain ``state_dict`` saved with ``torch.save`` (kept = non-zero weights).
        input_size: size of one input sample, e.g. ``(3, 32, 32)``; default: from the ``config.yaml`` that
            LightningCLI saved next to the file (or one folder up), else ``(3, 32, 32)``.
        model: the (backbone) module the weights belong to; its forward on a zero input gives each layer's output
            size, hence its MACs. Default: built from that ``config.yaml`` when there is one. Without a model only
            linear layers get MACs (``in·out``).

    Raises:
        ReportError: if the file is not one of the above, or ``model`` does not match it.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_prune import finalize, reparametrize, save_pruned
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        >>> _ = reparametrize(net)
        >>> _ = finalize(net, sparsity=0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "pruned.pt")
        >>> save_pruned(net, path)
        >>> fresh = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        >>> report = pruning_report(path, input_size=(1, 8, 8), model=fresh)
        >>> report.weights, report.kept, report.layers[0].dense_macs  # conv: 6*6 positions x 36 weights
        (324, 162, 1296)
    """
    path = Path(source)
    payload = _read(path)
    config = _config_next_to(path)
    report = _from_payload(path, payload)
    report.source_bytes = path.stat().st_size
    config_info = _parse_config(config) if config is not None else {}
    if report.sparsity is None and config_info.get("sparsity") is not None:
        report.sparsity = float(config_info["sparsity"])
    if input_size is None:
        input_size = config_info.get("input_size")
    if model is not None:
        report.model_source = "argument"
    elif config_info.get("backbone") is not None:
        try:
            model = _instantiate(config_info["backbone"])
            report.model_source = str(config)
        except Exception as err:  # noqa: BLE001 - whatever the user's class raises: report without conv MACs
            report.notes.append(f"could not build the backbone of {config} ({type(err).__name__}: {err}).")
    if model is not None:
        size = tuple(int(d) for d in (input_size or DEFAULT_INPUT_SIZE))
        try:
            _count_macs(report.layers, model, size)
        except ReportError as err:
            if report.model_source == "argument":
                raise
            report.notes.append(f"MACs of convolutions skipped: {err}")
            model = None
        else:
            report.input_size = size
            from_config = report.model_source not in (None, "argument")
            report.model = (
                config_info["backbone"]["class_path"]
                if from_config
                else f"{type(model).__module__}.{type(model).__qualname__}"
            )
    if model is None:
        _count_linear_macs(report.layers)
        if any(r.dense_macs is None for r in report.layers):
            report.notes.append("convolution MACs need the model: pass --model CLASS_PATH --model-args JSON.")
    if report.source_kind == "compact export" or report.source_kind == "state_dict":
        report.notes.append(
            "an export holds no masks: the rows are all conv/linear weights (layers left dense count as kept)."
        )
    return report


# ----------------------------------------------------------------- reading
def _read(path: Path) -> Any:
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


def _from_payload(path: Path, payload: Any) -> PruningReport:
    if isinstance(payload, Mapping) and "format" in payload:
        if payload["format"] != COMPACT_FORMAT:
            raise ReportError(
                f"{path} has format {payload['format']!r}, this version reads {COMPACT_FORMAT!r}. Expected {EXPECTED}."
            )
        state = load_pruned(path)
        return _plain_report(path, state, "compact export", str(payload.get("class", "Module")))
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        state = payload["state_dict"]
        if not _latent_names(state):
            raise ReportError(
                f"{path} is a Lightning checkpoint but holds no reparametrized weight (no "
                "'<layer>.parametrizations.weight.original' key): the module was not trained with "
                f"lightning_prune.BudgetCallback. Expected {EXPECTED}."
            )
        report = _masked_report(path, state, "Lightning checkpoint")
        report.step = payload.get("global_step")
        budget = next((v for k, v in (payload.get("callbacks") or {}).items() if "BudgetCallback" in str(k)), None)
        if isinstance(budget, Mapping):
            report.sparsity = budget.get("sparsity")
            final = budget.get("report") or {}
            report.finalized_step = final.get("step")
            report.accuracy = {k: final[k] for k in ("acc_soft", "acc_hard") if final.get(k) is not None}
        return report
    if isinstance(payload, Mapping) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        if _latent_names(payload):
            return _masked_report(path, payload, "state_dict (reparametrized)")
        return _plain_report(path, dict(payload), "state_dict", "Module")
    kind = type(payload).__name__
    raise ReportError(f"{path} holds a {kind} that is not a checkpoint of lightning_prune. Expected {EXPECTED}.")


def _latent_names(state: Mapping[str, Any]) -> list[str]:
    return [m.group("name") for m in map(_LATENT.match, state) if m is not None]


def _masked_report(path: Path, state: Mapping[str, Tensor], kind: str) -> PruningReport:
    """Rows from the masks of a reparametrized state_dict; the dense state is θ ⊙ mask under ``<layer>.weight``."""
    names = _latent_names(state)
    prefix = _BACKBONE if all(n.startswith(_BACKBONE) for n in names) else ""
    keeps: dict[str, Tensor] = {}
    hard_flags = []
    for name in names:
        theta = state[f"{name}.parametrizations.weight.original"]
        buffers = _mask_buffers(state, name)
        missing = [b for b in ("mask", "hard", "scale", "threshold") if b not in buffers]
        if missing:
            raise ReportError(
                f"{path}: '{name}.weight' is reparametrized but its mask has no {missing} buffer: it is not a "
                f"lightning_prune.MagnitudeMask. Expected {EXPECTED}."
            )
        hard = bool(buffers["hard"])
        hard_flags.append(hard)
        keep = buffers["mask"].bool() if hard else theta.abs() / buffers["scale"] > buffers["threshold"]
        keeps[name] = keep
    rows = []
    dense: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        match = _LATENT.match(key)
        if match is not None:
            name = match.group("name")
            weight = value * keeps[name].to(value.dtype)
            dense[f"{name[len(prefix) :]}.weight"] = weight
            kind_ = _kind_from_shape(tuple(value.shape))
            rows.append(LayerRow(name[len(prefix) :], kind_, tuple(value.shape), value.numel(), int(keeps[name].sum())))
        elif ".parametrizations.weight." not in key:
            dense[key[len(prefix) :]] = value
    masks = "hard" if all(hard_flags) else "soft"
    report = PruningReport(source=str(path), source_kind=kind, masks=masks, layers=rows)
    if masks == "soft":
        report.notes.append("the masks are not hardened yet: this checkpoint was written before finalisation.")
    _measure_files(report, dense, "Module")
    return report


def _mask_buffers(state: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    pattern = re.compile(rf"^{re.escape(name)}\.parametrizations\.weight\.\d+\.(?P<buffer>\w+)$")
    return {m.group("buffer"): state[key] for key in state if (m := pattern.match(key)) is not None}


def _plain_report(path: Path, state: dict[str, Tensor], kind: str, class_name: str) -> PruningReport:
    rows = [
        LayerRow(
            key[: -len(".weight")], _kind_from_shape(tuple(v.shape)), tuple(v.shape), v.numel(), int(v.count_nonzero())
        )
        for key, v in state.items()
        if key.endswith(".weight") and v.is_floating_point() and v.dim() >= 2
    ]
    if not rows or all(r.kept == r.weights for r in rows):
        what = "no conv/linear weight" if not rows else "no pruned weight (no zero in any conv/linear weight)"
        raise ReportError(f"{path} is a {kind} with {what}: it is not a pruned network. Expected {EXPECTED}.")
    report = PruningReport(source=str(path), source_kind=kind, masks="non-zero weights", layers=rows)
    _measure_files(report, state, class_name)
    return report


def _kind_from_shape(shape: tuple[int, ...]) -> str:
    return {2: "Linear?", 3: "Conv1d?", 4: "Conv2d?", 5: "Conv3d?"}.get(len(shape), "weight?")


class _StateDictHolder(nn.Module):
    """Hands a ready ``state_dict`` to :func:`save_pruned`, which asks a module for it."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return self._state


def _measure_files(report: PruningReport, dense: dict[str, Tensor], class_name: str) -> None:
    holder_class = type(class_name, (_StateDictHolder,), {})
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, compact_path = os.path.join(tmp, "dense.pt"), os.path.join(tmp, "compact.pt")
        torch.save(dense, dense_path)
        save_pruned(holder_class(dense), compact_path)
        report.dense_bytes = os.path.getsize(dense_path)
        report.compact_bytes = os.path.getsize(compact_path)


# ------------------------------------------------------------------- MACs
def _count_linear_macs(rows: list[LayerRow]) -> None:
    for row in rows:
        if len(row.shape) == 2:  # a linear layer: one multiply-accumulate per weight and per sample
            row.dense_macs, row.pruned_macs = row.weights, row.kept


@torch.no_grad()
def _count_macs(rows: list[LayerRow], model: nn.Module, input_size: tuple[int, ...]) -> None:
    """MACs per sample of each row's layer: ``positions · weights`` (dense), ``positions · kept`` (pruned).

    ``positions`` is the number of output positions per output channel (``H_out·W_out`` for a 2-D convolution, 1
    for a linear layer on a vector), read with forward hooks on a batch of one zero input.
    """
    modules = dict(model.named_modules())
    for row in rows:
        module = modules.get(row.name)
        weight = getattr(module, "weight", None) if module is not None else None
        if not isinstance(weight, Tensor):
            raise ReportError(
                f"the model {type(model).__name__} has no layer '{row.name}' with a weight: the file comes from "
                "another architecture (check --model and --model-args)."
            )
        if tuple(weight.shape) != row.shape:
            raise ReportError(
                f"layer '{row.name}' has a weight of shape {tuple(weight.shape)} in the model but {row.shape} in the "
                "file (check --model-args)."
            )
    positions: dict[str, int] = {row.name: 0 for row in rows}

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            positions[name] += output.numel() // (output.shape[0] * module.weight.shape[0])

    handles = [
        modules[row.name].register_forward_hook(lambda m, a, o, name=row.name: hook(name, m, a, o))
        for row in rows
        if isinstance(modules[row.name], MAC_LAYER_TYPES)
    ]
    was_training = model.training
    model.eval()
    try:
        parameter = next(iter(model.parameters()), None)
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        device = parameter.device if parameter is not None else torch.device("cpu")
        model(torch.zeros((1, *input_size), dtype=dtype, device=device))
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward means a wrong input size
        size = "x".join(str(d) for d in input_size)
        raise ReportError(
            f"the forward of {type(model).__name__} on one input of size {size} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass the size one sample has, e.g. --input-size 1 16 16."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for row in rows:
        module = modules[row.name]
        row.kind = type(module).__name__
        if isinstance(module, MAC_LAYER_TYPES) and positions[row.name] > 0:
            row.dense_macs = positions[row.name] * row.weights
            row.pruned_macs = positions[row.name] * row.kept
        else:
            row.dense_macs = row.pruned_macs = None


# ----------------------------------------------------------------- config
def _config_next_to(path: Path) -> Path | None:
    """The ``config.yaml`` LightningCLI wrote in the run's log dir: next to an export, one up from a checkpoint."""
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def _parse_config(path: Path) -> dict[str, Any]:
    """Backbone spec, input size and sparsity from a LightningCLI ``config.yaml`` (missing entries are absent)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(config, dict):
        return {}
    info: dict[str, Any] = {}
    model = config.get("model") or {}
    model_args = (model.get("init_args") or {}) if isinstance(model, dict) else {}
    backbone = model_args.get("backbone") if isinstance(model_args, dict) else None
    if isinstance(backbone, dict) and "class_path" in backbone:
        info["backbone"] = backbone
    data = config.get("data") or {}
    data_args = (data.get("init_args") or {}) if isinstance(data, dict) else {}
    backbone_args = (backbone.get("init_args") or {}) if isinstance(backbone, dict) else {}
    size = input_size_from_args(backbone_args, data_args)
    if size is not None:
        info["input_size"] = size
    trainer = config.get("trainer") or {}
    callbacks = (trainer.get("callbacks") or []) if isinstance(trainer, dict) else []
    for cb in callbacks if isinstance(callbacks, list) else []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("BudgetCallback"):
            info["sparsity"] = (cb.get("init_args") or {}).get("sparsity", 0.9)
    return info


def input_size_from_args(*arg_dicts: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` from constructor arguments: ``in_channels``/``channels`` and ``input_size``/``image_size``.

    The first dictionary that has a value wins; the channels default to 3 when only a size is known.

    Example:
        >>> input_size_from_args({"in_channels": 1}, {"image_size": 16, "channels": 1})
        (1, 16, 16)
    """
    channels = side = None
    for args in arg_dicts:
        for key in ("in_channels", "channels"):
            if channels is None and isinstance(args.get(key), int):
                channels = args[key]
        for key in ("input_size", "image_size"):
            if side is None and isinstance(args.get(key), int):
                side = args[key]
    if side is None:
        return None
    return (channels or 3, side, side)


def _import(class_path: str) -> Any:
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise ReportError(f"--model takes a class path such as lightning_prune.backbones.Conv4, got {class_path!r}.")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ReportError(f"cannot import {class_path!r} ({err}).") from None


def _instantiate(spec: Any) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested specs too), as LightningCLI does."""
    if isinstance(spec, dict) and "class_path" in spec:
        args = {k: _instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return _import(spec["class_path"])(**args)
    if isinstance(spec, list):
        return [_instantiate(v) for v in spec]
    return spec


def build_model(class_path: str, model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the backbone ``class_path(**model_args)`` for :func:`pruning_report`.

    Example:
        >>> build_model("lightning_prune.backbones.Conv4", {"num_classes": 10, "in_channels": 1, "input_size": 8})
        Conv4(...)
    """
    try:
        model = _instantiate({"class_path": class_path, "init_args": dict(model_args or {})})
    except ReportError:
        raise
    except Exception as err:  # noqa: BLE001 - the constructor's own error, passed on with the call it came from
        raise ReportError(
            f"cannot build {class_path}(**{dict(model_args or {})}): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ReportError(f"{class_path} is not a torch.nn.Module class.")
    return model


# --------------------------------------------------------------- printing
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


def _kb(n: int) -> str:
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


# -------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_prune.report SOURCE``: print the report; exit code 2 for a file it cannot read."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_prune.report",
        description="Per-layer pruning report of a lightning_prune checkpoint or export: weights, kept weights, "
        f"kept share, MACs ({MACS_UNIT}), budget asked and reached, and file sizes.",
    )
    parser.add_argument(
        "source", help="a .ckpt of a run with BudgetCallback, pruned_backbone.pt or backbone_state_dict.pt"
    )
    parser.add_argument(
        "--model",
        metavar="CLASS_PATH",
        help="the backbone class, e.g. lightning_prune.backbones.Conv4 "
        "(default: from the config.yaml LightningCLI saved in the run's log dir)",
    )
    parser.add_argument(
        "--model-args", metavar="JSON", help="keyword arguments of --model, e.g. '{\"num_classes\": 10}'"
    )
    parser.add_argument(
        "--input-size",
        metavar="DIM",
        type=int,
        nargs="+",
        help="size of one input sample, e.g. 3 32 32 (default: from the model arguments or config.yaml, else 3 32 32)",
    )
    parser.add_argument("--csv", metavar="PATH", help="also write the rows and totals as CSV")
    parser.add_argument("--json", metavar="PATH", help="also write the whole report as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="also save a bar chart of the kept share per layer")
    args = parser.parse_args(argv)
    try:
        input_size = tuple(args.input_size) if args.input_size else None
        if input_size is not None and (not input_size or any(d < 1 for d in input_size)):
            raise ReportError(f"--input-size takes positive sizes such as 3 32 32, got {list(input_size)}.")
        model = None
        if args.model_args and not args.model:
            raise ReportError("--model-args needs --model CLASS_PATH.")
        if args.model:
            try:
                model_args = json.loads(args.model_args) if args.model_args else {}
            except json.JSONDecodeError as err:
                raise ReportError(
                    f"--model-args is not valid JSON ({err}): write e.g. '{{\"num_classes\": 10}}'."
                ) from None
            if not isinstance(model_args, dict):
                raise ReportError("--model-args must be a JSON object of keyword arguments.")
            model = build_model(args.model, model_args)
            input_size = input_size or input_size_from_args(model_args)
        report = pruning_report(args.source, input_size=input_size, model=model)
        print(report.table())
        for path, write in ((args.csv, report.write_csv), (args.json, report.write_json), (args.plot, report.plot)):
            if path:
                write(path)
                print(f"wrote {path}")
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
