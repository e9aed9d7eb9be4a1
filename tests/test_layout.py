"""docs/layout.md names every module of the package and every folder, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layout_page_matches_the_package_tree():
    table = [line.split("|")[1] for line in (ROOT / "docs" / "layout.md").read_text().splitlines()
             if line.startswith("| `")]  # the first column of the table of files
    named = {name for cell in table for name in re.findall(r"`([a-z_]+\.py|[a-z_]+/)`", cell)}
    package = ROOT / "lightning_prune"
    present = {p.name for p in package.glob("*.py")} | {
        f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert present - named == set(), f"docs/layout.md does not name {sorted(present - named)}"
    assert named - present == set(), f"docs/layout.md names {sorted(named - present)}, which the package lacks"
