"""Collect the demo's protocol reports into one markdown table and one JSON file.

    python examples/demo_tables.py RESULTS_DIR

Reads ``addition-*.json``, ``negation-*.json`` and ``xi-*.json`` (``tvedit evaluate --report``)
and writes ``RESULTS_DIR/results.md`` and ``RESULTS_DIR/results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main(root: Path) -> None:
    summary: dict[str, dict] = {}
    lines = ["# tvedit demo: measured results", ""]

    adds = sorted(root.glob("addition-*.json"))
    if adds:
        lines += [
            "## Task addition (α chosen on validation; test accuracy, %)",
            "",
            "| θ0 / regime | α | zero-shot | fine-tuned (single) | merged | normalised | gain over zero-shot | per task: merged (zero-shot) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in adds:
            r = json.loads(p.read_text())
            m = r["mean"]
            name = p.stem.removeprefix("addition-")
            per = ", ".join(
                f"{t} {pct(r['merged'][t])} ({pct(r['zero_shot'][t])})" for t in r["tasks"]
            )
            lines.append(
                f"| {name} | {r['alpha']:g} | {pct(m['zero_shot'])} | {pct(m['single'])} | {pct(m['merged'])} | {pct(m['normalized'])} | {100 * m['gain']:+.1f} | {per} |"
            )
            summary[f"addition/{name}"] = {
                "alpha": r["alpha"],
                **m,
                "per_task": {
                    t: {
                        "zero_shot": r["zero_shot"][t],
                        "single": r["single"][t],
                        "merged": r["merged"][t],
                    }
                    for t in r["tasks"]
                },
            }
        lines.append("")

    negs = sorted(root.glob("negation-*.json"))
    if negs:
        lines += [
            "## Task negation (θ0 − α τ_t; control kept ≥ 95% of θ0's; test accuracy, %)",
            "",
            "| regime | target | α | target zero-shot | target fine-tuned | target after negation ↓ | control after ↑ (θ0) |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in negs:
            r = json.loads(p.read_text())
            name = p.stem.removeprefix("negation-")
            for row in r["targets"]:
                star = "" if row["feasible"] else " (infeasible)"
                lines.append(
                    f"| {name} | {row['target']} | {row['alpha']:g}{star} | {pct(row['target_zero_shot'])} | {pct(row['target_finetuned'])} | {pct(row['target_test'])} | {pct(row['control_test'])} ({pct(r['control_zero_shot'])}) |"
                )
            summary[f"negation/{name}"] = {
                "control": r["control"],
                "control_zero_shot": r["control_zero_shot"],
                **r["mean"],
                "targets": r["targets"],
            }
        lines.append("")

    xis = sorted(root.glob("xi-*.json"))
    if xis:
        lines += [
            "## Weight disentanglement error ξ (mean / max over the grid; lower = more disentangled)",
            "",
            "| vectors | tasks | grid | mean ξ | max ξ |",
            "|---|---|---|---|---|",
        ]
        for p in xis:
            r = json.loads(p.read_text())
            xi = r["xi"]
            n = len(xi)
            mean = sum(map(sum, xi)) / n**2
            lines.append(
                f"| {p.stem.removeprefix('xi-')} | {' + '.join(r['tasks'])} | {n}×{n} over [{r['grid'][0]:g}, {r['grid'][-1]:g}]² | {mean:.3f} | {max(map(max, xi)):.3f} |"
            )
            summary[f"disentanglement/{p.stem.removeprefix('xi-')}"] = {
                "mean": mean,
                "max": max(map(max, xi)),
                "grid": r["grid"],
            }
        lines.append("")

    (root / "results.md").write_text("\n".join(lines) + "\n")
    (root / "results.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
