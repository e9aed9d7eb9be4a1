"""Passes over the data through the LightningModule's own steps, outside Lightning's loops: the validation metrics
it logs (to compare the network before and after the cut) and the re-estimation of BatchNorm statistics."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def _captured_logs(pl_module: pl.LightningModule) -> Iterator[dict[str, list[Any]]]:
    """Replace ``self.log``/``self.log_dict`` of the module by a recorder for the duration of the block."""
    logged: dict[str, list[Any]] = {}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        logged.setdefault(name, []).append(value)

    def log_dict(values: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in values.items():
            log(name, value)

    pl_module.log, pl_module.log_dict = log, log_dict  # instance attributes shadow the methods
    try:
        yield logged
    finally:
        del pl_module.log, pl_module.log_dict


def _to_device(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> Any:
    """What Lightning's loops do to a batch before the step: precision cast, the module's transfer hooks, device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


@contextlib.contextmanager
def _metrics_put_back(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run the block on reset torchmetrics objects, then give every metric back the state it had: the epoch's
    accumulated training and validation metrics are not touched by a pass of ours."""
    metrics = [m for m in pl_module.modules() if _is_metric(m)]
    saved = [copy.deepcopy({k: getattr(m, k) for k in (*m._defaults, "_update_count", "_computed")}) for m in metrics]
    for metric in metrics:
        metric.reset()
    try:
        yield
    finally:
        for metric, state in zip(metrics, saved):
            for name, value in state.items():
                setattr(metric, name, value)


def loaders_of(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def validation_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """Run the module's ``validation_step`` over the validation data and return the mean of every scalar it logs.

    torchmetrics objects it logs are computed over the whole pass. Under DDP the means are averaged over ranks. An
    empty dict when there is no validation data or step.
    """
    if not pl.utilities.model_helpers.is_overridden("validation_step", pl_module):
        return {}
    loaders = loaders_of(trainer.val_dataloaders)
    limits = list(getattr(trainer, "num_val_batches", []) or [])
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), _captured_logs(pl_module) as logged, _metrics_put_back(pl_module):
            for index, loader in enumerate(loaders):
                limit = limits[index] if index < len(limits) else math.inf
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    batch = _to_device(trainer, pl_module, batch, index)
                    extra = (index,) if len(loaders) > 1 else ()
                    trainer.strategy.validation_step(*step_args(pl_module, "validation_step", batch, batch_idx, extra))
            values = {name: _mean(items) for name, items in logged.items()}
    finally:
        pl_module.train(was_training)
    values = {name: value for name, value in values.items() if value is not None}
    if trainer.world_size > 1 and values:
        names = sorted(values)
        stacked = torch.tensor([values[n] for n in names], dtype=torch.float64, device=pl_module.device)
        stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
        values = dict(zip(names, stacked.tolist()))
    return values


def _is_metric(module: nn.Module) -> bool:
    return hasattr(module, "compute") and hasattr(module, "reset") and hasattr(module, "update")


def _mean(items: list[Any]) -> float | None:
    if items and _is_metric(items[-1]):
        return float(items[-1].compute())
    scalars = [float(v) for v in items if isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1)]
    return sum(scalars) / len(scalars) if scalars else None


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in module.modules())


@contextlib.contextmanager
def _steps_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """Under manual optimization, ``training_step`` steps its optimizers and schedulers itself: make those calls (and
    ``manual_backward``) do nothing for the duration of the block, so a pass changes no weight and no learning rate."""
    if pl_module.automatic_optimization:
        yield
        return
    optimizers = pl_module.optimizers(use_pl_optimizer=True)
    schedulers = pl_module.lr_schedulers()
    patched = list(optimizers) if isinstance(optimizers, list) else [optimizers]
    patched += [s for s in (schedulers if isinstance(schedulers, list) else [schedulers]) if s is not None]
    for obj in patched:
        obj.step = obj.zero_grad = _nothing
    pl_module.manual_backward = _nothing
    try:
        yield
    finally:
        for obj in patched:
            del obj.step, obj.zero_grad
        del pl_module.manual_backward


def step_args(pl_module: pl.LightningModule, hook: str, batch: Any, batch_idx: int, extra: tuple = ()) -> tuple:
    """The arguments Lightning's own loops pass to ``hook``: ``batch_idx`` only when the step's signature takes it
    (``training_step(self, batch)`` is allowed), then ``dataloader_idx`` (``extra``) when there are several loaders."""
    if is_param_in_hook_signature(getattr(pl_module, hook), "batch_idx", min_args=2):
        return (batch, batch_idx, *extra)
    return (batch, *extra)


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


@torch.no_grad()
def recalibrate_batchnorm(trainer: pl.Trainer, pl_module: pl.LightningModule, num_batches: int) -> int:
    """Re-estimate the running mean and variance of every BatchNorm layer from ``num_batches`` training batches run
    through the module's ``training_step`` in train mode, without gradients; no weight changes (under manual
    optimization the step's optimizer and scheduler calls do nothing during the pass). Returns the number of batches
    used (0 when there was no training data)."""
    norms = [m for m in pl_module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    loaders = loaders_of(trainer.train_dataloader)
    if not norms or not loaders:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    was_training = pl_module.training
    pl_module.train()
    used = 0
    try:
        with _captured_logs(pl_module), _metrics_put_back(pl_module), _steps_disabled(pl_module):
            for batch_idx, batch in enumerate(loaders[0]):
                if used >= num_batches:
                    break
                batch = _to_device(trainer, pl_module, batch, 0)
                trainer.strategy.training_step(*step_args(pl_module, "training_step", batch, batch_idx))
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        pl_module.train(was_training)
    if trainer.world_size > 1:  # every rank saw its own batches: average the statistics so the replicas agree
        for m in norms:
            m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
            m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
    return used
