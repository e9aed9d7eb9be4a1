"""Smoke test of benchmarks/inspector_overhead.py, so that the script never rots (its figures come from real runs)."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import inspector_overhead  # noqa: E402


def test_inspector_overhead_prints_ratios_to_the_run_without_it(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    result = inspector_overhead.main(["--threads", "1", "--epochs", "1", "--repeats", "1", "--every", "1",
                                      "--batches", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["ratio without inspector"] == 1.0
    assert math.isfinite(result["ratio inspector every 1 epoch(s)"]) and result["ratio inspector every 1 epoch(s)"] > 0
    printed = capsys.readouterr().out
    assert "inspector every 1 epoch(s)" in printed and "ratio" in printed
