"""The files a benchmark script writes: its rows as CSV (one column per dataclass field) and its report as JSON."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any


def write_csv(path: str, rows: Sequence[Any]) -> None:
    """``rows`` (dataclass instances of one type) as CSV with a header row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
