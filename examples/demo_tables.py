"""Collect the demo's protocol reports into one markdown table and one JSON file.

    python examples/demo_tables.py RESULTS_DIR

Reads ``addition-*.json`` (``addition-RUN-seedS.json``: one per fine-tuning seed, averaged),
``negation-*.json`` and ``xi-*.json`` (``tvedit evaluate --report``)
and writes ``RESULTS_DIR/results.md`` and ``RESULTS_DIR/results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def avg(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sd(xs: list[float]) -> float:
    m = avg(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def cell(xs: list[float], sign: bool = False) -> str:
    """Mean in %, with ± the sample sd when there are several seeds."""
    text = f"{100 * avg(xs):+.1f}" if sign else pct(avg(xs))
    return text + (f" ± {100 * sd(xs):.1f}" if len(xs) > 1 else "")


def main(root: Path) -> None:
    summary: dict[str, dict] = {}
    lines = ["# tvedit demo: measured results", ""]

    runs: dict[str, list[dict]] = {}  # addition-RUN-seedS.json: one report per fine-tuning seed
    for p in sorted(root.glob("addition-*.json")):
        name = p.stem.removeprefix("addition-")
        run, _, seed = name.rpartition("-seed")
        runs.setdefault(run if seed.isdigit() else name, []).append(json.loads(p.read_text()))
    if runs:
        n_seeds = sorted({len(v) for v in runs.values()})
        lines += [
            "## Task addition (α chosen on validation; test accuracy, %"
            + (f"; mean ± sd over {n_seeds[-1]} fine-tuning seeds)" if n_seeds[-1] > 1 else ")"),
            "",
            "| θ0 / regime | α | zero-shot | fine-tuned (single) | merged | normalised | gain over zero-shot | per task: merged (zero-shot) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, reports in runs.items():
            means = {k: [r["mean"][k] for r in reports] for k in ("zero_shot", "single", "merged", "normalized", "gain")}
            tasks = reports[0]["tasks"]
            per = ", ".join(
                f"{t} {pct(avg([r['merged'][t] for r in reports]))} ({pct(avg([r['zero_shot'][t] for r in reports]))})"
                for t in tasks
            )
            alphas = "/".join(f"{r['alpha']:g}" for r in reports)
            lines.append(
                f"| {name} | {alphas} | {cell(means['zero_shot'])} | {cell(means['single'])} | {cell(means['merged'])} "
                f"| {cell(means['normalized'])} | {cell(means['gain'], sign=True)} | {per} |"
            )
            summary[f"addition/{name}"] = {
                "seeds": len(reports),
                "alpha": [r["alpha"] for r in reports],
                **{k: avg(v) for k, v in means.items()},
                "sd": {k: sd(v) for k, v in means.items()},
                "per_seed": [r["mean"] for r in reports],
                "per_task": {
                    t: {k: avg([r[k][t] for r in reports]) for k in ("zero_shot", "single", "merged")}
                    for t in tasks
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
