"""The full CIFAR-10 protocol: one row per run (network, method, sparsity, seed), appended to a JSON-lines file.

Every run reads the recipe from ``configs/cifar10_full_<network>_cpu.yaml`` through the same LightningCLI that
``train.py`` uses (data, network, optimizer, schedule, epochs), then changes only the pruning callback:

* ``dense``: the config's ``BudgetCallback`` is left out;
* ``budget``: the config's ``BudgetCallback`` with ``sparsity`` set to the row's (its other arguments as written);
* ``gmp``: per-step gradual magnitude pruning (``gradual_magnitude_pruning.py``) on the same Conv/Linear weights, the
  same cubic schedule ending at 60% of training, instead of the ``BudgetCallback``.

The row is the network at the end of training tested on the 10,000 test images (no checkpoint is chosen). A row is
appended to ``--out`` when its run ends, so a session that stops keeps what finished; running the same command again
skips the rows already in the file.

Usage (one thread per process; two processes may share a 2-core machine)::

    ../shared/tools/cifar10-from-jpeg data/cifar10-full
    python benchmarks/cifar10_full.py --network resnet18 --methods dense --seeds 0 1 --threads 1 \\
        --out benchmarks/results/cifar10_full.jsonl
    python benchmarks/cifar10_full.py --network resnet18 --methods budget gmp --sparsities 0.9 0.98 --seeds 0 1 \\
        --threads 1 --out benchmarks/results/cifar10_full.jsonl

``--epochs`` and ``--limit-train-batches`` shrink a run for a smoke test (the scheduler's ``T_max`` follows
``--epochs``); rows of such runs record them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gradual_magnitude_pruning import GradualMagnitudePruning  # noqa: E402

from lightning_prune import BudgetCallback  # noqa: E402
from lightning_prune.cli import PruneCLI  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("dense", "budget", "gmp")


def config_path(network: str) -> str:
    return os.path.join(ROOT, "configs", f"cifar10_full_{network}_cpu.yaml")


def existing_rows(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def row_key(row: dict[str, Any]) -> tuple:
    return (row["network"], row["method"], round(float(row["sparsity"]), 4), int(row["seed"]), row["epochs"],
            row.get("limit_train_batches", 1.0), row.get("limit_test_batches", 1.0))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cli_args(a: argparse.Namespace, seed: int, log_name: str) -> list[str]:
    args = ["--config", config_path(a.network), "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed), "--trainer.logger.init_args.name", log_name,
            "--trainer.enable_progress_bar", "false"]
    if a.data_dir:
        args += ["--data.init_args.data_dir", a.data_dir]
    if a.epochs is not None:
        args += ["--trainer.max_epochs", str(a.epochs), "--model.init_args.lr_scheduler.init_args.T_max", str(a.epochs)]
    if a.limit_train_batches != 1.0:
        args += ["--trainer.limit_train_batches", str(a.limit_train_batches)]
    if a.limit_test_batches != 1.0:
        args += ["--trainer.limit_test_batches", str(a.limit_test_batches),
                 "--trainer.limit_val_batches", str(a.limit_test_batches)]
    return args


def zeros_share(backbone: torch.nn.Module) -> float:
    """Share of zeros in the effective Conv/Linear weights (``module.weight`` as the forward pass reads it)."""
    zeros = total = 0
    for m in backbone.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def run_one(a: argparse.Namespace, method: str, sparsity: float, seed: int) -> dict[str, Any]:
    log_name = f"cifar10_full_{a.network}_{method}_{sparsity:g}_seed{seed}"
    args = cli_args(a, seed, log_name)
    if method == "budget":  # the config's BudgetCallback (the last callback) at the row's sparsity
        args += ["--trainer.callbacks.init_args.sparsity", str(sparsity)]
    code = commit()  # the code that runs, read before it runs
    cli = PruneCLI(args=args, run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    budget = next(cb for cb in trainer.callbacks if isinstance(cb, BudgetCallback))
    if method != "budget":
        trainer.callbacks.remove(budget)
    if method == "gmp":
        trainer.callbacks.append(GradualMagnitudePruning(sparsity=sparsity, target_end=budget.target_end))
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    row: dict[str, Any] = {
        "network": a.network, "method": method, "sparsity": sparsity, "seed": seed,
        "epochs": trainer.max_epochs, "limit_train_batches": a.limit_train_batches,
        "limit_test_batches": a.limit_test_batches,
        "test_acc": round(float(test["test/acc"]), 4), "zeros": round(zeros_share(model.backbone), 4),
        "fit_seconds": round(seconds), "threads": torch.get_num_threads(), "commit": code,
    }
    if method == "budget":
        row["in_use_before_cut"] = round(budget.report.kept_hard_before, 4)
        row["val_at_cut"] = {k: [round(budget.report.val_before_cut.get(k, float("nan")), 4),
                                 round(v, 4)] for k, v in budget.report.val_after_cut.items()}
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=("resnet18", "vgg19"), default="resnet18")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["dense"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="overrides the config's data_dir")
    p.add_argument("--epochs", type=int, default=None, help="overrides the config's max_epochs and T_max")
    p.add_argument("--limit-train-batches", type=float, default=1.0)
    p.add_argument("--limit-test-batches", type=float, default=1.0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cifar10_full.jsonl"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    done = {row_key(r) for r in existing_rows(a.out)}
    rows = []
    for seed in a.seeds:
        for method in a.methods:
            for sparsity in ([0.0] if method == "dense" else a.sparsities):
                probe = {"network": a.network, "method": method, "sparsity": sparsity, "seed": seed,
                         "epochs": a.epochs if a.epochs is not None else epochs_in_config(a.network),
                         "limit_train_batches": a.limit_train_batches, "limit_test_batches": a.limit_test_batches}
                if row_key(probe) in done:
                    print(f"skip (in {a.out}): {probe}", flush=True)
                    continue
                row = run_one(a, method, sparsity, seed)
                row.update(python=platform.python_version(), torch=torch.__version__)
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def epochs_in_config(network: str) -> int:
    import yaml

    with open(config_path(network)) as f:
        return int(yaml.safe_load(f)["trainer"]["max_epochs"])


if __name__ == "__main__":
    main()
