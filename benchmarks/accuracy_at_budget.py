"""Accuracy at a budget: lightning_prune against Lightning's ModelPruning, per-step gradual magnitude pruning (GMP)
and one-shot magnitude pruning.

Same backbone, data, epochs, optimizer (``--recipe``: Adam, lr 1e-3 by default) and seed for every method:

* ``dense``: no pruning;
* ``lightning_prune``: ``PrunedClassifier`` + ``BudgetCallback(sparsity=s)`` with its defaults (finalised, hard masks,
  no fine-tuning after the cut); ``--min-layer-keep`` overrides its per-layer floor share, and the share used (the
  default is 1%, capped at half the keep share: 0.5% at ``s = 0.99``) is in each row's ``min_layer_keep``;
* ``modelpruning``: ``lightning.pytorch.callbacks.ModelPruning("l1_unstructured", use_global_unstructured=True,
  make_pruning_permanent=True, use_lottery_ticket_hypothesis=False)`` on the same Conv/Linear weights, pruning at the
  end of each epoch along the same cubic schedule as ours (sparsity ``s·(1 − (1 − r)³)``, ``r`` reaching 1 where
  ours does, at ``BudgetCallback``'s ``target_end``: 60% of training). torch's global pruning removes a share of the
  weights *still unpruned*, so the amount passed at epoch ``e`` is the increment ``1 − (1 − s_e)/(1 − s_{e−1})`` that brings the cumulative sparsity to ``s_e``;
* ``gmp``: per-step gradual magnitude pruning (Zhu & Gupta 2017, ``GradualMagnitudePruning`` in
  ``gradual_magnitude_pruning.py``) on the same Conv/Linear weights and the same cubic schedule, counted in optimizer
  steps: every Δt steps (``--gmp-every``; default 1.5% of the ramp's steps, at least 1) one global magnitude threshold
  sets the masks to ``s·(1 − (1 − r)³)``, ``r`` reaching 1 at 60% of training, where the last pruning step keeps
  exactly ``budget_count(N, s)`` weights; masked weights are zero in every forward pass (gradients masked before
  each optimizer step, weights after it), and training goes on with fixed masks to the end;
* ``oneshot``: the trained ``dense`` network pruned once by global magnitude (``prune.global_unstructured``,
  L1) to ``s``, with no fine-tuning.

For each method and sparsity: test accuracy (mean ± sample std over the seeds) and the achieved sparsity (zeros in
the effective Conv/Linear weights after training). The seed sets the initialisation, the data split and the order.

Default data: the offline scikit-learn digits (``DigitsDataModule(image_size=16)``) with
``Conv4(num_classes=10, in_channels=1, input_size=16)``. ``--cifar10-dir DIR`` runs CIFAR10 (Conv4 at 32x32) when
the files are there.

Usage::

    python benchmarks/accuracy_at_budget.py --threads 2 --seeds 0 1 2 --epochs 20 --csv accuracy.csv

    # benchmarks/results/accuracy_at_budget_digits_gmp.*: GMP against lightning_prune, six seeds, one thread:
    python benchmarks/accuracy_at_budget.py --threads 1 --seeds 0 1 2 3 4 5 --epochs 20 \
        --sparsities 0.9 0.95 0.98 0.99 --methods gmp lightning_prune \
        --csv benchmarks/results/accuracy_at_budget_digits_gmp.csv \
        --json benchmarks/results/accuracy_at_budget_digits_gmp.json

    # what benchmarks/results/accuracy_at_budget_digits.* come from (36 runs of about 20 s on a 2-core CPU):
    python benchmarks/accuracy_at_budget.py --threads 2 --seeds 0 1 2 --epochs 20 --sparsities 0.9 0.95 0.98 0.99 \
        --methods dense oneshot lightning_prune modelpruning \
        --csv benchmarks/results/accuracy_at_budget_digits.csv --json benchmarks/results/accuracy_at_budget_digits.json

    # benchmarks/results/accuracy_at_budget_cifar10_10k.*: real CIFAR-10 images, 10,000-image training subset (1,000 of
    # which validate) and 2,000 test images, the paper config's SGD recipe, 8 epochs, one seed (about 4 minutes a run):
    ../shared/tools/cifar10-from-jpeg data/cifar10-real --train-per-class 1000 --test-per-class 200
    python benchmarks/accuracy_at_budget.py --threads 2 --seeds 0 --epochs 8 --sparsities 0.9 0.98 \
        --methods dense lightning_prune modelpruning --cifar10-dir data/cifar10-real --val-size 1000 \
        --num-workers 1 --batch-size 128 --recipe sgd-cosine --lr 0.01 \
        --csv benchmarks/results/accuracy_at_budget_cifar10_10k.csv \
        --json benchmarks/results/accuracy_at_budget_cifar10_10k.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import lightning.pytorch as pl
import torch
from gradual_magnitude_pruning import PRUNABLE, GradualMagnitudePruning
from lightning.pytorch.callbacks import ModelPruning
from result_files import write_csv, write_json
from torch import nn
from torch.nn.utils import prune

import lightning_prune
from lightning_prune import BudgetCallback, LoopSettings, PrunedClassifier
from lightning_prune.backbones import Conv4
from lightning_prune.data import DigitsDataModule

SPARSITIES = (0.9, 0.95, 0.98, 0.99)
METHODS = ("dense", "lightning_prune", "modelpruning", "gmp", "oneshot")


@dataclass
class Run:
    method: str
    target_sparsity: float
    seed: int
    test_acc: float
    achieved_sparsity: float
    seconds: float
    min_layer_keep: float = 0.0  # lightning_prune's per-layer floor share; the baselines have none
    kept_before_cut: float | None = None  # lightning_prune: share of weights in use just before the exact cut


@dataclass
class Summary:
    method: str
    target_sparsity: float
    runs: int
    acc_mean: float
    acc_std: float
    sparsity_mean: float
    acc_ratio_to_dense: float


# ------------------------------------------------------------------ schedule of the ModelPruning baseline
#: Where the gradual schedules end, as a share of training: BudgetCallback's default, so both methods prune alike.
TARGET_END = BudgetCallback().target_end


def cumulative_sparsity(epoch: int, sparsity: float, epochs: int, end: float = TARGET_END) -> float:
    """Sparsity after the pruning at the end of ``epoch`` (0-based): the cubic ramp of BudgetCallback's target."""
    r = min(1.0, (epoch + 1) / max(1e-9, end * epochs))
    return sparsity * (1.0 - (1.0 - r) ** 3)


