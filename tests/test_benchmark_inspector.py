"""Smoke test of benchmarks/inspector_overhead.py, so that the script never rots (its figures come from real runs)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import inspector_overhead  # noqa: E402


def test_inspector_overhead_prints_ratios_to_the_run_without_it(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    result = inspector_overhead.main(["--threads", "1", "--epochs", "1", "--repeats", "1", "--every", "1",
                                      "--batches", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result) == {"without inspector", "inspector every 1 epoch(s)", "ratio without inspector",
                           "ratio inspector every 1 epoch(s)"}
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    printed = capsys.readouterr().out
    assert "inspector every 1 epoch(s)" in printed and "ratio" in printed


def test_inspector_overhead_reports_the_median_times_and_their_ratio_to_the_run_without_it(monkeypatch, capsys):
    """Timings scripted per variant: the medians and the ratios are known in advance (a ratio to itself, or to the
    wrong variant, or a mean instead of a median would not give them)."""
    times = {None: [4.0, 1.0, 2.0], 1: [3.0, 30.0, 2.5], 5: [2.2, 9.0, 2.0]}  # medians 2.0, 3.0 and 2.2
    calls = []

    def fake_fit_seconds(epochs, every, log_dir, train_batches=None):
        calls.append((epochs, every))
        if epochs == 1 and len(calls) == 1:
            return 100.0  # the warm-up run, not counted
        return times[every][sum(1 for e, v in calls[1:] if v == every) - 1]

    monkeypatch.setattr(inspector_overhead, "fit_seconds", fake_fit_seconds)
    result = inspector_overhead.main(["--threads", "1", "--epochs", "7", "--repeats", "3", "--every", "1", "5"])
    assert calls[0] == (1, 1) and sorted(calls[1:], key=str) == sorted([(7, None), (7, 1), (7, 5)] * 3, key=str)
    assert result["without inspector"] == 2.0
    assert result["inspector every 1 epoch(s)"] == 3.0 and result["inspector every 5 epoch(s)"] == 2.2
    assert result["ratio inspector every 1 epoch(s)"] == pytest.approx(1.5)
    assert result["ratio inspector every 5 epoch(s)"] == pytest.approx(1.1)
    printed = capsys.readouterr().out
    assert "1.500" in printed and "1.100" in printed
