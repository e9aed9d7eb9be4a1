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
    assert small["peak_memory_mb"] < dense["peak_memory_mb"]
    assert dense["memory_ratio"] == 1.0 and small["memory_ratio"] < 1.0


def test_peak_memory_counts_the_weights_and_the_largest_set_of_live_activations():
    torch.manual_seed(0)
    # Linear(256, 1024) then Linear(1024, 8), batch 64: the peak holds the input, the 64x1024 hidden output and the
    # 64x8 result being written (the input is alive throughout: it is the caller's)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 8))
    x = torch.randn(64, 256)
    weights = (256 * 1024 + 1024 + 1024 * 8 + 8) * 4
    hidden, out = 64 * 1024 * 4, 64 * 8 * 4
    peak = channel_inference_speed.peak_memory_bytes(model, x)
    assert weights + hidden <= peak <= weights + hidden + out + 4096, (peak, weights + hidden)


def test_round_to_gives_every_layer_a_width_in_whole_units():
    torch.manual_seed(0)
    dense = Conv4(width=16, hidden=16, input_size=8, batch_norm=True).eval()
    small = channel_inference_speed.smaller(dense, (3, 8, 8), 0.6, round_to=8)
    widths = [m.num_features for m in small.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert widths and all(w % 8 == 0 for w in widths) and sum(widths) < 16 * len(widths)
