"""Smoke test of benchmarks/inference_speed.py on a tiny model, so that the script never rots (its figures come from
real runs)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import inference_speed  # noqa: E402

from lightning_prune.backbones import Conv4  # noqa: E402


def test_inference_speed_writes_one_row_per_kind_with_speedups_against_dense(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    monkeypatch.setitem(inference_speed.MODELS, "conv4", (lambda: Conv4(width=4, hidden=16, input_size=8), (3, 8, 8)))
    out = tmp_path / "inference.json"
    try:
        result = inference_speed.main(["--threads", "1", "--models", "conv4", "--sparsities", "0.9", "--batches", "1",
                                       "2", "--repeats", "2", "--block", "0.001", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == result
    rows = result["rows"]
    assert [(r["batch"], r["kind"]) for r in rows] == [(b, k) for b in (1, 2) for k in inference_speed.KINDS]
    for row in rows:
        assert {"model", "sparsity", "batch", "kind", "latency_ms", "speedup", "params", "nonzeros"} <= set(row)
        assert row["latency_ms"] > 0 and row["speedup"] > 0
    dense, zeros = rows[0], rows[1]
    assert dense["speedup"] == 1.0 and dense["nonzeros"] == dense["params"]
    assert zeros["params"] == dense["params"] and zeros["nonzeros"] < dense["params"]
    assert {layer["layer"] for layer in result["export_layers"]} == {"classifier.1", "classifier.3", "classifier.5"}
    assert "| conv4 | 90% | 1 |" in capsys.readouterr().out
