"""Smoke test of benchmarks/fit_step_cost.py: one round of a few Conv4 steps, and the files it writes."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import sys

import pytest
import torch
from torch import nn

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "fit_step_cost.py")


@pytest.fixture
def fit_step_cost():
    """The script as a module (benchmarks/ is not a package); undoes the thread count and log levels it sets."""
    spec = importlib.util.spec_from_file_location("_benchmark_fit_step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    names = ("lightning.pytorch", "lightning.fabric", "lightning_prune")
    levels = {name: logging.getLogger(name).level for name in names}
    yield module
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    sys.modules.pop(spec.name, None)


def test_fit_step_cost_writes_a_row_per_variant_with_its_ratio(fit_step_cost, tmp_path):
    fit_step_cost.main(["--models", "conv4", "--rounds", "1", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                        "--threads", "1", "--out", str(tmp_path), "--variants", "budget", "budget_recompute",
                        "modelpruning"])
    with open(tmp_path / "fit_step_cost_cpu.csv", newline="") as f:
        table = list(csv.DictReader(f))
    with open(tmp_path / "fit_step_cost_cpu.json") as f:
        report = json.load(f)
    assert [(r["model"], r["variant"]) for r in table] == [("conv4", v) for v in ("dense", "budget", "budget_recompute", "modelpruning")]
    assert [(r["model"], r["variant"]) for r in report["rows"]] == [(r["model"], r["variant"]) for r in table]
    assert {"command", "torch", "lightning", "machine"} <= set(report)
    for r in table:
        for column in ("median_ms", "time_ratio", "memory_mb", "memory_ratio"):
            value = float(r[column])
            assert math.isfinite(value) and value > 0, (r["variant"], column, value)
    # one round: each ratio is the variant's own figure over the dense row's (the variants' times all differ)
    dense = next(r for r in table if r["variant"] == "dense")
    for r in table:
        assert float(r["time_ratio"]) == pytest.approx(float(r["median_ms"]) / float(dense["median_ms"]), rel=1e-9)
        assert float(r["memory_ratio"]) == pytest.approx(float(r["memory_mb"]) / float(dense["memory_mb"]), rel=1e-9)
    memory = {r["variant"]: float(r["memory_mb"]) for r in table}
    # the layers keep the masked weights for the backward pass (one float per covered weight); recomputed, they do not
    backbone = fit_step_cost.BACKBONES["conv4"]()
    covered_mb = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) * 4 / 2**20
    assert memory["budget"] - memory["budget_recompute"] == pytest.approx(covered_mb, rel=0.02)
    assert memory["budget_recompute"] >= memory["dense"]
