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
def step_cost():
    return _load("step_cost")


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


# ---------------------------------------------------------------------------------------------------- step_cost.py
def test_step_cost_smoke(step_cost, tmp_path):
    csv_path, json_path = tmp_path / "step_cost.csv", tmp_path / "step_cost.json"
    rows = step_cost.main([
        "--device", "cpu", "--models", "conv4", "--steps", "2", "--warmup", "1", "--batch-size", "4",
        "--width-scale", "0.125", "--threads", "1", "--csv", str(csv_path), "--json", str(json_path),
    ])
    table = _read_csv(csv_path)
    assert list(table[0]) == [f.name for f in fields(step_cost.Row)]
    assert [r["variant"] for r in table] == list(step_cost.VARIANTS)
    assert len(rows) == len(table)
    by_variant = {r["variant"]: r for r in table}
    for r in table:
        assert (r["model"], r["device"], r["precision"], r["batch_size"], r["steps"]) == ("conv4", "cpu", "fp32", "4",
                                                                                            "2")
        for column in ("median_ms", "time_ratio", "peak_mb", "memory_ratio"):
            value = float(r[column])
            assert math.isfinite(value) and value > 0, (r["variant"], column, value)
        assert float(r["iqr_ms"]) >= 0
        assert r["memory_kind"].startswith("estimate")
    assert float(by_variant["dense"]["time_ratio"]) == 1.0
    assert float(by_variant["dense"]["memory_ratio"]) == 1.0
    # the reparametrization adds no trainable parameter, and neither does torch's pruning (weight_orig replaces weight)
    assert len({r["params"] for r in table}) == 1
    # the soft mask's effective weights are saved for the backward: the estimate sees more than the dense one
    assert float(by_variant["reparam"]["memory_ratio"]) > 1.0

    report = json.loads(json_path.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["torch_threads"] == 1
    assert [r["variant"] for r in report["rows"]] == list(step_cost.VARIANTS)
    assert report["rows"][1]["time_ratio"] == pytest.approx(float(by_variant["reparam"]["time_ratio"]))
    assert isinstance(report["goals_missed"], list)
    assert report["goals_missed"] == step_cost.check_goals(rows)


def test_step_cost_times_the_compiled_and_separate_budget_variants_too(step_cost, monkeypatch):
    from lightning_prune import compiled_gate

    torch._dynamo.reset()
    monkeypatch.setattr(compiled_gate, "BACKEND", "aot_eager")  # no C++ compiler needed in CI
    compiled_gate.reset()
    rows = step_cost.main([
        "--device", "cpu", "--models", "conv4", "--steps", "1", "--warmup", "1", "--batch-size", "4",
        "--width-scale", "0.125", "--threads", "1", "--compile-gate", "--budget-pass", "both",
    ])
    torch._dynamo.reset()
    compiled = set(compiled_gate._compiled)
    failed = list(compiled_gate._failed)
    compiled_gate.reset()
    assert [r.variant for r in rows] == [*step_cost.VARIANTS, "reparam_separate", "reparam_compiled"]
    assert {"forward", "backward_budget"} <= compiled and not failed
    assert rows[-1].time_ratio > 0 and rows[-1].memory_ratio == rows[1].memory_ratio


def test_step_cost_goals_and_per_model_steps(step_cost):
    def row(variant, time_ratio, memory_ratio, device="cpu"):
        return step_cost.Row("conv4", device, "fp32", variant, 64, 2, 10, 1.0, 0.1, time_ratio, 1.0, memory_ratio,
                             "estimate", 1)

    assert step_cost.check_goals([row("dense", 1.0, 1.0), row("reparam", 1.09, 1.24)]) == []
    assert step_cost.check_goals([row("modelpruning", 3.0, 3.0)]) == []  # only the reparametrization has goals
    misses = step_cost.check_goals([row("reparam", 1.2, 1.3), row("reparam", 1.06, 1.0, device="cuda")])
    assert len(misses) == 3 and "step time 1.200x" in misses[0] and "peak memory" in misses[1]

    args = step_cost.parse_args(["--steps", "20", "--warmup", "3", "--model-steps", "vgg19=8:2", "resnet18=6"])
    assert step_cost.step_plan(args) == {"conv4": (20, 3), "vgg19": (8, 2), "resnet18": (6, 3)}
    for bad in ("vgg=8", "vgg19", "vgg19=x", "vgg19=0"):
        with pytest.raises(SystemExit):
            step_cost.step_plan(step_cost.parse_args(["--model-steps", bad]))


# ------------------------------------------------------------------------------------------- accuracy_at_budget.py
def test_accuracy_at_budget_passes_the_budget_grad_temperature_on(accuracy, monkeypatch):
    seen = []

    class RecordingCallback(BudgetCallback):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            seen.append(self.budget_grad_temperature)

    monkeypatch.setattr(accuracy, "BudgetCallback", RecordingCallback)
    accuracy.main([
        "--seeds", "0", "--epochs", "1", "--sparsities", "0.9", "--width", "8", "--hidden", "16",
        "--limit-train-batches", "2", "--threads", "1", "--methods", "lightning_prune", "--budget-grad-temperature", "0.3",
    ])
    assert seen == [0.3]


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


# -------------------------------------------------------------------------------------------------- step_phases.py
@pytest.mark.parametrize("budget_pass", ["backward", "separate"])
def test_step_phases_smoke(tmp_path, budget_pass):
    phases = _load("step_phases")
    json_path = tmp_path / "phases.json"
    report = phases.main(["--model", "conv4", "--width-scale", "0.125", "--batch-size", "4", "--rounds", "2",
                          "--warmup", "1", "--threads", "1", "--budget-pass", budget_pass, "--json", str(json_path)])
    rows = {r["phase"]: r for r in report["phases"]}
    assert list(rows) == [*phases.PHASES, "total"]
    assert rows["budget"]["dense_ms"] == 0.0 and rows["budget"]["reparam_ms"] > 0  # only reparam has a budget term
    assert all(math.isfinite(r["extra_ms"]) and r["dense_ms"] >= 0 for r in rows.values())
    assert json.loads(json_path.read_text())["phases"] == report["phases"]


@pytest.mark.slow
def test_step_phases_kernel_probe_compiles_and_times_both():
    probe = _load("step_phases").kernel_probe("conv4", width_scale=0.125, repeats=3)
    assert probe["weights"] == 32 * 1024  # Conv4 at width 8, hidden 32: the first Linear is the largest weight
    assert all(probe[k] > 0 for k in ("eager_forward_ms", "compiled_forward_ms", "eager_backward_ms",
                                      "compiled_backward_ms"))
