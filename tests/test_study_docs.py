"""Numbers in README's study sections come from the committed study JSON, through a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_part_a_table_is_what_compare_prints() -> None:
    """README's before/after table of the Part A re-run is docs/study-parta/compare.py's output
    on the two committed study.json files (docs/study: before Part A; docs/study-parta: after)."""
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "study-parta" / "compare.py")], capture_output=True, text=True, check=True)
    table = proc.stdout.strip()
    assert table.count("\n") >= 5  # a header, a rule and a row per regime at least
    assert table in (REPO / "README.md").read_text()

