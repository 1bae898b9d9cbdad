"""One sweep point's seeds, from separate studies, as a markdown table (issue 19: "three seeds where it
decides the ordering").

    python docs/study-sweep/seeds.py [STUDY_JSON ...]

Default: the 1,500-step point of the steps axis — seed 0 from examples/sweep.yaml's run
(docs/study-sweep/sweep/steps/1500/study.json) and seeds 1 and 2 from examples/sweep-seeds.yaml's runs
(docs/study-sweep/seeds/*/study.json). The studies must be the same plan but for the seeds and the
regimes they ran (refused otherwise, exit 1). One row per seed and regime (merged absolute accuracy,
normalised accuracy, negation target after; linearized − full in the same seed), then mean ± sd over
the seeds (sample sd). README's seed table is this script's output (tests/test_study_docs.py).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = [HERE / "sweep" / "steps" / "1500" / "study.json", *sorted((HERE / "seeds").glob("*/study.json"))]
REGIMES = ("full", "linearized")
SAME = ("theta0", "tasks", "finetune", "evaluate", "negation", "select", "model")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _mean_sd(xs: list[float], fmt=_pct) -> str:
    return f"{fmt(statistics.mean(xs))} ± {_pct(statistics.stdev(xs))}"


def per_seed(studies: list[dict]) -> dict[int, dict[str, dict[str, float]]]:
    """{seed: {regime: {merged, normalized, target}}} over the studies, each seed from one study."""
    first = studies[0]["plan"]
    out: dict[int, dict[str, dict[str, float]]] = {}
    for study in studies:
        plan = study["plan"]
        for key in SAME:
            if plan.get(key) != first.get(key):
                raise SystemExit(f"error: the studies differ in plan key {key!r}: not one sweep point")
        for regime in REGIMES:
            if plan["regimes"].get(regime) != first["regimes"].get(regime):
                raise SystemExit(f"error: the studies differ in plan key 'regimes.{regime}': not one sweep point")
            for run in study["rows"][regime]["seeds"]:
                values = {"merged": run["addition"]["merged"], "normalized": run["addition"]["normalized"], "target": run["negation"]["target"]}
                if run["seed"] in out and regime in out[run["seed"]]:
                    raise SystemExit(f"error: seed {run['seed']} of {regime} is in two of the studies")
                out.setdefault(run["seed"], {})[regime] = values
    return out


def table(studies: list[dict]) -> str:
    seeds = per_seed(studies)
    head = "| seed | regime | merged (absolute) | normalised | negation: target after ↓ | merged: linearized − full | target: linearized − full |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    diffs: dict[str, list[float]] = {"merged": [], "target": []}
    for seed in sorted(seeds):
        rows = seeds[seed]
        for regime in REGIMES:
            r = rows[regime]
            diff = ["", ""]
            if regime == "linearized":
                d = {m: r[m] - rows["full"][m] for m in diffs}
                for m in diffs:
                    diffs[m].append(d[m])
                diff = [_signed(d["merged"]), _signed(d["target"])]
            out.append(f"| {seed} | {regime} | {_pct(r['merged'])} | {_pct(r['normalized'])} | {_pct(r['target'])} | " + " | ".join(diff) + " |")
    n = len(seeds)
    if n > 1:
        for regime in REGIMES:
            cells = [_mean_sd([seeds[s][regime][m] for s in seeds]) for m in ("merged", "normalized", "target")]
            diff = [_mean_sd(diffs["merged"], _signed), _mean_sd(diffs["target"], _signed)] if regime == "linearized" else ["", ""]
            out.append(f"| mean ± sd ({n}) | {regime} | " + " | ".join(cells + diff) + " |")
    return "\n".join(out)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or DEFAULT
    print(table([json.loads(p.read_text()) for p in paths]))


if __name__ == "__main__":
    main()
