"""BudgetCallback: prunes any LightningModule while it trains, to an exact budget, with no fine-tuning."""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.trainer.call import _call_configure_model
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_prune.batchnorm_gate import clear_removed_channels, is_channel_mask
from lightning_prune.budget import (
    BudgetMode,
    check_sparsity,
    hard_kept_counts,
    layer_floor,
    rounded_budget,
    soft_kept_counts,
)
from lightning_prune.budget_controller import BudgetController
from lightning_prune.budget_loop import BudgetLoop, LoopSettings
from lightning_prune.channel_groups import Structure, channel_groups, example_input, reparametrize_channels
from lightning_prune.checkpoint_format import accept_masked_twins, loads_plain_layout, to_plain_checkpoint
from lightning_prune.cut_report import CutReport
from lightning_prune.finalization import finalize
from lightning_prune.module_passes import has_batchnorm, recalibrate_batchnorm, validation_metrics
from lightning_prune.non_finite import FiniteWatch, check_latents_finite
from lightning_prune.reparametrize import (
    MaskedParameter,
    coverage,
    detach_recurrent_weights,
    masked_parameters,
    prunable_parameters,
    reparametrize,
)
from lightning_prune.run_length import check_known_length, planned_manual_steps, planned_steps
from lightning_prune.schedules import TargetSchedule, target_keep_at, temperature_at
from lightning_prune.trained_parameters import trained_parameter_ids
from lightning_prune.weight_recompute import recompute_masked_weights

#: Share of each tensor kept at least, unless the budget is too small for it (see ``min_layer_keep``).
DEFAULT_MIN_LAYER_KEEP = 0.01
#: Kept share just before the cut, relative to the budget, beyond which the cut gets a warning.
CUT_TOLERANCE = 0.1


