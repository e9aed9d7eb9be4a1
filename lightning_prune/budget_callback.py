"""BudgetCallback: reparametrizes the model, schedules λ / temperature / target share, and finalises at fit end."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_prune.budget import (
    BUDGET_MODES,
    add_budget_gradient,
    budget_penalty,
    flush_budget_gradient,
    hard_kept_counts,
    soft_kept_shares,
)
from lightning_prune.finalization import budget_count, check_sparsity, finalize, layer_floor
from lightning_prune.reparametrize import (
    DEFAULT_LAYER_TYPES,
    PrunedLayer,
    prunable_modules,
    pruned_layers,
    reparametrize,
)
from lightning_prune.schedules import (
    LAMBDA_SCHEDULES,
    TARGET_SCHEDULES,
    TEMPERATURE_SCHEDULES,
    lambda_at,
    target_keep_at,
    temperature_at,
)

#: Share of each layer kept at least, unless the budget is too small for it (see ``BudgetCallback.min_layer_keep``).
DEFAULT_MIN_LAYER_KEEP = 0.01


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf; raised before the optimizer step so the last checkpoint stays good."""


class BudgetCallback(Callback):
    """Budget-aware pruning during training, for any LightningModule.

    At ``setup`` it reparametrizes the module's prunable weights (unless they already are), before the optimizers are
    built. At every optimizer step it sets the temperature, moves the target keep share from 1 to ``1 − sparsity``,
    and adds the gradient of ``λ·L_budget`` to the latent weights, so the module's own ``training_step`` needs no
    change. That gradient is added by the task loss's backward pass itself, in the same pass over each weight
    (requested in ``on_before_backward``; a layer the backward pass does not reach, or every layer under
    ``torch.compile(model)``, gets it in ``on_before_optimizer_step``), or, with gradient accumulation, a scaled loss
    (16-bit ``GradScaler``, other precision plugins), manual optimization or DDP with ``find_unused_parameters``,
    after the backward pass in ``on_before_optimizer_step``. Any backward pass through the weights between the
    callback's ``on_before_backward`` and the loss's own (``torch.autograd.grad`` in a later ``on_before_backward``
    hook) takes the request instead. When fit ends it hardens the masks so that exactly ``round((1 − sparsity)·N)``
    weights are kept, before the last checkpoint is written.

    Logged (``prune/...``): ``lambda``, ``temperature``, ``target_keep``, ``budget_loss``, ``kept_soft``, ``kept_hard``,
    ``kept/<layer>``, and at finalisation ``acc_soft`` / ``acc_hard`` (top-1 on the validation data, when batches are
    ``(inputs, targets)`` and the module returns logits).

    Args:
        sparsity: share of the prunable weights removed at the end, in [0, 1).
        lambda_max: largest weight λ of the budget loss.
        lambda_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` warm-up from 0 to ``lambda_max``.
        lambda_warmup: share of training over which λ warms up, in [0, 1].
        temperature_start: temperature ``T`` at the start (> 0).
        temperature_end: temperature at the end, in (0, temperature_start].
        temperature_schedule: ``"exponential"``, ``"linear"``, ``"cosine"`` or ``"constant"``.
        grad_temperature: floor on the temperature used in the backward pass of the weights (bounds the gradient
            near the threshold).
        budget_grad_temperature: floor on the temperature of the budget loss's surrogate gradient: how far from the
            threshold (in units of ``|θ|/s``) the budget pressure reaches.
        target_schedule: how the target keep share moves from 1 to the budget: ``"cubic"``, ``"linear"`` or
            ``"constant"`` (the budget from the first step).
        target_start: share of training at which the target starts to move, in [0, 1].
        target_end: share of training at which the target reaches the budget, in [target_start, 1].
        threshold: normalised threshold ``c`` of the masks.
        mode: ``"global"`` (one budget over all layers) or ``"layer"`` (each layer meets the share on its own).
        min_layer_keep: share of each layer that is always kept (0 allows a layer to be emptied). Default: 1%,
            capped at half the budget's keep share so that the floors fit (0.5% at 99% sparsity).
        include: module-name patterns to prune (globs, or regexes prefixed ``re:``); default every Conv/Linear.
        exclude: module-name patterns to leave dense.
        total_steps: optimizer steps the schedules span; default ``trainer.estimated_stepping_batches``.
        finalize_on_fit_end: harden the masks when fit ends.
        report_accuracy: at finalisation, measure top-1 accuracy on the validation data before and after hardening.
        check_finite: stop with :class:`NonFiniteError` on a non-finite loss or latent weight.
        compile_gate: run the masks' forward and backward as fused kernels compiled by torch.compile (see
            :mod:`lightning_prune.compiled_gate`): a faster step, after a few seconds of compiling in the first steps.
            Needs a C++ compiler on the CPU or Triton on a GPU; without one, a warning and the eager kernels.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[BudgetCallback(sparsity=0.9)])
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        lambda_max: float = 5.0,
        lambda_schedule: str = "linear",
        lambda_warmup: float = 0.1,
        temperature_start: float = 0.5,
        temperature_end: float = 0.02,
        temperature_schedule: str = "exponential",
        grad_temperature: float = 0.1,
        budget_grad_temperature: float = 1.0,
        target_schedule: str = "cubic",
        target_start: float = 0.0,
        target_end: float = 0.4,
        threshold: float = 1.0,
        mode: str = "global",
        min_layer_keep: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        total_steps: int | None = None,
        finalize_on_fit_end: bool = True,
        report_accuracy: bool = True,
        check_finite: bool = True,
        compile_gate: bool = False,
    ) -> None:
        super().__init__()
        check_sparsity(sparsity)
        _check(lambda_max >= 0 and math.isfinite(lambda_max), f"lambda_max must be >= 0, got {lambda_max}.")
        _check_choice("lambda_schedule", lambda_schedule, LAMBDA_SCHEDULES)
        _check_choice("temperature_schedule", temperature_schedule, TEMPERATURE_SCHEDULES)
        _check_choice("target_schedule", target_schedule, TARGET_SCHEDULES)
        _check_choice("mode", mode, BUDGET_MODES)
        _check(0 <= lambda_warmup <= 1, f"lambda_warmup is a share of training in [0, 1], got {lambda_warmup}.")
        _check(temperature_start > 0, f"temperature_start must be > 0, got {temperature_start}.")
        _check(
            0 < temperature_end <= temperature_start,
            f"temperature_end must be in (0, temperature_start={temperature_start}], got {temperature_end}: "
            "the temperature goes down during training.",
        )
        _check(grad_temperature > 0, f"grad_temperature must be > 0, got {grad_temperature}.")
        _check(budget_grad_temperature > 0, f"budget_grad_temperature must be > 0, got {budget_grad_temperature}.")
        _check(
            0 <= target_start <= target_end <= 1,
            f"need 0 <= target_start <= target_end <= 1 (shares of training), got {target_start} and {target_end}.",
        )
        _check(threshold > 0, f"threshold must be > 0, got {threshold}.")
        if min_layer_keep is None:
            min_layer_keep = min(DEFAULT_MIN_LAYER_KEEP, (1.0 - sparsity) / 2)
        _check(0 <= min_layer_keep <= 1, f"min_layer_keep is a share in [0, 1], got {min_layer_keep}.")
        _check(total_steps is None or total_steps > 0, f"total_steps must be > 0, got {total_steps}.")
        for arg, value in (("include", include), ("exclude", exclude)):
            _check(not isinstance(value, str), f"`{arg}` takes a list of patterns: write [{value!r}].")
        self.sparsity = float(sparsity)
        self.lambda_max = float(lambda_max)
        self.lambda_schedule = lambda_schedule
        self.lambda_warmup = float(lambda_warmup)
        self.temperature_start = float(temperature_start)
        self.temperature_end = float(temperature_end)
        self.temperature_schedule = temperature_schedule
        self.grad_temperature = float(grad_temperature)
        self.budget_grad_temperature = float(budget_grad_temperature)
        self.target_schedule = target_schedule
        self.target_start = float(target_start)
        self.target_end = float(target_end)
        self.threshold = float(threshold)
        self.mode = mode
        self.min_layer_keep = float(min_layer_keep)
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.total_steps = total_steps
        self.finalize_on_fit_end = finalize_on_fit_end
        self.report_accuracy = report_accuracy
        self.check_finite = check_finite
        self.compile_gate = bool(compile_gate)
        # state that survives a resume
        self.finalized = False
        self.step = 0
        self.lam = 0.0
        self.temperature = self.temperature_start
        self.target_keep = 1.0
        self.report: dict[str, Any] = {}
        self._layers: list[PrunedLayer] = []
        self._latent_ids: set[int] = set()
        self._total: int | None = None
        self._requested = False  # budget gradients requested from this step's backward pass

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" and not pruned_layers(pl_module):
            return  # validate/test/predict of a dense module: nothing to do
        if not pruned_layers(pl_module):
            if not prunable_modules(pl_module):
                kinds = ", ".join(t.__name__ for t in DEFAULT_LAYER_TYPES)
                raise ValueError(
                    f"BudgetCallback: {type(pl_module).__name__} has no layer to prune (no {kinds} module with a "
                    "weight), so there is no budget to meet. Remove the callback, or reparametrize the layers to prune "
                    "yourself before fit: lightning_prune.reparametrize(model, layer_types=[...])."
                )
            reparametrize(
                pl_module,
                include=self.include,
                exclude=self.exclude,
                threshold=self.threshold,
                temperature=self.temperature_start,
                grad_temperature=self.grad_temperature,
            )
        elif self.include or self.exclude:
            rank_zero_warn(
                "BudgetCallback: the module is already reparametrized; its `include`/`exclude` are ignored.",
            )
        self._layers = pruned_layers(pl_module)
        self._latent_ids = {id(layer.latent) for layer in self._layers}
        if self.compile_gate:
            for layer in self._layers:
                layer.mask.compile_gate = True
        sizes = [layer.numel for layer in self._layers]
        floors = sum(layer_floor(n, self.min_layer_keep) for n in sizes)
        budget = budget_count(sum(sizes), self.sparsity)
        if floors > budget:
            raise ValueError(
                f"min_layer_keep={self.min_layer_keep} keeps {floors} weights but sparsity={self.sparsity} allows "
                f"{budget} of {sum(sizes)}: lower min_layer_keep or the sparsity."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = pruned_layers(pl_module)  # after a strategy wrapped the module, same objects
        if self.total_steps is not None:
            self._total = self.total_steps
        elif self._total is None:  # a resumed run keeps the span saved in its checkpoint
            estimated = trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                raise ValueError(
                    "BudgetCallback needs a finite training length to schedule λ, T and the target: set max_epochs "
                    "or max_steps on the Trainer, or total_steps on the callback."
                )
            self._total = int(estimated)
        self.finalized = all(bool(layer.mask.hard) for layer in self._layers)
        self._apply_schedules(trainer.global_step)

    # ---------------------------------------------------------- per step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._drop_requests()  # a step that stopped between its backward pass and its optimizer step left some
        if not self.finalized:
            self._apply_schedules(trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.check_finite:
            self._check_loss_finite(trainer, loss)
        if self._budget_in_backward(trainer, pl_module):
            # the backward pass adds the gradient of λ · budget_loss in its own pass over each θ; what it does not
            # reach is added in on_before_optimizer_step (see add_budget_gradient)
            add_budget_gradient(
                self._layers, self.target_keep, self.mode, self.budget_grad_temperature, self.lam, in_backward=True
            )
            self._requested = True

    def _check_loss_finite(self, trainer: pl.Trainer, loss: Tensor) -> None:
        # one value per rank: every rank takes the same decision (a rank stopping alone would leave the others
        # waiting in the gradient all-reduce)
        flat = loss.detach().float().reshape(-1)
        non_finite = torch.where(torch.isfinite(flat), torch.zeros_like(flat), flat).sum().reshape(1)  # 0 if finite
        values = _gather_ranks(trainer, non_finite).reshape(-1).tolist()
        bad = [rank for rank, value in enumerate(values) if not math.isfinite(value)]
        if bad:
            where = f" on rank {', '.join(map(str, bad))}" if len(values) > 1 else ""
            raise NonFiniteError(
                f"The training loss is {values[bad[0]]}{where} at step {trainer.global_step} "
                f"(λ={self.lam:.4g}, T={self.temperature:.4g}). Training stopped before the optimizer step, so the "
                "last checkpoint is intact. Lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)) "
                "or raise temperature_end."
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._requested:
            self._requested = False
            flush_budget_gradient(self._layers)
            return
        if not self._adds_budget([optimizer]):
            return
        # the gradient of (λ · budget_loss).backward(), added into θ.grad directly (see add_budget_gradient)
        add_budget_gradient(self._layers, self.target_keep, self.mode, self.budget_grad_temperature, weight=self.lam)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_requests()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_requests()

    def _drop_requests(self) -> None:
        """Forget budget-gradient requests that no backward pass took (a later backward must not add them)."""
        self._requested = False
        for layer in self._layers:
            layer.mask.take_budget_grad()

    def _budget_in_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether this step's backward pass can add the budget gradient: one backward pass per optimizer step
        (automatic optimization, no gradient accumulation), a loss that no precision plugin scales (plain, bf16 or
        16-bit without GradScaler), every rank's backward pass reaching every layer (see
        :func:`_ranks_reach_every_layer`), and an optimizer that trains the latent weights."""
        precision = trainer.precision_plugin
        return (
            self._adds_budget(trainer.optimizers)
            and pl_module.automatic_optimization
            and trainer.accumulate_grad_batches == 1
            and type(precision) in (Precision, HalfPrecision, MixedPrecision)
            and getattr(precision, "scaler", None) is None
            and _ranks_reach_every_layer(trainer)
        )

    def _adds_budget(self, optimizers: list[torch.optim.Optimizer]) -> bool:
        """Whether a step of these optimizers gets a budget gradient: before finalisation, with λ > 0, and when one
        of them trains the latent weights."""
        return (
            not self.finalized
            and self.lam != 0.0
            and bool(self._layers)
            and any(id(p) in self._latent_ids for o in optimizers for group in o.param_groups for p in group["params"])
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.check_finite:
            self._check_latents_finite(trainer, "Training stopped before any checkpoint of this step was written.")
        if not self.finalized:
            if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
                self._log_state(pl_module)
            if self.finalize_on_fit_end and self._total is not None and trainer.global_step >= self._total:
                self._finalize(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finalize_on_fit_end:
            return
        if not self.finalized:  # fit stopped before the planned last step (early stopping, max_time)
            self._finalize(trainer, pl_module)
        # Lightning rewrites `last.ckpt` only in the steps where it saves a top-k checkpoint: with a `monitor` that
        # stopped improving, `last` would hold an earlier, soft-masked network. Rewrite it with the finalised one.
        # (ModelCheckpoint's own on_train_end runs after this one and writes `last` if it was never written.)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.last_model_path:
                if trainer.is_global_zero and os.path.islink(cb.last_model_path):
                    os.remove(cb.last_model_path)  # save_last="link": replace the link, not the top-k file
                trainer.strategy.barrier("lightning_prune.last_checkpoint")
                trainer.save_checkpoint(cb.last_model_path)

    # ------------------------------------------------------------- state
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        # called while the checkpoint is built, before anything is written: a NaN that appeared after the per-step
        # check (another callback, a hook) must not overwrite the last good checkpoint
        if self.check_finite:
            self._check_latents_finite(trainer, "The checkpoint of this step was not written.")

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self._total,
            "lambda": self.lam,
            "temperature": self.temperature,
            "target_keep": self.target_keep,
            "finalized": self.finalized,
            "sparsity": self.sparsity,
            "report": dict(self.report),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sparsity", self.sparsity) != self.sparsity:
            rank_zero_warn(
                f"Resuming a run trained for sparsity={state_dict['sparsity']} with sparsity={self.sparsity}: "
                "the target share jumps."
            )
        self.step = state_dict["step"]
        self._total = state_dict["total_steps"] if self.total_steps is None else self.total_steps
        self.lam = state_dict["lambda"]
        self.temperature = state_dict["temperature"]
        self.target_keep = state_dict["target_keep"]
        self.finalized = state_dict["finalized"]
        self.report = dict(state_dict.get("report", {}))

    # ------------------------------------------------------------ internals
    def progress(self, step: int) -> float:
        """Share of the scheduled training done after ``step`` optimizer steps."""
        return min(1.0, step / self._total) if self._total else 0.0

    def _apply_schedules(self, step: int) -> None:
        p = self.progress(step)
        self.step = step
        self.lam = lambda_at(p, self.lambda_max, self.lambda_schedule, self.lambda_warmup)
        self.temperature = temperature_at(p, self.temperature_start, self.temperature_end, self.temperature_schedule)
        self.target_keep = target_keep_at(p, 1.0 - self.sparsity, self.target_schedule, self.target_start, self.target_end)
        with torch.no_grad():
            for layer in self._layers:
                layer.mask.temperature.fill_(self.temperature)
                layer.mask.grad_temperature.fill_(self.grad_temperature)
                layer.mask.threshold.fill_(self._layer_threshold(layer))

    def _layer_threshold(self, layer: PrunedLayer) -> float:
        """``c``, lowered for a layer whose kept share fell under its floor so that the floor stays kept."""
        floor = layer_floor(layer.numel, self.min_layer_keep)
        if floor == 0:
            return self.threshold
        score = layer.mask.score(layer.latent).flatten()
        if int((score > self.threshold).sum()) >= floor:
            return self.threshold
        # the floor-th largest score sits just above the lowered threshold
        kth = torch.kthvalue(score.float().cpu(), score.numel() - floor + 1).values.item()
        return min(self.threshold, kth * (1 - 1e-6))

    def _log_state(self, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            soft, _ = soft_kept_shares(self._layers)
            counts = hard_kept_counts(self._layers)
            kept = sum(k for k, _ in counts.values())
            total = sum(n for _, n in counts.values())
            values = {
                "prune/lambda": self.lam,
                "prune/temperature": self.temperature,
                "prune/target_keep": self.target_keep,
                "prune/budget_loss": float(budget_penalty(soft, self.target_keep)),
                "prune/kept_soft": float(soft),
                "prune/kept_hard": kept / total,
            }
            values.update({f"prune/kept/{name}": k / n for name, (k, n) in counts.items()})
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    def _check_latents_finite(self, trainer: pl.Trainer, consequence: str) -> None:
        if not self._layers:
            return
        with torch.no_grad():
            flags = torch.stack([torch.isfinite(layer.latent).all() for layer in self._layers])
        # (ranks, layers), gathered so that every rank raises together
        flags = _gather_ranks(trainer, flags).reshape(-1, len(self._layers)).bool().cpu()
        if bool(flags.all()):
            return
        bad_layers = [self._layers[i].name for i in sorted({int(i) for i in (~flags).nonzero()[:, 1]})]
        where = ""
        if flags.shape[0] > 1:
            ranks = sorted({int(r) for r in (~flags).nonzero()[:, 0]})
            where = f" on rank {', '.join(map(str, ranks))}"
        names = ", ".join(f"'{name}'" for name in bad_layers)
        raise NonFiniteError(
            f"Layer {names} has non-finite latent weights{where} after step {trainer.global_step}. {consequence} "
            "Lower the learning rate or clip gradients (Trainer(gradient_clip_val=...)), then resume from the last "
            "checkpoint, which is intact."
        )

    @torch.no_grad()
    def _finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedules(trainer.global_step)  # the soft network as it stands after the last step
        acc_soft = self._accuracy(trainer, pl_module) if self.report_accuracy else None
        soft, _ = soft_kept_shares(self._layers)
        counts = hard_kept_counts(self._layers)
        kept_before = sum(k for k, _ in counts.values()) / sum(n for _, n in counts.values())
        result = finalize(self._layers, self.sparsity, self.min_layer_keep, self.mode)
        self.finalized = True
        acc_hard = self._accuracy(trainer, pl_module) if self.report_accuracy else None
        self.report = {
            "step": trainer.global_step,
            "kept": result.kept,
            "total": result.total,
            "kept_share": result.kept_share,
            "kept_soft_before": float(soft),
            "kept_hard_before": kept_before,
            "acc_soft": acc_soft,
            "acc_hard": acc_hard,
            "per_layer": {name: list(v) for name, v in result.per_layer.items()},
        }
        values = {"prune/kept_final": result.kept_share, "prune/kept_hard_before": kept_before}
        if acc_soft is not None and acc_hard is not None:
            values.update({"prune/acc_soft": acc_soft, "prune/acc_hard": acc_hard})
        if trainer.logger is not None:
            trainer.logger.log_metrics(values, step=trainer.global_step)
        msg = (
            f"Pruning finalised at step {trainer.global_step}: kept {result.kept}/{result.total} weights "
            f"({result.kept_share:.4%}, sparsity {1 - result.kept_share:.4%}); kept share before the hard cut: "
            f"soft {float(soft):.4%}, hard {kept_before:.4%}."
        )
        if acc_soft is not None and acc_hard is not None:
            msg += f" Validation accuracy: soft {acc_soft:.4f} -> hard {acc_hard:.4f}."
        rank_zero_info(msg)

    def _accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        loaders = _val_loaders(trainer)
        if not loaders:
            return None
        was_training = pl_module.training
        pl_module.eval()
        correct = seen = 0
        usable = True
        try:
            for loader in loaders:
                for batch in loader:
                    if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], Tensor)):
                        usable = False
                        break
                    # as Lightning's loops do: "bf16-true"/"16-true"/"64-true" expect inputs in the model's dtype
                    x = trainer.precision_plugin.convert_input(batch[0]).to(pl_module.device)
                    y = batch[1].to(pl_module.device)
                    with trainer.precision_plugin.forward_context():
                        logits = pl_module(x)
                    if not isinstance(logits, Tensor) or logits.dim() != 2:
                        usable = False
                        break
                    correct += int((logits.argmax(dim=1) == y).sum())
                    seen += y.numel()
                if not usable:
                    break
        finally:
            pl_module.train(was_training)
        if trainer.world_size > 1:
            # under DDP the validation loaders given to fit are sharded: count over every rank's shard, so that
            # all ranks report (and checkpoint) the same accuracy
            counts = torch.tensor([correct, seen, int(not usable)], dtype=torch.float64, device=pl_module.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            correct, seen, usable = int(counts[0]), int(counts[1]), not bool(counts[2])
        return correct / seen if usable and seen else None


def _val_loaders(trainer: pl.Trainer) -> list:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and type(datamodule).val_dataloader is not pl.LightningDataModule.val_dataloader:
        loaders = datamodule.val_dataloader()
    else:
        loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _ranks_reach_every_layer(trainer: pl.Trainer) -> bool:
    """True when a layer's backward pass runs on every rank or on none: one process, or DDP that requires every
    parameter to get a gradient (no ``find_unused_parameters``, no ``static_graph``).

    The budget gradient added in the backward pass is averaged by the all-reduce with the other ranks'; a rank that
    did not reach a layer would add it again in :func:`~lightning_prune.flush_budget_gradient`, after the all-reduce,
    and the replicas would drift apart.
    """
    if trainer.world_size == 1:
        return True
    model = trainer.strategy.model
    return (
        isinstance(model, DistributedDataParallel)
        and not model.find_unused_parameters
        and not getattr(model, "static_graph", False)
    )


def _gather_ranks(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """``tensor`` of every rank, stacked along a new first dimension (one row in a single process)."""
    if trainer.world_size <= 1:
        return tensor.unsqueeze(0)
    # a sum of one-hot rows: a plain all-reduce, which every strategy implements
    rows = torch.zeros((trainer.world_size, *tensor.shape), dtype=torch.float32, device=tensor.device)
    rows[trainer.global_rank] = tensor.float()
    return trainer.strategy.reduce(rows, reduce_op="sum")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"BudgetCallback: {message}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {choices}, got {value!r}.")
