"""One sweep point's seeds, from separate studies, as a markdown table (issue 19: "three seeds where it
decides the ordering").

    python docs/study-sweep/seeds.py [POINT | STUDY_JSON ...]

POINT names a committed set (default ``steps-1500``):

* ``steps-1500``: the 1,500-step point of the steps axis — seed 0 from examples/sweep.yaml's run
  (docs/study-sweep/sweep/steps/1500/study.json), the other seeds from examples/sweep-seeds.yaml's
  ``steps`` axis (docs/study-sweep/seeds/*/study.json);
* ``wide-200``: the wide theta0 at 200 steps — seed 0 from examples/sweep.yaml's ``width-200`` axis,
  the other seeds from examples/sweep-seeds.yaml's ``width-200`` axis (docs/study-sweep/seeds-wide/).

The studies must be the same plan but for the seeds and the regimes they ran (refused otherwise, exit
1); the table has the regimes every one of them ran. One row per seed and regime (merged absolute
accuracy, normalised accuracy, negation target after; the regime − full in the same seed), then
mean ± sd over the seeds (sample sd). README's seed tables are this script's output
(tests/test_study_docs.py).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POINTS = {
    "steps-1500": [HERE / "sweep" / "steps" / "1500" / "study.json", *sorted((HERE / "seeds").glob("*/study.json"))],
    "wide-200": [HERE / "sweep" / "width-200" / "tiny_clip_wide" / "study.json", *sorted((HERE / "seeds-wide").glob("*/study.json"))],
}
ORDER = ("full", "attn", "linearized", "sparse")
SAME = ("theta0", "tasks", "finetune", "evaluate", "negation", "select", "model")
METRICS = ("merged", "normalized", "target")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _mean_sd(xs: list[float], fmt=_pct) -> str:
    return f"{fmt(statistics.mean(xs))} ± {_pct(statistics.stdev(xs))}"


def common_regimes(studies: list[dict]) -> list[str]:
    """The regimes every study ran, full first (the differences are against it)."""
    ran = [set(study["rows"]) for study in studies]
    regimes = [r for r in ORDER if all(r in s for s in ran)]
    if "full" not in regimes:
        raise SystemExit("error: not every study ran full (the differences are against it)")
    return regimes


def per_seed(studies: list[dict], regimes: list[str]) -> dict[int, dict[str, dict[str, float]]]:
    """{seed: {regime: {merged, normalized, target}}} over the studies, each seed from one study."""
    first = studies[0]["plan"]
    out: dict[int, dict[str, dict[str, float]]] = {}
    for study in studies:
        plan = study["plan"]
        for key in SAME:
            if plan.get(key) != first.get(key):
                raise SystemExit(f"error: the studies differ in plan key {key!r}: not one sweep point")
        for regime in regimes:
            if plan["regimes"].get(regime) != first["regimes"].get(regime):
                raise SystemExit(f"error: the studies differ in plan key 'regimes.{regime}': not one sweep point")
            for run in study["rows"][regime]["seeds"]:
                values = {"merged": run["addition"]["merged"], "normalized": run["addition"]["normalized"], "target": run["negation"]["target"]}
                if run["seed"] in out and regime in out[run["seed"]]:
                    raise SystemExit(f"error: seed {run['seed']} of {regime} is in two of the studies")
                out.setdefault(run["seed"], {})[regime] = values
    return out


def table(studies: list[dict]) -> str:
    regimes = common_regimes(studies)
    seeds = per_seed(studies, regimes)
    head = "| seed | regime | merged (absolute) | normalised | negation: target after ↓ | merged − full | target − full |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    diffs: dict[str, dict[str, list[float]]] = {r: {"merged": [], "target": []} for r in regimes}
    for seed in sorted(seeds):
        rows = seeds[seed]
        for regime in regimes:
            r = rows[regime]
            diff = ["", ""]
            if regime != "full":
                for m in ("merged", "target"):
                    diffs[regime][m].append(r[m] - rows["full"][m])
                diff = [_signed(diffs[regime][m][-1]) for m in ("merged", "target")]
            out.append(f"| {seed} | {regime} | " + " | ".join(_pct(r[m]) for m in METRICS) + " | " + " | ".join(diff) + " |")
    n = len(seeds)
    if n > 1:
        for regime in regimes:
            cells = [_mean_sd([seeds[s][regime][m] for s in seeds]) for m in METRICS]
            diff = [_mean_sd(diffs[regime][m], _signed) for m in ("merged", "target")] if regime != "full" else ["", ""]
            out.append(f"| mean ± sd ({n}) | {regime} | " + " | ".join(cells + diff) + " |")
    return "\n".join(out)


def main() -> None:
    args = sys.argv[1:] or ["steps-1500"]
    if len(args) == 1 and args[0] in POINTS:
        paths = POINTS[args[0]]
    elif all(a.endswith(".json") for a in args):
        paths = [Path(a) for a in args]
    else:
        raise SystemExit(f"error: expected one of {', '.join(POINTS)} or study.json paths, not {' '.join(args)}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {missing[0]}: no such study.json")
    print(table([json.loads(p.read_text()) for p in paths]))


if __name__ == "__main__":
    main()
