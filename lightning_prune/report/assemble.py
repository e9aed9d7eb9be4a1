""":func:`pruning_report`: read a file, find its model and config, count MACs and file sizes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_prune.report.errors import ReportError
from lightning_prune.report.macs import count_macs
from lightning_prune.report.model import DEFAULT_INPUT_SIZE, config_next_to, instantiate, parse_config
from lightning_prune.report.reading import read
from lightning_prune.report.sizes import saved_sizes
from lightning_prune.report.table import PruningReport


def pruning_report(
    source: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    model: nn.Module | None = None,
) -> PruningReport:
    """Read a checkpoint or an export of a pruned network and count, per masked tensor, its weights, kept weights
    and MACs.

    Rows are named ``<module>.<param>`` as in the backbone (``features.0.weight``,
    ``layers.0.self_attn.in_proj_weight``; a :class:`~lightning_prune.PrunedClassifier` checkpoint's ``backbone.``
    prefix is dropped), so a checkpoint and the export of the same run give the same rows.

    Args:
        source: a Lightning checkpoint of a module trained with :class:`~lightning_prune.BudgetCallback` (kept =
            mask sums; ``|θ|/s > c`` for masks not yet hardened), a :func:`~lightning_prune.save_pruned` file, or a
            plain ``state_dict`` saved with ``torch.save`` (kept = non-zero weights).
        input_size: size of one input sample, e.g. ``(3, 32, 32)``; default: from the ``config.yaml`` that
            LightningCLI saved next to the file (or one folder up), else ``(3, 32, 32)``.
        model: the (backbone) module the tensors belong to; one forward on a zero input gives how often each tensor
            is applied, hence its MACs. Default: built from that ``config.yaml`` when there is one. Without a model
            the MACs are ``None``.

    Raises:
        ReportError: if the file is not one of the above, or ``model`` does not match it.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_prune import finalize, reparametrize, save_pruned
        >>> def net():
        ...     return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        >>> pruned = net()
        >>> _ = reparametrize(pruned)
        >>> _ = finalize(pruned, sparsity=0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "pruned.pt")
        >>> save_pruned(pruned, path)
        >>> report = pruning_report(path, input_size=(1, 8, 8), model=net())
        >>> [(row.name, row.weights, row.dense_macs) for row in report.tensors]  # the conv: 6x6 positions
        [('0.weight', 36, 1296), ('2.weight', 288, 288)]
        >>> report.kept
        162
    """
    path = Path(source)
    report, dense, class_name = read(path)
    report.source_bytes = path.stat().st_size
    report.dense_bytes, report.compact_bytes = saved_sizes(dense, class_name)
    config = config_next_to(path)
    info = parse_config(config) if config is not None else {}
    if report.sparsity is None and info.get("sparsity") is not None:
        report.sparsity = float(info["sparsity"])
    model, origin, class_path = _find_model(report, model, info, config)
    if model is not None:
        size = tuple(int(d) for d in (input_size or info.get("input_size") or DEFAULT_INPUT_SIZE))
        try:
            count_macs(report.tensors, model, size)
        except ReportError as err:
            if origin == "argument":
                raise
            report.notes.append(f"MACs skipped: {err}")
        else:
            report.model, report.model_source, report.input_size = class_path, origin, size
    if report.model is None:
        report.notes.append("MACs need the model: pass --model CLASS_PATH --model-args JSON (and --input-size).")
    else:
        unknown = [row.name for row in report.tensors if row.dense_macs is None]
        if unknown:
            listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            report.notes.append(
                f"MACs n/a for {listed}: the report has no rule for how often their module applies them "
                "(or the module did not run in the forward), so it gives no figure rather than a guess."
            )
    return report


def _find_model(
    report: PruningReport, model: nn.Module | None, info: dict[str, Any], config: Path | None
) -> tuple[nn.Module | None, str | None, str | None]:
    """The model for the MACs, where it came from, and its class path: the argument, else config.yaml's backbone."""
    if model is not None:
        return model, "argument", f"{type(model).__module__}.{type(model).__qualname__}"
    spec = info.get("backbone")
    if spec is None:
        return None, None, None
    try:
        built = instantiate(spec)
    except Exception as err:  # noqa: BLE001 - whatever the user's class raises: report without MACs
        report.notes.append(f"could not build the backbone of {config} ({type(err).__name__}: {err}).")
        return None, None, None
    if not isinstance(built, nn.Module):
        report.notes.append(f"the backbone of {config} ({spec['class_path']}) is not a torch.nn.Module.")
        return None, None, None
    return built, str(config), spec["class_path"]
