"""Smoke test of benchmarks/channel_inference_speed.py on a tiny model, so that the script never rots (its figures
come from real runs)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import channel_inference_speed  # noqa: E402

from lightning_prune.backbones import Conv4  # noqa: E402


def test_rows_have_the_smaller_networks_macs_and_a_speedup_against_dense(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    tiny = (lambda: Conv4(width=8, hidden=16, input_size=8, batch_norm=True), (3, 8, 8))
    monkeypatch.setattr(channel_inference_speed, "MODELS", {"conv4_bn": tiny})
    out = tmp_path / "structured.json"
    try:
        result = channel_inference_speed.main(["--threads", "1", "--models", "conv4_bn", "--sparsities", "0.5",
                                               "--batches", "2", "--repeats", "2", "--block", "0.001",
                                               "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == result
    dense, small = result["rows"]
    assert (dense["kind"], small["kind"]) == channel_inference_speed.KINDS
    assert dense["speedup"] == 1.0 and dense["macs_removed"] == 0.0
    # half of Conv4's 32 channels go: each 3x3 convolution after the first loses about 3/4 of its MACs
    assert 0.5 < small["macs_removed"] < 0.9 and small["params"] < dense["params"]
    assert small["latency_ms"] > 0 and small["speedup"] > 0
    assert "| conv4_bn | 50% |" in capsys.readouterr().out
