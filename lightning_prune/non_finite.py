"""Stop training on a NaN or Inf before it reaches a checkpoint; every rank stops together.

On a CPU each step's checks are read at once and training stops before the optimizer step. On an accelerator a read
waits for the device, so :class:`FiniteWatch` keeps the checks there and reads them at logging steps and before every
checkpoint is written: training stops up to ``log_every_n_steps`` later, and no checkpoint holds a non-finite weight.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_prune.reparametrize import MaskedParameter


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf; raised before the optimizer step so the last checkpoint stays good."""


def check_loss_finite(trainer: pl.Trainer, loss: Tensor) -> None:
    """Raise :class:`NonFiniteError` when the loss is not finite on any rank (every rank raises together, so that
    none is left waiting in the gradient all-reduce)."""
    values = gather_ranks(trainer, _non_finite_part(loss).reshape(1)).reshape(-1).tolist()
    bad = [rank for rank, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        where = f" on rank {', '.join(map(str, bad))}" if len(values) > 1 else ""
        raise NonFiniteError(
            f"The training loss is {values[bad[0]]}{where} at step {trainer.global_step}. Training stopped before the "
            "optimizer step, so the last checkpoint is intact. Lower the learning rate or clip gradients "
            "(Trainer(gradient_clip_val=...)), then resume from the last checkpoint."
        )


def check_latents_finite(trainer: pl.Trainer, params: list[MaskedParameter], consequence: str) -> None:
    """Raise :class:`NonFiniteError` naming the tensors (and ranks) whose latent weights are not finite."""
    if not params:
        return
    flags = gather_ranks(trainer, _finite_flags(params)).reshape(-1, len(params)).bool().cpu()  # (ranks, tensors)
    if bool(flags.all()):
        return
    names = ", ".join(f"'{params[i].name}'" for i in sorted({int(i) for i in (~flags).nonzero()[:, 1]}))
    where = ""
    if flags.shape[0] > 1:
        where = f" on rank {', '.join(str(r) for r in sorted({int(r) for r in (~flags).nonzero()[:, 0]}))}"
    raise NonFiniteError(
        f"{names} has non-finite latent weights{where} after step {trainer.global_step}. {consequence} Lower the "
        "learning rate or clip gradients (Trainer(gradient_clip_val=...)), then resume from the last checkpoint, "
        "which is intact."
    )


def _non_finite_part(loss: Tensor) -> Tensor:
    """The sum of the loss's non-finite entries: 0 when it is finite, else NaN or ±Inf (no host read)."""
    flat = loss.detach().float().reshape(-1)
    return torch.where(torch.isfinite(flat), torch.zeros_like(flat), flat).sum()


@torch.no_grad()
def _finite_flags(params: list[MaskedParameter]) -> Tensor:
    """Whether each tensor's latent weights are all finite (no host read). One reduction pass per tensor, no
    weight-sized buffer: a NaN or Inf anywhere makes the sum non-finite (finite weights cannot overflow a float sum)."""
    return torch.isfinite(torch.stack([p.latent.sum(dtype=torch.float32) for p in params]))


def reads_wait_for_the_device(device: torch.device) -> bool:
    """Whether reading a tensor of ``device`` on the host waits for queued work (any device but the CPU)."""
    return device.type != "cpu"


class FiniteWatch:
    """The per-step finite checks of :class:`~lightning_prune.BudgetCallback`, read at once on a CPU and on the device
    until :meth:`read` elsewhere.

    Deferred, a check is a few device operations: the first step with a non-finite loss (and that loss), and the first
    step after which a tensor's latent weights were non-finite (and which tensors). :meth:`read` takes them to the host
    once and raises :class:`NonFiniteError`, on every rank together.
    """

    def __init__(self) -> None:
        self.deferred = False
        # steps in float32 (every rank's row is gathered as float32): exact up to 2**24 steps
        self._loss: Tensor | None = None  # [first step with a non-finite loss (-1: none), that loss (0: finite)]
        self._latents: Tensor | None = None  # [first step with a non-finite latent (-1: none), one flag per tensor]

    def start(self, params: list[MaskedParameter], trainer: pl.Trainer | None = None) -> None:
        """Read at once or defer, after the device of ``params``; forget what was kept. A ``ModelCheckpoint`` with
        ``save_weights_only=True`` saves without calling the callbacks' ``on_save_checkpoint``: with one, the checks
        are read at once on any device (before it saves, as it runs last)."""
        weights_only = any(getattr(cb, "save_weights_only", False) for cb in getattr(trainer, "checkpoint_callbacks", []))
        self.deferred = bool(params) and not weights_only and reads_wait_for_the_device(params[0].latent.device)
        self._loss = self._latents = None

    def loss(self, trainer: pl.Trainer, loss: Tensor) -> None:
        if not self.deferred:
            check_loss_finite(trainer, loss)
            return
        value = _non_finite_part(loss)
        now = torch.stack([torch.where(torch.isfinite(value), -1.0, float(trainer.global_step)), value])
        self._loss = now if self._loss is None else torch.where(self._loss[0] < 0, now, self._loss)

    def latents(self, trainer: pl.Trainer, params: list[MaskedParameter], consequence: str) -> None:
        if not self.deferred:
            check_latents_finite(trainer, params, consequence)
            return
        if not params:
            return
        bad = (~_finite_flags(params)).float()
        now = torch.cat([torch.where(bad.any(), float(trainer.global_step), -1.0).reshape(1), bad])
        self._latents = now if self._latents is None else torch.where(self._latents[0] < 0, now, self._latents)

    def read(self, trainer: pl.Trainer, params: list[MaskedParameter]) -> None:
        """Take the deferred checks to the host (one read) and raise :class:`NonFiniteError` if one failed."""
        if not self.deferred or (self._loss is None and self._latents is None):
            return
        device = params[0].latent.device
        loss = self._loss if self._loss is not None else torch.tensor([-1.0, 0.0], device=device)
        latents = self._latents if self._latents is not None else torch.full((len(params) + 1,), -1.0, device=device)
        rows = gather_ranks(trainer, torch.cat([loss, latents])).cpu()  # (ranks, 2 + 1 + tensors)
        loss_ranks = [r for r in range(rows.shape[0]) if rows[r, 0] >= 0]
        latent_ranks = [r for r in range(rows.shape[0]) if rows[r, 2] >= 0]
        if not loss_ranks and not latent_ranks:
            return
        loss_step = min((int(rows[r, 0]) for r in loss_ranks), default=None)
        latent_step = min((int(rows[r, 2]) for r in latent_ranks), default=None)
        # the ranks where it happened first (the others followed through the gradients' all-reduce)
        loss_ranks = [r for r in loss_ranks if int(rows[r, 0]) == loss_step]
        latent_ranks = [r for r in latent_ranks if int(rows[r, 2]) == latent_step]
        suffix = (
            f", found at step {trainer.global_step}: on {device.type} the finite checks are read every "
            "log_every_n_steps and before each checkpoint, and no checkpoint was written after it. Lower the learning "
            "rate or clip gradients (Trainer(gradient_clip_val=...)), then resume from the last checkpoint, which is "
            "intact."
        )

        def where(ranks: list[int]) -> str:
            return f" on rank {', '.join(map(str, ranks))}" if rows.shape[0] > 1 else ""

        # the first failure: latents non-finite after step s come before the loss of step s, computed from them
        if latent_step is not None and (loss_step is None or latent_step <= loss_step):
            flags = rows[latent_ranks][:, 3:] > 0
            names = ", ".join(f"'{params[i].name}'" for i in sorted({int(i) for i in flags.nonzero()[:, 1]}))
            raise NonFiniteError(f"{names} has non-finite latent weights{where(latent_ranks)} after step "
                                 f"{latent_step}{suffix}")
        raise NonFiniteError(f"The training loss was {float(rows[loss_ranks[0], 1])}{where(loss_ranks)} at step "
                             f"{loss_step}{suffix}")


def gather_ranks(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """``tensor`` of every rank, stacked along a new first dimension (one row in a single process)."""
    if trainer.world_size <= 1:
        return tensor.unsqueeze(0)
    # a sum of one-hot rows: a plain all-reduce, which every strategy implements
    rows = torch.zeros((trainer.world_size, *tensor.shape), dtype=torch.float32, device=tensor.device)
    rows[trainer.global_rank] = tensor.float()
    return trainer.strategy.reduce(rows, reduce_op="sum")
