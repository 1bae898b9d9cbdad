"""Numbers in README's study sections come from the committed study JSON, through a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_sweep_details_are_what_details_prints(tmp_path: Path) -> None:
    """docs/study-sweep/details.md (the α, accuracies and losses README's sweep paragraph quotes) is
    details.py's output on the committed study.json files; its last column (vector norms) needs the
    sweep's vectors, which are not committed: without them (an empty SWEEP_OUT) details.py keeps the
    committed value of that column, so the whole file is what it prints."""
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "study-sweep" / "details.py"), str(tmp_path)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    printed, committed = proc.stdout.strip().splitlines(), (REPO / "docs" / "study-sweep" / "details.md").read_text().strip().splitlines()
    assert len(printed) > 2 and printed == committed
    assert any(not line.endswith("| n/a |") for line in printed[2:])  # some norms were measured


@pytest.mark.parametrize("point, first, more", [("steps-1500", ("steps", "1500"), "seeds"), ("wide-200", ("width-200", "tiny_clip_wide"), "seeds-wide")])
def test_readme_seed_tables_are_what_seeds_prints(point: str, first: tuple[str, str], more: str) -> None:
    """README's seed tables (1,500 steps; the wide theta0 at 200 steps) are docs/study-sweep/seeds.py's
    output on the committed study.json files (seed 0 from the sweep, the other seeds from
    examples/sweep-seeds.yaml's runs): a row for every seed those files hold and every regime they all
    ran, with mean ± sd when there are several seeds."""
    import json

    paths = [REPO / "docs" / "study-sweep" / "sweep" / first[0] / first[1] / "study.json",
             *sorted((REPO / "docs" / "study-sweep" / more).glob("*/study.json"))]  # fmt: skip
    studies = [json.loads(p.read_text()) for p in paths]
    seeds = {run["seed"] for s in studies for run in s["rows"]["full"]["seeds"]}
    regimes = [r for r in ("full", "attn", "linearized", "sparse") if all(r in s["rows"] for s in studies)]
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "study-sweep" / "seeds.py"), point], capture_output=True, text=True, check=True)
    table = proc.stdout.strip()
    rows = table.splitlines()[2:]
    cells = [[c.strip() for c in r.split("|")[1:3]] for r in rows if not r.startswith("| mean")]
    assert cells == [[str(s), r] for s in sorted(seeds) for r in regimes]
    assert (len(seeds) > 1) == any(r.startswith("| mean ± sd") for r in rows)
    assert table in (REPO / "README.md").read_text()


def test_readme_recipe_table_is_what_recipes_prints() -> None:
    """README's table of the recipes (per-regime lr search, the TaLoS paper's recipe, and that recipe
    extended) is docs/study-talos/recipes.py's output on the three committed study.json files."""
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "study-talos" / "recipes.py")], capture_output=True, text=True, check=True)
    table = proc.stdout.strip()
    assert table.count("\n") == 13  # a header, a rule, three recipes x four regimes
    assert "| TaLoS recipe | " in table and "| per-regime lr (select: merged) | " in table and "| TaLoS recipe, lr to 1e-2, α step 0.01 | " in table
    assert table in (REPO / "README.md").read_text()