class GradualAmount:
    """``amount(epoch)`` for ModelPruning: the share of the still-unpruned weights to remove at that epoch."""

    def __init__(self, sparsity: float, epochs: int, end: float = TARGET_END) -> None:
        self.sparsity, self.epochs, self.end = sparsity, epochs, end

    def __call__(self, epoch: int) -> float:
        before = cumulative_sparsity(epoch - 1, self.sparsity, self.epochs, self.end) if epoch > 0 else 0.0
        after = cumulative_sparsity(epoch, self.sparsity, self.epochs, self.end)
        if after <= before:
            return 0.0
        return 1.0 - (1.0 - after) / (1.0 - before)


# ------------------------------------------------------------------ helpers
def prunable_params(backbone: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in backbone.modules() if isinstance(m, PRUNABLE)]


@torch.no_grad()
def achieved_sparsity(backbone: nn.Module) -> float:
    """Share of zeros in the effective weights of the Conv/Linear layers."""
    zeros = total = 0
    for module, name in prunable_params(backbone):
        weight = getattr(module, name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total


@torch.no_grad()
def test_accuracy(model: nn.Module, loader) -> float:
    was_training = model.training
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        seen += y.numel()
    model.train(was_training)
    return correct / seen


def oneshot_prune(backbone: nn.Module, sparsity: float) -> nn.Module:
    pruned = copy.deepcopy(backbone)
    params = prunable_params(pruned)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in params:
        prune.remove(module, name)
    return pruned


class Setup:
    """Builds the data module and the backbone of one benchmark (digits by default, CIFAR10 on request)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def datamodule(self, seed: int) -> pl.LightningDataModule:
        a = self.args
        if a.cifar10_dir:
            from lightning_prune.data import CIFAR10DataModule  # written alongside; imported only when asked for

            dm = CIFAR10DataModule(data_dir=a.cifar10_dir, batch_size=a.batch_size, num_workers=a.num_workers,
                                   seed=seed, download=False, verify_checksums=False,
                                   val_size=a.val_size)
        else:
            dm = DigitsDataModule(image_size=a.image_size, batch_size=a.batch_size, seed=seed)
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
        return dm

    def backbone(self) -> nn.Module:
        a = self.args
        if a.cifar10_dir:
            return Conv4(num_classes=10, in_channels=3, input_size=32, width=a.width, hidden=a.hidden)
        return Conv4(num_classes=10, in_channels=1, input_size=a.image_size, width=a.width, hidden=a.hidden)


def recipe(a: argparse.Namespace) -> dict:
    """PrunedClassifier's optimizer (and scheduler) arguments for ``--recipe``."""
    if a.recipe == "adam":
        return {"optimizer": lambda params: torch.optim.Adam(params, lr=a.lr)}
    return {
        "optimizer": lambda params: torch.optim.SGD(params, lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
        "lr_scheduler": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs),
    }


def loop_settings(a: argparse.Namespace) -> LoopSettings:
    """BudgetCallback's loop settings: the defaults, ``--uniform-step`` and the ``--loop NAME=VALUE`` overrides."""
    fields = {f.name: f for f in dataclasses.fields(LoopSettings)}
    values: dict = {"precondition": not a.uniform_step}
    for item in a.loop:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--loop takes NAME=VALUE with NAME one of {sorted(fields)}, got {item!r}")
        default = getattr(LoopSettings(), name)
        values[name] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else float(value)
    return LoopSettings(**values)


def train(setup: Setup, seed: int, callbacks: list, prune_modelpruning: bool = False):
    """Trains one PrunedClassifier; returns the module and the seconds taken."""
    a = setup.args
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = setup.datamodule(seed)
    backbone = setup.backbone()
    model = PrunedClassifier(backbone, num_classes=10, **recipe(a))
    if prune_modelpruning:
        callbacks = [cb(backbone) if callable(cb) and not isinstance(cb, pl.Callback) else cb for cb in callbacks]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=a.epochs, limit_train_batches=a.limit_train_batches,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, deterministic=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trained without a BudgetCallback.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        trainer.fit(model, datamodule=dm)
    return model, dm, time.perf_counter() - start


def run_seed(setup: Setup, seed: int, sparsities: Sequence[float], methods: Sequence[str]) -> list[Run]:
    runs: list[Run] = []

    def record(method: str, s: float, backbone: nn.Module, dm, seconds: float, floor: float = 0.0,
               before: float | None = None) -> None:
        run = Run(method, s, seed, test_accuracy(backbone, dm.test_dataloader()), achieved_sparsity(backbone),
                  round(seconds, 2), floor, before)
        runs.append(run)
        note = f", min_layer_keep {floor:g}, kept before the cut {before:.4f}" if before is not None else ""
        print(f"  seed {seed} {method:16s} s={s:.2f}: acc {run.test_acc:.4f}, achieved sparsity "
              f"{run.achieved_sparsity:.4f}{note} ({run.seconds:.0f} s)", flush=True)

    if "dense" in methods or "oneshot" in methods:
        model, dm, seconds = train(setup, seed, [])
        if "dense" in methods:
            record("dense", 0.0, model.backbone, dm, seconds)
        if "oneshot" in methods:
            for s in sparsities:
                record("oneshot", s, oneshot_prune(model.backbone, s), dm, 0.0)
    for s in sparsities:
        if "lightning_prune" in methods:
            callback = BudgetCallback(sparsity=s, min_layer_keep=setup.args.min_layer_keep,
                                      target_end=setup.args.target_end, loop=loop_settings(setup.args))
            model, dm, seconds = train(setup, seed, [callback])
            record("lightning_prune", s, model.backbone, dm, seconds, callback.min_layer_keep,
                   callback.report.kept_hard_before)
        if "modelpruning" in methods:
            epochs = setup.args.epochs

            def make(backbone: nn.Module, s: float = s, epochs: int = epochs) -> ModelPruning:
                return ModelPruning(
                    "l1_unstructured", parameters_to_prune=prunable_params(backbone),
                    amount=GradualAmount(s, epochs, setup.args.target_end), use_global_unstructured=True, make_pruning_permanent=True,
                    use_lottery_ticket_hypothesis=False,
                )

            model, dm, seconds = train(setup, seed, [make], prune_modelpruning=True)
            record("modelpruning", s, model.backbone, dm, seconds)
        if "gmp" in methods:
            gmp = GradualMagnitudePruning(sparsity=s, target_end=setup.args.target_end, prune_every=setup.args.gmp_every)
            model, dm, seconds = train(setup, seed, [gmp])
            print(f"  (gmp: every {gmp.every} of {gmp.ramp_steps} ramp steps, {len(gmp.history)} pruning steps, "
                  f"last at step {gmp.history[-1]['step']}, kept {gmp.history[-1]['kept']}/{gmp.total})", flush=True)
            record("gmp", s, model.backbone, dm, seconds)
    return runs


def summarize(runs: Sequence[Run]) -> list[Summary]:
    groups: dict[tuple[str, float], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.method, r.target_sparsity), []).append(r)
    dense = [r.test_acc for r in runs if r.method == "dense"]
    dense_mean = statistics.mean(dense) if dense else math.nan
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (method, s), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99))):
        accs = [r.test_acc for r in rs]
        mean = statistics.mean(accs)
        out.append(Summary(
            method=method, target_sparsity=s, runs=len(rs), acc_mean=round(mean, 4),
            acc_std=round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
            sparsity_mean=round(statistics.mean(r.achieved_sparsity for r in rs), 4),
            acc_ratio_to_dense=round(mean / dense_mean, 4) if dense else math.nan,
        ))
    return out


