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



def test_readme_sweep_table_is_what_table_prints() -> None:
    """README's scale-sweep table is docs/study-sweep/table.py's output on the committed sweep.json,
    and every point it lists has its study.json committed beside it."""
    import json

    sweep = json.loads((REPO / "docs" / "study-sweep" / "sweep.json").read_text())
    for axis in sweep["axes"]:
        for point in axis["points"]:
            assert (REPO / "docs" / "study-sweep" / point["study"]).is_file(), point["study"]
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "study-sweep" / "table.py")], capture_output=True, text=True, check=True)
    table = proc.stdout.strip()
    assert table.count("\n") >= 5
    assert table in (REPO / "README.md").read_text()
