"""The model behind a file, for its MACs: the backbone, input size and sparsity from the ``config.yaml`` LightningCLI
saved in the run's log dir, or a class path and keyword arguments given on the command line."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_prune.report.errors import ReportError

DEFAULT_INPUT_SIZE: tuple[int, ...] = (3, 32, 32)


def config_next_to(path: Path) -> Path | None:
    """The ``config.yaml`` LightningCLI wrote in the run's log dir: next to an export, one up from a checkpoint."""
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def parse_config(path: Path) -> dict[str, Any]:
    """``backbone`` spec, ``input_size`` and ``sparsity`` from a LightningCLI ``config.yaml`` (missing ones absent).

    Example:
        >>> import tempfile
        >>> text = '''
        ... model: {init_args: {backbone: {class_path: my.Net, init_args: {in_channels: 1, input_size: 16}}}}
        ... trainer: {callbacks: [{class_path: lightning_prune.BudgetCallback, init_args: {sparsity: 0.8}}]}
        ... '''
        >>> path = Path(tempfile.mkdtemp()) / "config.yaml"
        >>> _ = path.write_text(text)
        >>> info = parse_config(path)
        >>> info["input_size"], info["sparsity"], info["backbone"]["class_path"]
        ((1, 16, 16), 0.8, 'my.Net')
    """
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(config, dict):
        return {}
    info: dict[str, Any] = {}
    model_args = _init_args(config.get("model"))
    backbone = model_args.get("backbone")
    if isinstance(backbone, dict) and "class_path" in backbone:
        info["backbone"] = backbone
    size = input_size_from_args(_init_args(backbone), _init_args(config.get("data")))
    if size is not None:
        info["input_size"] = size
    trainer = config.get("trainer") or {}
    callbacks = (trainer.get("callbacks") or []) if isinstance(trainer, dict) else []
    for cb in callbacks if isinstance(callbacks, list) else []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("BudgetCallback"):
            info["sparsity"] = _init_args(cb).get("sparsity", 0.9)
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


def build_model(class_path: str, model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the backbone ``class_path(**model_args)`` (nested ``class_path``/``init_args`` specs too, as LightningCLI
    does) for :func:`~lightning_prune.report.pruning_report`.

    Raises:
        ReportError: if the class cannot be imported or built, or is not an ``nn.Module``.

    Example:
        >>> build_model("lightning_prune.backbones.Conv4", {"num_classes": 10, "in_channels": 1, "input_size": 8})
        Conv4(...)
    """
    try:
        model = instantiate({"class_path": class_path, "init_args": dict(model_args or {})})
    except ReportError:
        raise
    except Exception as err:  # noqa: BLE001 - the constructor's own error, passed on with the call it came from
        raise ReportError(
            f"cannot build {class_path}(**{dict(model_args or {})}): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ReportError(f"{class_path} is not a torch.nn.Module class.")
    return model


def instantiate(spec: Any) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested specs too), as LightningCLI does."""
    if isinstance(spec, dict) and "class_path" in spec:
        args = {k: instantiate(v) for k, v in _init_args(spec).items()}
        return _import(spec["class_path"])(**args)
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def _init_args(spec: Any) -> dict[str, Any]:
    args = spec.get("init_args") if isinstance(spec, dict) else None
    return args if isinstance(args, dict) else {}


def _import(class_path: str) -> Any:
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise ReportError(f"--model takes a class path such as lightning_prune.backbones.Conv4, got {class_path!r}.")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ReportError(f"cannot import {class_path!r} ({err}).") from None
