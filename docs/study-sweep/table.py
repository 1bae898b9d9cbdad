"""The scale sweep of issue 19 (Part B item 6) as a markdown table, from the committed sweep.json.

    python docs/study-sweep/table.py [SWEEP_JSON]

Default: docs/study-sweep/sweep.json (written by `tvedit study PLAN -o OUT` for a plan with a
`sweep:` section; its points' study.json files are beside it under sweep/AXIS/VALUE/). One row per
swept value and regime: merged (absolute) and normalised accuracy, the negation target after
negation (lower is better), and the difference to full at the same point, in %. README's sweep table
is this script's output (tests/test_study_docs.py checks it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGIMES = ("full", "attn", "linearized", "sparse")
MEASURES = (("merged", "merged (absolute)"), ("normalized", "normalised"), ("negation_target", "negation: target after ↓"))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(row: dict, name: str) -> str:
    m = row[name]
    return _pct(m["mean"]) + (f" ± {_pct(m['sd'])}" if row.get("seeds", 1) > 1 else "")


def table(sweep: dict) -> str:
    out = []
    for axis in sweep["axes"]:
        head = f"| {axis['vary']} | regime | seeds | " + " | ".join(label for _, label in MEASURES) + " | merged − full | target − full |"
        zero = ", ".join(f"{p['label']}: {_pct(p['zero_shot'])}" for p in axis["points"])
        out += [f"Axis `{axis['name']}`; zero-shot θ0, mean over the tasks: {zero}.", "", head, "|" + "---|" * (head.count("|") - 1)]
        for point in axis["points"]:
            rows = point["rows"]
            full = rows.get("full")
            for regime in sorted(rows, key=lambda r: (REGIMES.index(r) if r in REGIMES else len(REGIMES), r)):
                row = rows[regime]
                diff = ["", ""]
                if full is not None and regime != "full":
                    diff = [f"{100 * (row['merged']['mean'] - full['merged']['mean']):+.1f}",
                            f"{100 * (row['negation_target']['mean'] - full['negation_target']['mean']):+.1f}"]  # fmt: skip
                cells = [point["label"], regime, str(row.get("seeds", 1)), *(_cell(row, name) for name, _ in MEASURES), *diff]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).strip()


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "sweep.json"
    print(table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
