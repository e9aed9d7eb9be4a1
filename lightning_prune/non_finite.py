"""Stop training on a NaN or Inf before it reaches an optimizer step or a checkpoint; every rank stops together."""

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
    flat = loss.detach().float().reshape(-1)
    non_finite = torch.where(torch.isfinite(flat), torch.zeros_like(flat), flat).sum().reshape(1)  # 0 if finite
    values = gather_ranks(trainer, non_finite).reshape(-1).tolist()
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
    with torch.no_grad():
        # one reduction pass per tensor, no weight-sized buffer: a NaN or Inf anywhere makes the sum non-finite (finite
        # weights cannot overflow a float sum)
        flags = torch.isfinite(torch.stack([p.latent.sum(dtype=torch.float32) for p in params]))
    flags = gather_ranks(trainer, flags).reshape(-1, len(params)).bool().cpu()  # (ranks, tensors)
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


def gather_ranks(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """``tensor`` of every rank, stacked along a new first dimension (one row in a single process)."""
    if trainer.world_size <= 1:
        return tensor.unsqueeze(0)
    # a sum of one-hot rows: a plain all-reduce, which every strategy implements
    rows = torch.zeros((trainer.world_size, *tensor.shape), dtype=torch.float32, device=tensor.device)
    rows[trainer.global_rank] = tensor.float()
    return trainer.strategy.reduce(rows, reduce_op="sum")
