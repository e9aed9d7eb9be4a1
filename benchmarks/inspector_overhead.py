"""Cost of the TensorBoard inspection: a training run with ``PruningInspector`` against the same run without it.

Both variants train the quickstart model (Conv4 on scikit-learn's digits, 16x16) with ``BudgetCallback`` and a
``TensorBoardLogger``; the second adds ``PruningInspector(every_n_epochs=N)`` (histograms of ``|θ|/s`` per layer and
the kept-share figure). The variants alternate, ``--repeats`` times each, so machine noise hits both alike; the
script prints the median wall time of ``trainer.fit`` per variant and the ratio to the run without the inspector.

Usage::

    python benchmarks/inspector_overhead.py --threads 2 --epochs 10 --repeats 3 --every 1 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from result_files import write_json

from lightning_prune import BudgetCallback, PrunedClassifier, PruningInspector
from lightning_prune.backbones import Conv4
from lightning_prune.data import DigitsDataModule


def fit_seconds(epochs: int, every: int | None, log_dir: str, train_batches: int | None = None) -> float:
    """Wall time of one ``trainer.fit``; ``every=None`` leaves the inspector out."""
    pl.seed_everything(0, verbose=False)
    model = PrunedClassifier(Conv4(num_classes=10, in_channels=1, input_size=16), num_classes=10)
    callbacks: list[pl.Callback] = [BudgetCallback(sparsity=0.9)]
    if every is not None:
        callbacks.append(PruningInspector(every_n_epochs=every))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(log_dir, name="run"),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=10, limit_train_batches=train_batches,
        limit_val_batches=train_batches,
    )
    dm = DigitsDataModule(image_size=16, batch_size=64)
    start = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 5], help="every_n_epochs values to time")
    parser.add_argument("--batches", type=int, default=None, help="limit the batches per epoch (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the medians and ratios as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    variants: list[int | None] = [None, *args.every]
    times: dict[str, list[float]] = {_name(v): [] for v in variants}
    with tempfile.TemporaryDirectory() as log_dir:
        fit_seconds(1, args.every[0], log_dir, args.batches)  # warm-up: imports, matplotlib, the event writer
        for _ in range(args.repeats):
            for every in variants:
                times[_name(every)].append(fit_seconds(args.epochs, every, log_dir, args.batches))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians[_name(None)]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.epochs} epochs, median of {args.repeats}")
    print(f"{'variant':<28} {'fit seconds':>12} {'ratio':>8}")
    for name, seconds in medians.items():
        print(f"{name:<28} {seconds:>12.2f} {seconds / base:>8.3f}")
    result = {name: seconds for name, seconds in medians.items()}
    result.update({f"ratio {name}": seconds / base for name, seconds in medians.items()})
    if args.json:
        write_json(args.json, result)
    return result


def _name(every: int | None) -> str:
    return "without inspector" if every is None else f"inspector every {every} epoch(s)"


if __name__ == "__main__":
    main(sys.argv[1:])