def format_table(summary: Sequence[Summary]) -> str:
    lines = ["| target sparsity | method | test acc (mean ± std) | runs | achieved sparsity | acc / dense |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r.target_sparsity:.2f} | {r.method} | {r.acc_mean:.4f} ± {r.acc_std:.4f} | {r.runs} | "
                     f"{r.sparsity_mean:.4f} | {r.acc_ratio_to_dense:.3f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16, help="digits image side")
    p.add_argument("--width", type=int, default=64, help="Conv4 width (smaller for smoke tests)")
    p.add_argument("--hidden", type=int, default=256, help="Conv4 hidden linear width")
    p.add_argument("--limit-train-batches", type=float, default=1.0, help="Trainer(limit_train_batches=...)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-layer-keep", type=float, default=None,
                   help="BudgetCallback(min_layer_keep=...) (default: the callback's: 1%%, at most half the keep share)")
    p.add_argument("--uniform-step", action="store_true",
                   help="BudgetCallback(loop=LoopSettings(precondition=False)): the budget step alike for every weight, not in Adam's metric")
    p.add_argument("--target-end", type=float, default=TARGET_END,
                   help="share of training at which every method's schedule reaches the budget (BudgetCallback's "
                        "target_end, GMP's and ModelPruning's ramps)")
    p.add_argument("--loop", nargs="*", default=[], metavar="NAME=VALUE",
                   help="BudgetCallback(loop=LoopSettings(NAME=VALUE, ...)), e.g. --loop temperature_end=0.05")
    p.add_argument("--gmp-every", type=int, default=None,
                   help="gmp: optimizer steps between pruning steps (default 1.5%% of the ramp's steps, at least 1)")
    p.add_argument("--recipe", choices=("adam", "sgd-cosine"), default="adam",
                   help="adam: Adam(lr); sgd-cosine: the paper configs' SGD(lr, momentum 0.9, nesterov, weight decay "
                        "5e-4) with a cosine schedule over the epochs")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) for the whole run (recorded in the JSON)")
    p.add_argument("--cifar10-dir", default=None, help="run on CIFAR10 from this folder (no download)")
    p.add_argument("--num-workers", type=int, default=2, help="CIFAR10 loader workers")
    p.add_argument("--val-size", type=int, default=1000, help="CIFAR10 images held out of training for validation")
    p.add_argument("--verbose", action="store_true", help="keep Lightning's log lines")
    p.add_argument("--csv", default=None, help="per-run rows")
    p.add_argument("--json", default=None, help="environment, arguments, runs and summary")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Summary]:
    args = parse_args(argv)
    if args.cifar10_dir and not os.path.isdir(args.cifar10_dir):
        raise SystemExit(f"--cifar10-dir {args.cifar10_dir!r} is not a folder")
    for s in args.sparsities:
        if not 0 < s < 1:
            raise SystemExit(f"sparsities must be in (0, 1), got {s}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    flush_denormal = bool(args.flush_denormal and torch.set_flush_denormal(True))
    if not args.verbose:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_prune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    env = {"python": platform.python_version(), "torch": torch.__version__, "lightning": pl.__version__,
           "lightning_prune": lightning_prune.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "flush_denormal": flush_denormal,
           "data": "cifar10" if args.cifar10_dir else f"digits {args.image_size}x{args.image_size}"}
    print(f"torch.get_num_threads() = {torch.get_num_threads()}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    start = time.perf_counter()
    runs: list[Run] = []
    for seed in args.seeds:
        runs += run_seed(Setup(args), seed, args.sparsities, args.methods)
    summary = summarize(runs)
    print()
    print(format_table(summary))
    print(f"\ntotal {time.perf_counter() - start:.0f} s for {len(args.seeds)} seed(s), {args.epochs} epoch(s)")
    if args.csv:
        write_csv(args.csv, runs)
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "runs": [asdict(r) for r in runs],
                               "summary": [asdict(s) for s in summary]})
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
