"""Recipes for the same four regimes side by side (issue 19, Part A item 2): the per-regime lr
search chosen by merged accuracy (examples/study.yaml, re-run after Part A: docs/study-parta/), the
TaLoS paper's recipe (examples/study-talos.yaml: every regime at full fine-tuning's lr grid, sparse
α widened by 1/density, lr chosen by negation on held-out data: docs/study-talos/) and that recipe
with the lr grid extended where a regime chose its top and a 4x finer α grid
(examples/study-talos-extended.yaml: docs/study-talos/extended/).

    python docs/study-talos/recipes.py [STUDY_JSON ...]

Defaults: docs/study-parta/study.json, docs/study-talos/study.json and
docs/study-talos/extended/study.json. One row per regime and
recipe, mean ± sd over the study's seeds, in %: the lr chosen (and what chose it: the first seed's
validation), the addition α, single-task (fine-tuned alone), merged (absolute) and normalised
accuracy, the negation target and control accuracy; and ξ, the mean weight-disentanglement error
(the first seed's vectors). README's table is this script's output
(tests/test_study_docs.py checks it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGIMES = ("full", "attn", "linearized", "sparse")


def recipe_name(plan: dict) -> str:
    """The plan's label up to its first colon; a plan without one: its lr selection."""
    label = str(plan.get("label") or "").split(":")[0].strip()
    return label or f"per-regime lr (select: {plan.get('select', 'merged')})"


def _cell(measure: dict, seeds: int, scale: float = 100.0, fmt: str = ".1f") -> str:
    text = format(scale * measure["mean"], fmt)
    return text + (f" ± {format(scale * measure['sd'], fmt)}" if seeds > 1 else "")


def table(studies: list[dict]) -> str:
    lines = [
        "| regime | recipe | lr (chosen by) | seeds | α | fine-tuned (alone) | merged (absolute) | normalised | negation: target after ↓ | control | ξ (first seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in REGIMES:
        for study in studies:
            row = study["rows"].get(regime)
            if row is None:
                continue
            n = len(row["seeds"])
            add, neg = row["addition"], row["negation"]
            xi = row.get("disentanglement", {}).get("xi_mean")
            select = row["lr_choice"].get("select", study["plan"].get("select", "merged"))
            cells = [regime, recipe_name(study["plan"]), f"{row['lr']:g} ({select})", str(n), _cell(add["alpha"], n, 1.0, ".3f"),
                     *(_cell(add[k], n) for k in ("single", "merged", "normalized")), *(_cell(neg[k], n) for k in ("target", "control")),
                     "n/a" if xi is None else f"{xi:.3f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    paths = [Path(a) for a in argv] or [HERE.parent / "study-parta" / "study.json", HERE / "study.json", HERE / "extended" / "study.json"]
    print(table([json.loads(p.read_text()) for p in paths]))


if __name__ == "__main__":
    main(sys.argv[1:])