class BudgetCallback(Callback):
    """Budget-aware pruning during training, for any LightningModule.

    At ``setup`` it reparametrizes the module's weight matrices (see :mod:`lightning_prune.reparametrize` for the
    rule; layers built in ``configure_model`` included), before the optimizers are built. During training the target
    keep share moves from 1 to ``1 − sparsity`` by ``target_end`` of the run while the gate's temperature falls;
    after ``target_end`` the gate is the step function, so the network trains on with the mask it will keep. Before
    each optimizer step a closed loop (:class:`~lightning_prune.budget_loop.BudgetLoop`) sizes the budget step from
    how far the weights are from the target, whatever the optimizer and learning rate. When fit ends the masks become
    hard and keep exactly ``budget_count(N, sparsity)`` weights, BatchNorm statistics are re-estimated, and the
    module's own validation metrics before and after the cut go into :attr:`report` (a
    :class:`~lightning_prune.CutReport`).

    Checkpoints hold plain weights under the network's own names (:mod:`~lightning_prune.checkpoint_format`).

    Logged (``prune/...``): ``lambda``, ``temperature``, ``target_keep``, ``kept_hard``, ``kept_soft``,
    ``kept/<tensor>``, and at the cut ``kept_hard_before``, ``kept_final`` and the validation metrics.

    Args:
        sparsity: share of the covered weights removed at the end, in [0, 1).
        target_end: share of training at which the target reaches the budget, in (0, 1].
        target_schedule: how the target keep share moves from 1 to the budget (``"cubic"``: fast first).
        mode: ``"global"`` (one budget over all tensors) or ``"layer"`` (each tensor meets the share on its own).
        min_layer_keep: share of each tensor always kept; default 1%, capped at half the keep share.
        include: patterns of the tensors to prune (globs or ``re:`` regexes, on tensor or module names).
        exclude: patterns of tensors to leave dense.
        embeddings: also prune embedding tables.
        total_steps: optimizer steps the schedules span; default the steps the Trainer will take
            (``estimated_stepping_batches``; under manual optimization, measured in the first epoch).
        recalibrate_batchnorm: re-estimate BatchNorm statistics at the cut and, while pruning, before each
            end-of-epoch validation.
        measure_cut: run the module's ``validation_step`` before and after the cut and report what it logs.
        check_finite: stop with :class:`~lightning_prune.NonFiniteError` on a non-finite loss or latent weight.
        loop: the closed loop's settings (:class:`~lightning_prune.LoopSettings`); the defaults are measured.
        structure: ``"weights"`` (the paper: any weight can go) or ``"channels"`` (whole BatchNorm channels go, with
            the rows and columns of the layers around them; :func:`~lightning_prune.remove_channels` then builds the
            smaller network). The budget then counts channels; ``include``/``exclude`` match BatchNorm layer names.
        residual_streams: with ``structure="channels"``, also remove channels of residual streams (a channel goes
            from every layer that adds into it). Off by default: on ResNet18 at half the MACs, keeping the streams
            whole loses less accuracy; beyond about 55% of the MACs removed a ResNet needs them (docs/channels.md).
        round_to: with ``structure="channels"``, each layer keeps a multiple of this many channels (8 or 16: the
            widths the convolution kernels compute in; an odd width runs about as slowly as the next multiple), and
            the budget is exact in those units (:func:`~lightning_prune.budget.rounded_budget`).
        recompute_masked_weights: compute each masked weight again in the backward pass instead of keeping it from
            the forward pass (:mod:`~lightning_prune.weight_recompute`): one weight-sized tensor less per layer
            during a step, one more pass over the weights.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[BudgetCallback(sparsity=0.9)])
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        target_end: float = 0.6,
        target_schedule: TargetSchedule = "cubic",
        mode: BudgetMode = "global",
        min_layer_keep: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        embeddings: bool = False,
        total_steps: int | None = None,
        recalibrate_batchnorm: bool = True,
        measure_cut: bool = True,
        check_finite: bool = True,
        loop: LoopSettings | None = None,
        structure: Structure = "weights",
        residual_streams: bool = False,
        recompute_masked_weights: bool = False,
        round_to: int = 1,
    ) -> None:
        super().__init__()
        check_sparsity(sparsity)
        loop = LoopSettings() if loop is None else loop
        _check(isinstance(loop, LoopSettings), f"loop takes a LoopSettings, got {type(loop).__name__}.")
        _check(isinstance(recompute_masked_weights, bool),
               f"recompute_masked_weights takes True or False, got {recompute_masked_weights!r}.")
        _check_choice("target_schedule", target_schedule, TargetSchedule)
        _check_choice("mode", mode, BudgetMode)
        _check_choice("structure", structure, Structure)
        _check(isinstance(residual_streams, bool), f"residual_streams takes True or False, got {residual_streams!r}.")
        _check(not residual_streams or structure == "channels",
               "residual_streams=True removes channels of residual streams: it needs structure='channels'.")
        _check(isinstance(round_to, int) and not isinstance(round_to, bool) and round_to >= 1,
               f"round_to takes a whole number of channels >= 1 (8 or 16), got {round_to!r}.")
        _check(round_to == 1 or (structure == "channels" and mode == "global"),
               f"round_to={round_to} rounds channel counts: it needs structure='channels' and mode='global'.")
        _check(
            0 < target_end <= 1 and loop.target_start <= target_end,
            f"target_end is the share of training at which the target reaches the budget, in (0, 1] and >= "
            f"loop.target_start ({loop.target_start}); got {target_end}.",
        )
        if min_layer_keep is None:
            min_layer_keep = min(DEFAULT_MIN_LAYER_KEEP, (1.0 - sparsity) / 2)
        _check(0 <= min_layer_keep <= 1, f"min_layer_keep is a share in [0, 1], got {min_layer_keep}.")
        _check(total_steps is None or total_steps > 0, f"total_steps must be > 0, got {total_steps}.")
        for arg, value in (("include", include), ("exclude", exclude)):
            _check(not isinstance(value, str), f"`{arg}` takes a list of patterns: write [{value!r}].")
        self.sparsity = float(sparsity)
        self.keep = 1.0 - self.sparsity
        self.target_end = float(target_end)
        self.target_schedule = target_schedule
        self.mode = mode
        self.min_layer_keep = float(min_layer_keep)
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.embeddings = bool(embeddings)
        self.total_steps = total_steps
        self.recalibrate_batchnorm = recalibrate_batchnorm
        self.measure_cut = measure_cut
        self.check_finite = check_finite
        self.loop = loop
        self.structure = structure
        self.residual_streams = residual_streams
        self.round_to = round_to
        self.recompute_masked_weights = recompute_masked_weights
        self._recompute_handles: list[RemovableHandle] = []
        self.budget_loop = BudgetLoop(loop, mode, self.min_layer_keep, self.keep)
        self.finalized = False
        self.step = 0
        self.target_keep = 1.0
        self.temperature = loop.temperature_start
        self.report = CutReport()
        self._finite = FiniteWatch()
        self._total: int | None = None
        self._params: list[MaskedParameter] = []
        self._measure_from: tuple[int, int] | None = None  # (global step, batches) where the step count is measured

    @property
    def controller(self) -> BudgetController:
        return self.budget_loop.controller  # its state is saved in checkpoints

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loads_plain_layout(pl_module)  # a checkpoint of a pruned run loads, with its masks
        if stage != "fit" or masked_parameters(pl_module):
            if stage == "fit" and (self.include or self.exclude):
                rank_zero_warn("BudgetCallback: the module is already reparametrized; include/exclude are ignored.")
            if stage == "fit":
                _note_renamed_weights(pl_module)
            self._attach_state(pl_module)
            self._refresh_swa_copies(trainer, pl_module)
            return
        if is_overridden("configure_model", pl_module):  # layers built there exist only after it (it is idempotent)
            _call_configure_model(trainer)
        # everything is checked before the module is changed: a refused fit leaves it as it was
        if self.structure == "channels":
            groups = channel_groups(pl_module, example_input(trainer, pl_module), self.include, self.exclude,
                                    self.residual_streams)
            _check(bool(groups.removable), f"structure='channels' found no channel to prune: {groups.summary()}.")
            sizes = list(groups.removable.values())
        else:
            chosen = prunable_parameters(pl_module, self.include, self.exclude, self.embeddings)
            untrained = _untrained(trainer, pl_module, chosen)
            chosen = {name: owner for name, owner in chosen.items() if name not in untrained}
            sizes = [module.get_parameter(name).numel() for module, name in chosen.values()]
        floors = sum(layer_floor(n, self.min_layer_keep, self.round_to) for n in sizes)
        allowed = rounded_budget(sum(sizes), self.sparsity, self.round_to)
        if floors > allowed:
            raise ValueError(
                f"BudgetCallback: min_layer_keep={self.min_layer_keep} (round_to={self.round_to}) keeps {floors} "
                f"{self.structure} but sparsity={self.sparsity} allows {allowed} of {sum(sizes)}: lower "
                "min_layer_keep or the sparsity."
            )
        if self.total_steps is None:
            check_known_length(trainer)
        temperatures = {"temperature": self.loop.temperature_start, "grad_temperature": self.loop.grad_temperature}
        if self.structure == "channels":
            reparametrize_channels(pl_module, list(groups.removable), joined=groups.joined, **temperatures)
        else:
            exclude = [*(self.exclude or []), *("re:" + re.escape(name) for name in untrained)]
            reparametrize(pl_module, self.include, exclude, self.embeddings, **temperatures)
            accept_masked_twins(pl_module, prunable_parameters(pl_module, embeddings=self.embeddings))
        _note_renamed_weights(pl_module)
        self._attach_state(pl_module)
        self._refresh_swa_copies(trainer, pl_module)
        if self.structure == "channels":
            self.report.coverage = groups.summary()
            rank_zero_info(f"BudgetCallback: {groups.summary()}.")
            return
        covered = coverage(pl_module, self.embeddings, {name: UNTRAINED for name in untrained})
        self.report.coverage = covered.summary()
        rank_zero_info(f"BudgetCallback: {covered.summary()}.")
        if covered.share_of_trained_matrix_weights < 0.5:
            rank_zero_warn(
                f"BudgetCallback: {covered.summary()}. sparsity={self.sparsity} applies to the covered tensors only; "
                "add the others with `include` patterns (or embeddings=True for embedding tables)."
            )

    def _attach_state(self, pl_module: pl.LightningModule) -> None:
        self._params = masked_parameters(pl_module)
        self.budget_loop.attach(self._params)

    @staticmethod
    def _refresh_swa_copies(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A StochasticWeightAveraging listed before this callback copied the module before its masks: copy again."""
        for cb in trainer.callbacks:
            average = getattr(cb, "_average_model", None)
            if isinstance(cb, StochasticWeightAveraging) and average is not None and not masked_parameters(average):
                detach_recurrent_weights(pl_module)
                cb._average_model = copy.deepcopy(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach_state(pl_module)  # after a strategy wrapped the module, or a checkpoint restored the scales
        if not self._params:
            raise ValueError(
                "BudgetCallback: the module has no masked tensor at fit start: its layers were replaced after set-up "
                "(a configure_model that builds them anew on each call; make it return early when they exist)."
            )
        self._finite.start(self._params, trainer)
        if self.recompute_masked_weights:  # adds no second set of hooks
            self._recompute_handles += recompute_masked_weights(pl_module)
        if self.total_steps is not None:
            self._total = self.total_steps
        elif self._total is None:
            self._total = planned_steps(trainer)
            swa = _averaging(trainer)
            ran = getattr(swa, "_max_epochs", None)  # set (and max_epochs raised) by its on_fit_start
            capped = trainer.max_steps > 0 and self._total == trainer.max_steps
            if swa is not None and ran and trainer.max_epochs == ran + 1 and not capped:
                # it added its BatchNorm epoch (listed before this callback): plan over the epochs that train
                self._total = round(self._total * ran / trainer.max_epochs)
            if not pl_module.automatic_optimization:
                self._measure_from = (trainer.global_step, 0)
        hard = [bool(p.mask.hard) for p in self._params]
        self.finalized = all(hard)
        budget = rounded_budget(sum(p.numel for p in self._params), self.sparsity, self.round_to)
        if self.finalized and abs(sum(int(p.mask.kept.sum()) for p in self._params) - budget) >= self.round_to:
            self._reopen(pl_module)
        self.budget_loop.set_ramp((self.target_end - self.loop.target_start) * self._total)
        self._apply_schedules(trainer.global_step)

    def _reopen(self, pl_module: pl.LightningModule) -> None:
        """The module was cut to another budget: the removed weights start from 0 and the loop goes on to this one."""
        rank_zero_info(f"BudgetCallback: the module was pruned to another budget; pruning on to sparsity={self.sparsity}.")
        with torch.no_grad():
            for p in self._params:
                p.latent.mul_(p.mask.kept)
                if is_channel_mask(p.module, p.param_name):  # the channel's shift and joined layers go with it
                    clear_removed_channels(pl_module, p.module, p.mask.kept)
                p.mask.reopen()
        self.finalized = False
        self.report = CutReport(coverage=self.report.coverage)

    # ---------------------------------------------------------- per step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self.finalized:
            self._apply_schedules(trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.check_finite:
            self._finite.loss(trainer, loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # not in StochasticWeightAveraging's BatchNorm epoch, which runs its average without gradients
        if not self.finalized and not getattr(getattr(trainer, "fit_loop", None), "_skip_backward", False):
            self.budget_loop.step(optimizer, trainer.global_step, self.target_keep)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        logs = trainer.global_step % max(1, trainer.log_every_n_steps) == 0
        if self.check_finite:
            self._finite.latents(trainer, self._params, "Training stopped before any checkpoint of this step was written.")
            if logs:
                self._finite.read(trainer, self._params)
        if self._measure_from is not None:
            self._measure_steps_per_batch(trainer)
        if self.finalized:
            return
        if logs:
            self._log_state(pl_module)
        if self.loop.finalize_on_fit_end and self._total is not None and trainer.global_step >= self._total:
            if _averaging(trainer) is None:  # with StochasticWeightAveraging the cut waits for its average
                self._finalize(trainer, pl_module)

    def _measure_steps_per_batch(self, trainer: pl.Trainer) -> None:
        start_step, batches = self._measure_from
        self._measure_from = (start_step, batches + 1) if batches + 1 < trainer.num_training_batches else None
        planned = planned_manual_steps(trainer, trainer.global_step - start_step, batches + 1)
        if planned is not None:
            self._total = planned
            self.budget_loop.set_ramp((self.target_end - self.loop.target_start) * self._total)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_recomputing()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_recomputing()  # a fit that raises gets no teardown

    def _stop_recomputing(self) -> None:
        for handle in self._recompute_handles:  # the module is left as set-up made it
            handle.remove()
        self._recompute_handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_finite:
            self._finite.read(trainer, self._params)  # nothing non-finite is cut, or saved as the last checkpoint
        if not self.loop.finalize_on_fit_end:
            return
        if not self.finalized:  # SWA's average, or a fit stopped early (EarlyStopping, max_time, should_stop)
            _take_average(trainer, pl_module)
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
        elif self._recalibrates_before(trainer, pl_module):
            # while pruning, a channel whose weights leave or come back has running statistics of another network:
            # re-estimate them, so the epoch's validation (EarlyStopping, ModelCheckpoint) sees the network it runs
            recalibrate_batchnorm(trainer, pl_module, self.loop.recalibration_batches)

    def _recalibrates_before(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        # at the end of an epoch only: a second pass over the training loader mid-epoch would reset its iterator
        return (self.recalibrate_batchnorm and not self.finalized and not trainer.sanity_checking
                and trainer.state.fn == TrainerFn.FITTING and bool(getattr(trainer, "is_last_batch", False))
                and has_batchnorm(pl_module))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._harden_soft_checkpoint(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._harden_soft_checkpoint(trainer, pl_module)

    def _harden_soft_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = masked_parameters(pl_module)
        if not self.loop.finalize_on_fit_end or not params or all(bool(p.mask.hard) for p in params):
            return
        result = finalize(params, self.sparsity, self.min_layer_keep, self.mode, self.round_to)
        rank_zero_warn(
            f"BudgetCallback: the weights under {trainer.state.fn.value} come from before the cut (a checkpoint such "
            f"as ckpt_path='best' saved with soft masks). They were hardened now to the budget ({result.kept}/"
            f"{result.total} {self.structure} kept), without BatchNorm recalibration, so the figures are not those of the "
            "network the fit finalised: test ckpt_path='last' or the module itself for those."
        )

    # ------------------------------------------------------------- state
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        # before anything is written: a NaN that appeared after the per-step check must not overwrite a good file
        if self.check_finite:
            self._finite.read(trainer, self._params)
            check_latents_finite(trainer, self._params, "The checkpoint of this step was not written.")
        to_plain_checkpoint(checkpoint, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_steps": self._total,
            "finalized": self.finalized,
            "sparsity": self.sparsity,
            "controller": self.controller.state_dict(),
            "report": self.report.to_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sparsity", self.sparsity) != self.sparsity:
            rank_zero_warn(
                f"Resuming a run trained for sparsity={state_dict['sparsity']} with sparsity={self.sparsity}: "
                "the target share jumps."
            )
        self._total = state_dict["total_steps"] if self.total_steps is None else self.total_steps
        self._measure_from = None
        self.finalized = state_dict["finalized"]
        self.controller.load_state_dict(state_dict.get("controller", {}))
        self.report = CutReport.from_dict(state_dict.get("report", {}))

    # ------------------------------------------------------------ internals
    def progress(self, step: int) -> float:
        """Share of the scheduled training done after ``step`` optimizer steps."""
        return min(1.0, step / self._total) if self._total else 0.0

    def _apply_schedules(self, step: int) -> None:
        p = self.progress(step)
        self.step = step
        loop = self.loop
        self.target_keep = target_keep_at(p, self.keep, self.target_schedule, loop.target_start, self.target_end)
        self.temperature = temperature_at(p, loop.temperature_start, loop.temperature_end, self.target_end)
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
        latest = self.budget_loop.latest_lambda
        values = {
            "prune/lambda": 0.0 if latest is None else float(latest.max()),
            "prune/temperature": self.temperature,
            "prune/target_keep": self.target_keep,
            "prune/kept_soft": soft,
            "prune/kept_hard": hard,
        }
        values.update({f"prune/kept/{name}": k / n for name, (k, n) in counts.items()})
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    @torch.no_grad()
    def _finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_finite:
            self._finite.read(trainer, self._params)
        step = trainer.global_step
        self._apply_schedules(step)
        soft, hard, _ = self._shares()
        batchnorm = self.recalibrate_batchnorm and has_batchnorm(pl_module)
        if batchnorm and self.measure_cut:  # "before" describes the network as it trains, with its own statistics
            recalibrate_batchnorm(trainer, pl_module, self.loop.recalibration_batches)
        before = validation_metrics(trainer, pl_module) if self.measure_cut else {}
        result = finalize(self._params, self.sparsity, self.min_layer_keep, self.mode, self.round_to)
        self.finalized = True
        after = validation_metrics(trainer, pl_module) if self.measure_cut else {}
        recalibrated = {}
        if batchnorm:
            if recalibrate_batchnorm(trainer, pl_module, self.loop.recalibration_batches) and self.measure_cut:
                recalibrated = validation_metrics(trainer, pl_module)
        self.report = CutReport(
            coverage=self.report.coverage,
            step=step,
            planned_steps=self._total,
            kept=result.kept,
            total=result.total,
            kept_soft_before=soft,
            kept_hard_before=hard,
            val_before_cut=before,
            val_after_cut=after,
            val_after_recalibration=recalibrated,
            per_tensor=dict(result.per_layer),
        )
        if trainer.logger is not None:
            values = {"prune/kept_final": result.kept_share, "prune/kept_hard_before": hard}
            for prefix, metrics in (("before_cut", before), ("after_cut", after), ("after_bn", recalibrated)):
                values.update({f"prune/{prefix}/{name}": v for name, v in metrics.items()})
            trainer.logger.log_metrics(values, step=step)
        msg = (
            f"Pruning finalised at step {step}: kept {result.kept}/{result.total} {self.structure} ({result.kept_share:.4%}); "
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
                f"BudgetCallback: just before the cut {hard:.2%} of the covered {self.structure} were in use against a budget "
                f"of {result.kept_share:.2%}, so the cut changed the network the fit trained (see the metrics "
                f"above). Fit ended at step {step} of the {self._total} planned; the target reaches the budget at "
                f"step {ramp_end}. Let the run reach its planned length (max_epochs / max_time / EarlyStopping "
                "patience), or set total_steps to the steps it will really take."
            )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"BudgetCallback: {message}")


def _check_choice(name: str, value: str, choices: Any) -> None:
    allowed = choices.__args__
    _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}.")


def _averaging(trainer: pl.Trainer) -> StochasticWeightAveraging | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, StochasticWeightAveraging)), None)


def _take_average(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Put StochasticWeightAveraging's average into the module before the cut, when its own ``on_train_end`` will
    (so the cut acts on the network the fit ends with, whichever of the two callbacks comes first; its transfer after
    this one copies the same weights). Its rule: not after its BatchNorm epoch (it did so at that epoch's start)."""
    swa = _averaging(trainer)
    if swa is None or swa._average_model is None:
        return
    max_epochs, epoch = getattr(swa, "_max_epochs", None), trainer.current_epoch - 1
    if swa._model_contains_batch_norm and max_epochs != -1 and epoch == swa.swa_end + 1:
        return
    if epoch == swa.swa_end or max_epochs == -1:
        swa.transfer_weights(swa._average_model, pl_module)


#: Why a weight that no optimizer trains is left out of the budget (a DQN's target network, a teacher, an EMA copy).
UNTRAINED = "no optimizer trains it"


def _untrained(trainer: pl.Trainer, pl_module: pl.LightningModule, chosen: dict[str, Any]) -> list[str]:
    """The chosen tensors that no optimizer of ``configure_optimizers`` trains (none when it cannot say, or when it
    trains none of them: then they are all the user's)."""
    trained = trained_parameter_ids(trainer, pl_module)
    if trained is None:
        return []
    left = [name for name, (module, param) in chosen.items() if id(module.get_parameter(param)) not in trained]
    return left if len(left) < len(chosen) else []


RENAMED_NOTE = (
    "lightning_prune: BudgetCallback reparametrized the module's weights before configure_optimizers, so "
    "named_parameters() lists each pruned weight as '<module>.parametrizations.weight.original' (still the same "
    "nn.Parameter). Code that sorts parameters by name can call lightning_prune.plain_named_parameters(self) instead: "
    "it gives the plain names ('<module>.weight')."
)


def _note_renamed_weights(pl_module: pl.LightningModule) -> None:
    """Until Lightning has called it, an exception from the module's ``configure_optimizers`` carries a note naming
    the renaming and :func:`~lightning_prune.plain_named_parameters` (minGPT's name-based decay groups assert)."""
    original = pl_module.configure_optimizers

    def configure_optimizers(*args: Any, **kwargs: Any) -> Any:
        pl_module.__dict__.pop("configure_optimizers", None)  # once: the module's own method from now on
        try:
            return original(*args, **kwargs)
        except Exception as error:
            if masked_parameters(pl_module):
                if hasattr(error, "add_note"):
                    error.add_note(RENAMED_NOTE)
                else:  # Python < 3.11
                    rank_zero_warn(RENAMED_NOTE)
            raise

    pl_module.configure_optimizers = configure_optimizers
