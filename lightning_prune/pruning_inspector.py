"""PruningInspector: per-layer histograms of |θ|/s and a kept-share bar chart in TensorBoard, every n epochs."""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_prune.budget import hard_kept_counts, soft_kept_counts
from lightning_prune.reparametrize import MaskedParameter, masked_parameters


@dataclass
class LayerSnapshot:
    """What the inspector measured on one layer: kept shares, the threshold in use and a histogram of ``|θ|/s``.

    ``threshold`` is the mask's ``c`` while the mask is soft; once hardened it is the smallest ``|θ|/s`` that was
    kept (the effective cut of the finalisation). ``counts`` has ``len(edges) - 1`` entries.
    """

    name: str
    numel: int
    kept: int
    soft_share: float | None
    threshold: float
    hard: bool
    counts: np.ndarray
    edges: np.ndarray
    score_min: float
    score_max: float
    score_sum: float
    score_sum_squares: float

    @property
    def kept_share(self) -> float:
        return self.kept / self.numel


class PruningInspector(Callback):
    """Shows how the sub-network takes shape: per-layer ``|θ|/s`` histograms, thresholds and a kept-share chart.

    At the end of every ``every_n_epochs``-th training epoch (and once more at the end of fit if the masks were
    hardened after the last inspection) it writes, for every reparametrized layer:

    * ``inspect/threshold/<tensor>`` (scalar, through ``self.log``, so every Lightning logger gets it): the
      threshold ``c`` in normalised units, or the effective cut once the mask is hard;
    * ``inspect/score/<tensor>`` (TensorBoard histogram): the normalised magnitudes ``|θ|/s`` that are ranked against
      the threshold;
    * ``inspect/kept_share`` (TensorBoard image, one per inspection): a bar chart of each layer's kept share
      (hard mask, with the soft share as a tick while training) next to the ``|θ|/s`` distributions of all layers
      with the threshold drawn as a dashed line; the budget ``1 − sparsity`` of a
      :class:`~lightning_prune.BudgetCallback` is drawn on the bar chart.

    Histograms and images need a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (and matplotlib for the
    image); with another logger, or without matplotlib, the inspector warns once and skips them. Work is done on
    global rank 0 only, under ``torch.no_grad``; one figure is drawn per inspection and closed at once.

    A finalisation made in ``on_train_end`` (early stopping) is inspected too, in ``teardown``, wherever the
    inspector stands in the callback list.

    Args:
        every_n_epochs: inspect every this many training epochs (>= 1).
        histograms: write the ``inspect/score/<tensor>`` histograms (and the distribution panel of the figure).
        bar_chart: write the ``inspect/kept_share`` figure.
        bins: number of histogram bins, in [2, 10000].
        max_score: right edge of the histograms in units of ``|θ|/s`` (> 0); ``None`` uses the largest score.
            Scores above it fall in the last bin. A fixed value makes the histograms of successive epochs align.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import BudgetCallback
        >>> inspector = PruningInspector(every_n_epochs=5, bins=32)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[BudgetCallback(sparsity=0.9), inspector])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        histograms: bool = True,
        bar_chart: bool = True,
        bins: int = 64,
        max_score: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(
                f"PruningInspector: every_n_epochs must be an integer >= 1, got {every_n_epochs!r}. "
                "To switch the inspector off, leave it out of the callbacks."
            )
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 10_000:
            raise ValueError(f"PruningInspector: bins must be an integer in [2, 10000], got {bins!r}.")
        if max_score is not None and not (math.isfinite(max_score) and max_score > 0):
            raise ValueError(
                f"PruningInspector: max_score must be > 0 (in units of |θ|/s, the threshold is about 1) or None, "
                f"got {max_score!r}."
            )
        self.every_n_epochs = every_n_epochs
        self.histograms = bool(histograms)
        self.bar_chart = bool(bar_chart)
        self.bins = bins
        self.max_score = None if max_score is None else float(max_score)
        self._warned: set[str] = set()
        self._inspected_hard = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        snapshots = self._inspect(trainer, pl_module)
        if snapshots is None:
            return
        values = {f"inspect/threshold/{s.name}": s.threshold for s in snapshots}
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # in teardown, after every callback's on_train_end: a cut made there (early stopping) is inspected whatever
        # the order of the callbacks; the loggers are still open
        if stage == "fit":
            self._inspect_final(trainer, pl_module)
        self._drain()  # images still being drawn are written before the loggers close
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _inspect_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = masked_parameters(pl_module)
        if not self._inspected_hard and layers and all(bool(layer.mask.hard) for layer in layers):
            # the masks were hardened after the last inspection (early stopping, an epoch that was not inspected)
            snapshots = self._inspect(trainer, pl_module)
            if snapshots is not None and trainer.is_global_zero:
                values = {f"inspect/threshold/{s.name}": s.threshold for s in snapshots}
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drain()

    def state_dict(self) -> dict[str, Any]:
        return {"inspected_hard": self._inspected_hard}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._inspected_hard = bool(state_dict.get("inspected_hard", False))

    # -------------------------------------------------------------- internals
    @torch.no_grad()
    def _inspect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[LayerSnapshot] | None:
        layers = masked_parameters(pl_module)
        if not layers:
            self._warn_once(
                "layers",
                "PruningInspector: the module has no reparametrized layer, there is nothing to inspect. "
                "Add a BudgetCallback (before the inspector) or call lightning_prune.reparametrize(model).",
            )
            return None
        if not trainer.loggers:
            self._warn_once("logger", "PruningInspector: the Trainer has no logger, there is nothing to write to.")
            return None
        snapshots = layer_snapshots(layers, self.bins, self.max_score)
        self._inspected_hard = all(s.hard for s in snapshots)
        if trainer.is_global_zero and (self.histograms or self.bar_chart):
            writers = self._tensorboard_writers(trainer)
            if writers:
                self._write_tensorboard(writers, snapshots, trainer)
        return snapshots

    def _tensorboard_writers(self, trainer: pl.Trainer) -> list[Any]:
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not writers:
            names = ", ".join(type(logger).__name__ for logger in trainer.loggers)
            self._warn_once(
                "tensorboard",
                f"PruningInspector: histograms and images need a TensorBoardLogger, the Trainer has {names}; they "
                "are skipped (the inspect/threshold/... scalars are still logged). Add "
                "lightning.pytorch.loggers.TensorBoardLogger to the loggers to get them.",
            )
        return writers

    def _write_tensorboard(self, writers: list[Any], snapshots: list[LayerSnapshot], trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if self.histograms:
            for s in snapshots:
                for writer in writers:
                    writer.add_histogram_raw(
                        f"inspect/score/{s.name}",
                        min=s.score_min,
                        max=s.score_max,
                        num=s.numel,
                        sum=s.score_sum,
                        sum_squares=s.score_sum_squares,
                        bucket_limits=s.edges[1:],
                        bucket_counts=s.counts,
                        global_step=step,
                    )
        if self.bar_chart and self._matplotlib_available():
            # drawing the figure takes ~0.1-0.3 s: a worker thread does it (and writes the image) while training
            # goes on; on_train_end / teardown wait for it
            figure_args = self._figure_args(snapshots, trainer)
            self._submit(lambda: self._draw_and_write(writers, figure_args, step))

    def _matplotlib_available(self) -> bool:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self._warn_once(
                "matplotlib",
                "PruningInspector: the kept-share image needs matplotlib, which is not installed; it is skipped. "
                "Install it with `pip install matplotlib` (or `pip install lightning_prune[plot]`).",
            )
            return False
        return True

    def _figure_args(self, snapshots: list[LayerSnapshot], trainer: pl.Trainer) -> dict[str, Any]:
        from lightning_prune.budget_callback import BudgetCallback

        budget = next((cb for cb in trainer.callbacks if isinstance(cb, BudgetCallback)), None)
        kept = sum(s.kept for s in snapshots)
        total = sum(s.numel for s in snapshots)
        hard = all(s.hard for s in snapshots)
        state = "hard masks" if hard else "soft masks, hard share = |θ|/s > c"
        return {
            "names": [s.name for s in snapshots],
            "kept_shares": [s.kept_share for s in snapshots],
            "soft_shares": None if hard else [s.soft_share for s in snapshots],
            "budget": None if budget is None else 1.0 - budget.sparsity,
            "target": None if budget is None or budget.finalized else budget.target_keep,
            "title": f"epoch {trainer.current_epoch}, step {trainer.global_step}: kept {kept:,}/{total:,} = "
            f"{kept / max(total, 1):.2%} ({state})",
            "scores": snapshots if self.histograms else None,
        }

    @staticmethod
    def _draw_and_write(writers: list[Any], figure_args: dict[str, Any], step: int) -> None:
        image = figure_to_array(kept_share_figure(**figure_args))
        for writer in writers:
            writer.add_image("inspect/kept_share", image, step, dataformats="HWC")

    def _submit(self, job) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="PruningInspector")
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(self._executor.submit(job))

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            error = future.exception()
            if error is not None:
                self._warn_once("render", f"PruningInspector: drawing the kept-share image failed: {error!r}.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


@torch.no_grad()
def layer_snapshots(layers: list[MaskedParameter], bins: int = 64, max_score: float | None = None) -> list[LayerSnapshot]:
    """Measure every layer: kept counts, soft shares, threshold and a histogram of ``|θ|/s`` on shared bin edges.

    The histogram is computed where the weights live (``torch.histc``); only ``bins`` numbers per layer are copied
    to the host.

    Example:
        >>> import torch
        >>> from lightning_prune import reparametrize
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> _ = reparametrize(model)
        >>> [snapshot] = layer_snapshots(masked_parameters(model), bins=16)
        >>> int(snapshot.counts.sum()), snapshot.numel
        (64, 64)
    """
    scores = [layer.mask.score(layer.latent).float().flatten() for layer in layers]
    hi = max_score if max_score is not None else max(float(s.max()) for s in scores)
    hi = hi if hi > 0 else 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    counts = hard_kept_counts(layers)
    soft = [None] * len(layers)
    if not all(bool(layer.mask.hard) for layer in layers):
        soft = [k / n for k, n in soft_kept_counts(layers).values()]
    snapshots = []
    for layer, score, soft_share in zip(layers, scores, soft):
        hard = bool(layer.mask.hard)
        if hard:
            kept_scores = score[layer.mask.kept.flatten()]
            threshold = float(kept_scores.min()) if kept_scores.numel() else float(score.max())
        else:
            threshold = float(layer.mask.threshold)
        # histc ignores values outside [min, max]: clamp so that the counts always sum to numel
        hist = torch.histc(score.clamp(max=hi), bins=bins, min=0.0, max=hi).cpu().numpy()
        snapshots.append(
            LayerSnapshot(
                name=layer.name,
                numel=layer.numel,
                kept=counts[layer.name][0],
                soft_share=soft_share,
                threshold=threshold,
                hard=hard,
                counts=hist.astype(np.float64),
                edges=edges,
                score_min=float(score.min()),
                score_max=float(score.max()),
                score_sum=float(score.sum()),
                score_sum_squares=float(score.square().sum()),
            )
        )
    return snapshots


def kept_share_figure(
    names: list[str],
    kept_shares: list[float],
    soft_shares: list[float | None] | None = None,
    budget: float | None = None,
    target: float | None = None,
    title: str = "",
    scores: list[LayerSnapshot] | None = None,
):
    """A matplotlib figure (Agg, no pyplot state) with one horizontal bar per layer: its kept share.

    Args:
        names: layer names, top to bottom.
        kept_shares: kept share of each layer, in [0, 1].
        soft_shares: soft kept share of each layer, drawn as a tick on its bar (``None`` entries are skipped).
        budget: the budget's keep share ``1 − sparsity``, drawn as a dashed vertical line.
        target: the current target keep share of the schedule, drawn as a dotted line.
        title: figure title.
        scores: layer snapshots; when given a second panel shows each layer's ``|θ|/s`` distribution with its
            threshold as a dashed line.

    Example:
        >>> figure = kept_share_figure(["conv", "fc"], [0.3, 0.05], budget=0.1)
        >>> figure_to_array(figure).shape[2]
        3
    """
    from matplotlib.figure import Figure

    n = len(names)
    width, height = (11.0 if scores else 6.5), min(2.0 + 0.28 * n, 12.0)
    figure = Figure(figsize=(width, height), dpi=80)
    # a fixed layout (about 4 points per character of the longest name): constrained layout costs more to draw
    left = min(0.45, (0.15 + 0.055 * max((len(name) for name in names), default=1)) / width)
    figure.subplots_adjust(left=left, right=0.98, bottom=0.6 / height, top=1 - 0.45 / height, wspace=0.3)
    axes = figure.subplots(1, 2 if scores else 1, squeeze=False)[0]
    ax = axes[0]
    rows = np.arange(n)
    ax.barh(rows, kept_shares, color="tab:blue", label="kept")
    if soft_shares is not None and any(s is not None for s in soft_shares):
        soft_rows = [i for i, s in enumerate(soft_shares) if s is not None]
        ax.scatter([soft_shares[i] for i in soft_rows], soft_rows, marker="|", s=120, color="black", label="soft")
    for i, share in enumerate(kept_shares):
        right = max(share, (soft_shares[i] or 0.0) if soft_shares is not None else 0.0)
        ax.text(min(right, 1.0) + 0.015, i, f"{share:.1%}", va="center", fontsize=7)
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget:.1%}")
    if target is not None and (budget is None or abs(target - budget) > 1e-9):
        ax.axvline(target, color="tab:orange", linestyle=":", linewidth=1, label=f"target now {target:.1%}")
    ax.set_yticks(rows, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.12)
    ax.set_xlabel("kept share")
    ax.legend(fontsize=7, loc="lower right")
    if scores:
        dist = axes[1]
        colors = [f"C{i % 10}" for i in range(len(scores))]
        for s, color in zip(scores, colors):
            dist.stairs(s.counts / max(s.numel, 1), s.edges, color=color, label=s.name if n <= 12 else None)
        thresholds = [s.threshold for s in scores]
        if max(thresholds) - min(thresholds) <= 1e-6 * max(abs(max(thresholds)), 1.0):
            dist.axvline(thresholds[0], color="black", linestyle="--", linewidth=1)
        else:  # per-layer cuts (hard masks, floors): one dashed line per layer, in its colour
            for c, color in zip(thresholds, colors):
                dist.axvline(c, color=color, linestyle="--", linewidth=0.8)
        dist.set_yscale("log")
        dist.set_xlabel("|θ|/s (dashed: threshold)")
        dist.set_ylabel("share of the layer's weights")
        if n <= 12:
            dist.legend(fontsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def figure_to_array(figure) -> np.ndarray:
    """Render a matplotlib figure with the Agg backend into an ``(H, W, 3)`` uint8 array, and free it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    figure.clear()
    return image
