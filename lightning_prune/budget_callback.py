"""BudgetCallback: prunes any LightningModule while it trains, to an exact budget, with no fine-tuning."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_prune.budget import (
    BudgetMode,
    budget_count,
    budget_step,
    check_sparsity,
    common_unit,
    hard_kept_counts,
    layer_floor,
    margin_gap,
    optimizer_metric,
    soft_kept_counts,
    update_floor_thresholds,
)
from lightning_prune.budget_controller import BudgetController
from lightning_prune.finalization import finalize
from lightning_prune.module_passes import has_batchnorm, recalibrate_batchnorm, validation_metrics
from lightning_prune.non_finite import check_latents_finite, check_loss_finite
from lightning_prune.reparametrize import coverage, masked_parameters, prunable_parameters, reparametrize
from lightning_prune.schedules import TargetSchedule, target_keep_at, temperature_at

#: Share of each tensor kept at least, unless the budget is too small for it (see ``min_layer_keep``).
DEFAULT_MIN_LAYER_KEEP = 0.01
#: Optimizer steps between two updates of the thresholds of tensors near their floor.
FLOOR_CHECK_EVERY = 10
#: Kept share just before the cut, relative to the budget, beyond which the cut gets a warning.
CUT_TOLERANCE = 0.1


class BudgetCallback(Callback):
    """Budget-aware pruning during training, for any LightningModule.

    At ``setup`` it reparametrizes the module's weight matrices (see :mod:`lightning_prune.reparametrize` for the
    rule), before the optimizers are built. During training the target keep share moves from 1 to
    ``1 − sparsity`` over ``[target_start, target_end]`` of the run, while the gate's temperature falls from
    ``temperature_start`` to ``temperature_end``; after ``target_end`` the gate is the step function, so the network
    trains on with the mask it will keep. Before each optimizer step a closed loop
    (:class:`~lightning_prune.budget_controller.BudgetController`) sizes the budget step from how far the weights are
    from the target, whatever the optimizer and learning rate; under an Adam-like optimizer the step is taken in its
    metric (:func:`~lightning_prune.budget.optimizer_metric`). When fit ends the masks become hard and keep exactly
    ``budget_count(N, sparsity)`` weights, BatchNorm statistics are re-estimated, and the module's own validation
    metrics before and after the cut go into :attr:`report`.

    Logged (``prune/...``): ``lambda``, ``temperature``, ``target_keep``, ``kept_hard``, ``kept_soft``,
    ``kept/<tensor>``, and at the cut ``kept_hard_before``, ``kept_final`` and the validation metrics.

    Args:
        sparsity: share of the covered weights removed at the end, in [0, 1).
        target_schedule: how the target keep share moves from 1 to the budget (``"cubic"``: fast first).
        target_start: share of training at which the target starts to move, in [0, 1].
        target_end: share of training at which the target reaches the budget, in [target_start, 1].
        temperature_start: temperature of the gate at the start (> 0).
        temperature_end: temperature at ``target_end`` (in (0, temperature_start]); 0 (the step) after it.
        grad_temperature: floor on the temperature of the backward pass (bounds the gradient near the threshold).
        threshold: normalised threshold ``c`` of the masks.
        mode: ``"global"`` (one budget over all tensors) or ``"layer"`` (each tensor meets the share on its own).
        min_layer_keep: share of each tensor always kept; default 1%, capped at half the keep share.
        include: patterns of the tensors to prune (globs or ``re:`` regexes, on tensor or module names).
        exclude: patterns of tensors to leave dense.
        embeddings: also prune embedding tables.
        response_steps: time constant of the budget loop, in optimizer steps; default a 16th of the target's ramp,
            between 2 and 10 steps.
        max_step: largest budget step per optimizer step, in units of each tensor's scale.
        exempt_share: share of the budget, the weights with the largest scores, that the budget step leaves alone
            (the step of a trimmed L1 norm): the weights the network keeps anyway are not shrunk.
        precondition: under an optimizer that keeps running means of squared gradients (Adam, AdamW, RMSprop, ...),
            shrink each weight in proportion to the step the optimizer gives it (``1/√v``), so that the weights the
            loss needs least go first; with SGD the step is uniform either way.
        total_steps: optimizer steps the schedules span; default ``trainer.estimated_stepping_batches``.
        finalize_on_fit_end: harden the masks when fit ends.
        recalibrate_batchnorm: after the cut, re-estimate BatchNorm statistics (when the model has BatchNorm).
        recalibration_batches: training batches used for that.
        measure_cut: run the module's ``validation_step`` before and after the cut and report what it logs.
        check_finite: stop with :class:`~lightning_prune.NonFiniteError` on a non-finite loss or latent weight.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[BudgetCallback(sparsity=0.9)])
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        target_schedule: TargetSchedule = "cubic",
        target_start: float = 0.0,
        target_end: float = 0.6,
        temperature_start: float = 0.5,
        temperature_end: float = 0.02,
        grad_temperature: float = 0.1,
        threshold: float = 1.0,
        mode: BudgetMode = "global",
        min_layer_keep: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        embeddings: bool = False,
        response_steps: float | None = None,
        max_step: float = 1.0,
        exempt_share: float = 0.5,
        precondition: bool = True,
        total_steps: int | None = None,
        finalize_on_fit_end: bool = True,
        recalibrate_batchnorm: bool = True,
        recalibration_batches: int = 32,
        measure_cut: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        check_sparsity(sparsity)
        _check_choice("target_schedule", target_schedule, TargetSchedule)
        _check_choice("mode", mode, BudgetMode)
        _check(
            0 <= target_start <= target_end <= 1,
            f"need 0 <= target_start <= target_end <= 1 (shares of training), got {target_start} and {target_end}.",
        )
        _check(
            0 < temperature_end <= temperature_start,
            f"need 0 < temperature_end <= temperature_start, got {temperature_end} and {temperature_start}: the "
            "temperature goes down during training.",
        )
        _check(grad_temperature > 0, f"grad_temperature must be > 0, got {grad_temperature}.")
        _check(threshold > 0, f"threshold must be > 0, got {threshold}.")
        if min_layer_keep is None:
            min_layer_keep = min(DEFAULT_MIN_LAYER_KEEP, (1.0 - sparsity) / 2)
        _check(0 <= min_layer_keep <= 1, f"min_layer_keep is a share in [0, 1], got {min_layer_keep}.")
        _check(total_steps is None or total_steps > 0, f"total_steps must be > 0, got {total_steps}.")
        _check(response_steps is None or response_steps >= 1, f"response_steps must be >= 1, got {response_steps}.")
        _check(0 <= exempt_share < 1, f"exempt_share is a share of the budget in [0, 1), got {exempt_share}.")
        _check(recalibration_batches >= 1, f"recalibration_batches must be >= 1, got {recalibration_batches}.")
        for arg, value in (("include", include), ("exclude", exclude)):
            _check(not isinstance(value, str), f"`{arg}` takes a list of patterns: write [{value!r}].")
        self.sparsity = float(sparsity)
        self.keep = 1.0 - self.sparsity
        self.target_schedule = target_schedule
        self.target_start, self.target_end = float(target_start), float(target_end)
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.grad_temperature = float(grad_temperature)
        self.threshold = float(threshold)
        self.mode = mode
        self.min_layer_keep = float(min_layer_keep)
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.embeddings = bool(embeddings)
        self.response_steps = response_steps
        self.controller = BudgetController(response_steps or 10.0, max_step)
        self.exempt_share = float(exempt_share)
        self.precondition = bool(precondition)
        self.total_steps = total_steps
        self.finalize_on_fit_end = finalize_on_fit_end
        self.recalibrate_batchnorm = recalibrate_batchnorm
        self.recalibration_batches = int(recalibration_batches)
        self.measure_cut = measure_cut
        self.check_finite = check_finite
        self.finalized = False
        self.step = 0
        self.target_keep = 1.0
        self.temperature = self.temperature_start
        self.report: dict[str, Any] = {}
        self._total: int | None = None
        self._params = []
        self._latent_ids: set[int] = set()
        self._lambda: Tensor | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or masked_parameters(pl_module):
            if stage == "fit" and (self.include or self.exclude):
                rank_zero_warn("BudgetCallback: the module is already reparametrized; include/exclude are ignored.")
            self._attach_state(pl_module)
            return
        # everything is checked before the module is changed: a refused fit leaves it as it was
        chosen = prunable_parameters(pl_module, self.include, self.exclude, self.embeddings)
        sizes = [module.get_parameter(name).numel() for module, name in chosen.values()]
        floors = sum(layer_floor(n, self.min_layer_keep) for n in sizes)
        if floors > budget_count(sum(sizes), self.sparsity):
            raise ValueError(
                f"BudgetCallback: min_layer_keep={self.min_layer_keep} keeps {floors} weights but sparsity="
                f"{self.sparsity} allows {budget_count(sum(sizes), self.sparsity)} of {sum(sizes)}: lower "
                "min_layer_keep or the sparsity."
            )
        if self.total_steps is None and trainer.max_steps == -1 and (trainer.max_epochs or -1) < 0:
            raise ValueError(_UNKNOWN_LENGTH)
        reparametrize(
            pl_module,
            include=self.include,
            exclude=self.exclude,
            embeddings=self.embeddings,
            threshold=self.threshold,
            temperature=self.temperature_start,
            grad_temperature=self.grad_temperature,
        )
        self._attach_state(pl_module)
        covered = coverage(pl_module, self.embeddings)
        self.report["coverage"] = covered.summary()
        rank_zero_info(f"BudgetCallback: {covered.summary()}.")
        if covered.share_of_matrix_weights < 0.5:
            rank_zero_warn(
                f"BudgetCallback: {covered.summary()}. sparsity={self.sparsity} applies to the covered tensors only; "
                "add the others with `include` patterns (or embeddings=True for embedding tables)."
            )

    def _attach_state(self, pl_module: pl.LightningModule) -> None:
        self._params = masked_parameters(pl_module)
        self._latent_ids = {id(p.latent) for p in self._params}
        self._floors = [layer_floor(p.numel, self.min_layer_keep) for p in self._params]
        if self._params:
            self._relative_scale = common_unit(self._params)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach_state(pl_module)  # after a strategy wrapped the module: the same tensors
        if self.total_steps is not None:
            self._total = self.total_steps
        elif self._total is None:
            self._total = _planned_steps(trainer)
        self.finalized = bool(self._params) and all(bool(p.mask.hard) for p in self._params)
        ramp_steps = (self.target_end - self.target_start) * self._total
        self.controller.set_response(self.response_steps or min(10.0, max(2.0, ramp_steps / 16)))
        self._apply_schedules(trainer.global_step)

    # ---------------------------------------------------------- per step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self.finalized:
            self._apply_schedules(trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.check_finite:
            check_loss_finite(trainer, loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        trains_latents = any(id(p) in self._latent_ids for g in optimizer.param_groups for p in g["params"])
        if self.finalized or not trains_latents:
            return
        gap, shares, exempt_above = margin_gap(
            self._params, self.target_keep, self.mode, trainer.global_step, self.threshold,
            self._floors if self.mode == "global" else None, exempt=self.exempt_share * self.keep,
        )
        self._lambda = self.controller.update(gap)
        rates = self._lambda * self._relative_scale if self.mode == "global" else self._lambda
        # a tensor at its floor feels no budget pressure
        rates = torch.where(shares > self.min_layer_keep, rates, torch.zeros_like(rates))
        metric = optimizer_metric(self._params, optimizer, trainer.global_step) if self.precondition else None
        budget_step(self._params, rates, exempt_above, metric)
        if self.mode == "global" and trainer.global_step % FLOOR_CHECK_EVERY == 0:
            update_floor_thresholds(self._params, shares, self._floors, self.min_layer_keep, self.threshold)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.check_finite:
            check_latents_finite(trainer, self._params, "Training stopped before any checkpoint of this step was written.")
        if self.finalized:
            return
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log_state(pl_module)
        if self.finalize_on_fit_end and self._total is not None and trainer.global_step >= self._total:
            self._finalize(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finalize_on_fit_end:
            return
        if not self.finalized:  # fit stopped before the planned last step (EarlyStopping, max_time, should_stop)
            self._finalize(trainer, pl_module)
        # Lightning rewrites `last.ckpt` only in the steps where it saves a top-k checkpoint: with a `monitor` that
        # stopped improving, `last` would hold an earlier, soft-masked network. Rewrite it with the finalised one.
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.last_model_path:
                if trainer.is_global_zero and os.path.islink(cb.last_model_path):
                    os.remove(cb.last_model_path)  # save_last="link": replace the link, not the top-k file
                trainer.strategy.barrier("lightning_prune.last_checkpoint")
                trainer.save_checkpoint(cb.last_model_path)

    # ------------------------------------------ a checkpoint of before the cut, under test
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._harden_soft_checkpoint(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._harden_soft_checkpoint(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._harden_soft_checkpoint(trainer, pl_module)

    def _harden_soft_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = masked_parameters(pl_module)
        if not self.finalize_on_fit_end or not params or all(bool(p.mask.hard) for p in params):
            return
        result = finalize(params, self.sparsity, self.min_layer_keep, self.mode)
        rank_zero_warn(
            f"BudgetCallback: the weights under {trainer.state.fn.value} come from before the cut (a checkpoint such "
            f"as ckpt_path='best' saved with soft masks). They were hardened now to the budget ({result.kept}/"
            f"{result.total} weights kept), without BatchNorm recalibration, so the figures are not those of the "
            "network the fit finalised: test ckpt_path='last' or the module itself for those."
        )

    # ------------------------------------------------------------- state
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        # before anything is written: a NaN that appeared after the per-step check must not overwrite a good file
        if self.check_finite:
            check_latents_finite(trainer, self._params, "The checkpoint of this step was not written.")

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_steps": self._total,
            "finalized": self.finalized,
            "sparsity": self.sparsity,
            "controller": self.controller.state_dict(),
            "report": dict(self.report),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sparsity", self.sparsity) != self.sparsity:
            rank_zero_warn(
                f"Resuming a run trained for sparsity={state_dict['sparsity']} with sparsity={self.sparsity}: "
                "the target share jumps."
            )
        self._total = state_dict["total_steps"] if self.total_steps is None else self.total_steps
        self.finalized = state_dict["finalized"]
        self.controller.load_state_dict(state_dict.get("controller", {}))
        self.report = dict(state_dict.get("report", {}))

    # ------------------------------------------------------------ internals
    def progress(self, step: int) -> float:
        """Share of the scheduled training done after ``step`` optimizer steps."""
        return min(1.0, step / self._total) if self._total else 0.0

    def _apply_schedules(self, step: int) -> None:
        p = self.progress(step)
        self.step = step
        self.target_keep = target_keep_at(p, self.keep, self.target_schedule, self.target_start, self.target_end)
        self.temperature = temperature_at(p, self.temperature_start, self.temperature_end, self.target_end)
        for param in self._params:
            param.mask.set_temperature(self.temperature)

    def _shares(self) -> tuple[float, float, dict[str, tuple[int, int]]]:
        """Soft and hard kept shares over the covered tensors, and the hard counts per tensor."""
        counts = hard_kept_counts(self._params)
        total = sum(n for _, n in counts.values())
        soft = sum(k for k, _ in soft_kept_counts(self._params).values())
        return soft / total, sum(k for k, _ in counts.values()) / total, counts

    def _log_state(self, pl_module: pl.LightningModule) -> None:
        soft, hard, counts = self._shares()
        values = {
            "prune/lambda": 0.0 if self._lambda is None else float(self._lambda.max()),
            "prune/temperature": self.temperature,
            "prune/target_keep": self.target_keep,
            "prune/kept_soft": soft,
            "prune/kept_hard": hard,
        }
        values.update({f"prune/kept/{name}": k / n for name, (k, n) in counts.items()})
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    @torch.no_grad()
    def _finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._apply_schedules(step)
        soft, hard, _ = self._shares()
        before = validation_metrics(trainer, pl_module) if self.measure_cut else {}
        result = finalize(self._params, self.sparsity, self.min_layer_keep, self.mode)
        self.finalized = True
        after = validation_metrics(trainer, pl_module) if self.measure_cut else {}
        recalibrated = {}
        if self.recalibrate_batchnorm and has_batchnorm(pl_module) and pl_module.automatic_optimization:
            if recalibrate_batchnorm(trainer, pl_module, self.recalibration_batches) and self.measure_cut:
                recalibrated = validation_metrics(trainer, pl_module)
        self.report.update({
            "step": step,
            "planned_steps": self._total,
            "kept": result.kept,
            "total": result.total,
            "kept_share": result.kept_share,
            "kept_soft_before": soft,
            "kept_hard_before": hard,
            "val_before_cut": before,
            "val_after_cut": after,
            "val_after_recalibration": recalibrated,
            "per_tensor": {name: list(v) for name, v in result.per_layer.items()},
        })
        if trainer.logger is not None:
            values = {"prune/kept_final": result.kept_share, "prune/kept_hard_before": hard}
            for prefix, metrics in (("before_cut", before), ("after_cut", after), ("after_bn", recalibrated)):
                values.update({f"prune/{prefix}/{name}": v for name, v in metrics.items()})
            trainer.logger.log_metrics(values, step=step)
        msg = (
            f"Pruning finalised at step {step}: kept {result.kept}/{result.total} weights ({result.kept_share:.4%}); "
            f"kept share just before the cut: hard {hard:.4%}, soft {soft:.4%}."
        )
        for name in sorted(set(before) & set(after)):
            msg += f" {name}: {before[name]:.4g} -> {after[name]:.4g}"
            msg += f" -> {recalibrated[name]:.4g} (BatchNorm re-estimated)" if name in recalibrated else ""
            msg += ";"
        rank_zero_info(msg)
        if abs(hard / result.kept_share - 1) > CUT_TOLERANCE:
            ramp_end = math.ceil(self.target_end * (self._total or step))
            rank_zero_warn(
                f"BudgetCallback: just before the cut {hard:.2%} of the covered weights were in use against a budget "
                f"of {result.kept_share:.2%}, so the cut changed the network the fit trained (see the metrics "
                f"above). Fit ended at step {step} of the {self._total} planned; the target reaches the budget at "
                f"step {ramp_end}. Let the run reach its planned length (max_epochs / max_time / EarlyStopping "
                "patience), or set total_steps to the steps it will really take."
            )


_UNKNOWN_LENGTH = (
    "BudgetCallback needs a finite training length to schedule the target and the temperature: set max_epochs or "
    "max_steps on the Trainer (with max_time, set the steps it will take as total_steps on the callback)."
)


def _planned_steps(trainer: pl.Trainer) -> int:
    # called in on_fit_start, not setup: it builds the training loader, which must come after a resumed run's
    # checkpoint restored its state (and a resumed run takes the span saved in its checkpoint)
    estimated = trainer.estimated_stepping_batches
    if not math.isfinite(estimated):
        raise ValueError(_UNKNOWN_LENGTH)
    return int(estimated)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"BudgetCallback: {message}")


def _check_choice(name: str, value: str, choices: Any) -> None:
    allowed = choices.__args__
    _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}.")
