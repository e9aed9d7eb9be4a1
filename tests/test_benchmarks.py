"""Smoke tests of the benchmark scripts: tiny sizes, a few steps, and the files they write hold what they should."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import fields

import pytest
import torch

from lightning_prune import BudgetCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the scripts import their shared helpers (result_files.py) from their own folder, as when they run directly
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is not a package) under a private module name."""
    module_name = f"_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def accuracy():
    return _load("accuracy_at_budget")


@pytest.fixture(autouse=True)
def _restore_global_state():
    """The scripts set torch's thread count and quieten Lightning's loggers: undo both for the tests that follow."""
    threads = torch.get_num_threads()
    names = ("lightning.pytorch", "lightning.fabric", "lightning_prune")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- accuracy_at_budget.py
def test_accuracy_at_budget_sgd_recipe_is_the_paper_configs(accuracy):
    args = accuracy.parse_args(["--recipe", "sgd-cosine", "--lr", "0.01", "--epochs", "7"])
    kwargs = accuracy.recipe(args)
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = kwargs["optimizer"](params)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.9, True, 5e-4)
    scheduler = kwargs["lr_scheduler"](optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 7
    assert set(accuracy.recipe(accuracy.parse_args([]))) == {"optimizer"}  # Adam, no schedule


def test_accuracy_at_budget_smoke(accuracy, tmp_path):
    csv_path, json_path = tmp_path / "accuracy.csv", tmp_path / "accuracy.json"
    sparsity = 0.95
    summary = accuracy.main([
        "--seeds", "0", "--epochs", "1", "--sparsities", str(sparsity), "--width", "8", "--hidden", "16",
        "--limit-train-batches", "4", "--threads", "1", "--csv", str(csv_path), "--json", str(json_path),
    ])
    runs = _read_csv(csv_path)
    assert list(runs[0]) == [f.name for f in fields(accuracy.Run)]
    assert sorted(r["method"] for r in runs) == sorted(accuracy.METHODS)
    for r in runs:
        assert r["seed"] == "0"
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert float(r["seconds"]) >= 0
        expected_floor = BudgetCallback(sparsity=sparsity).min_layer_keep if r["method"] == "lightning_prune" else 0.0
        assert float(r["min_layer_keep"]) == expected_floor
        if r["method"] == "dense":
            assert float(r["target_sparsity"]) == 0.0 and float(r["achieved_sparsity"]) < 0.01
        else:
            assert float(r["target_sparsity"]) == sparsity
            # every pruning method reaches the budget exactly: ours by finalisation, torch's by its global top-k
            assert float(r["achieved_sparsity"]) == pytest.approx(sparsity, abs=1e-3), r["method"]

    assert [(s.method, s.target_sparsity) for s in summary] == [
        ("dense", 0.0), ("lightning_prune", sparsity), ("modelpruning", sparsity), ("oneshot", sparsity)]
    for s in summary:
        assert s.runs == 1 and s.acc_std == 0.0
        assert math.isfinite(s.acc_ratio_to_dense) and s.acc_ratio_to_dense >= 0
    assert summary[0].acc_ratio_to_dense == 1.0

    report = json.loads(json_path.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["args"]["sparsities"] == [sparsity]
    assert len(report["runs"]) == len(runs) and len(report["summary"]) == len(summary)
    lp = next(s for s in report["summary"] if s["method"] == "lightning_prune")
    assert lp["sparsity_mean"] == pytest.approx(sparsity, abs=1e-3)


@pytest.mark.parametrize("epochs", [1, 5, 20])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_modelpruning_schedule_reaches_the_target(accuracy, epochs, sparsity):
    """torch prunes a share of the weights still unpruned: the increments compound to the cubic schedule's target."""
    amount = accuracy.GradualAmount(sparsity, epochs)
    kept = 1.0
    for epoch in range(epochs):
        step = amount(epoch)
        assert 0.0 <= step < 1.0
        kept *= 1.0 - step
        assert 1.0 - kept == pytest.approx(accuracy.cumulative_sparsity(epoch, sparsity, epochs), abs=1e-12)
    assert 1.0 - kept == pytest.approx(sparsity, abs=1e-12)


# --------------------------------------------------------------------------------------------- budget_tracking.py
def test_budget_tracking_measures_the_share_before_the_cut_and_the_cut(tmp_path):
    tracking = _load("budget_tracking")
    rows = tracking.main(["--workloads", "demo_transformer", "--threads", "1", "--json", str(tmp_path / "t.json")])
    (row,) = rows
    assert row.workload == "demo_transformer" and row.steps == 240 and row.metric == "val_loss"
    assert row.budget_share == pytest.approx(0.1, abs=1e-4)
    assert row.relative_gap == pytest.approx(row.hard_share_before_cut / row.budget_share - 1)
    assert row.passed == (abs(row.relative_gap) <= 0.1 and row.cut_effect <= 0.05)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"][0]["hard_share_before_cut"] == row.hard_share_before_cut
