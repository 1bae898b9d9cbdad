"""The Part A re-run against the study before it, seed by seed (issue 19, Part B item 5).

    python docs/study-parta/compare.py [OLD_STUDY_JSON NEW_STUDY_JSON]

Defaults: docs/study/study.json (before Part A) and docs/study-parta/study.json (after). Prints a
markdown table of the seeds both studies ran: per regime, each measure before -> after, in % (ξ as
is). README's table is this script's output (tests/test_study_docs.py checks it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGIMES = ("full", "attn", "linearized", "sparse")


def _seeds(study: dict, regime: str) -> dict[int, dict]:
    return {int(s["seed"]): s for s in study["rows"][regime]["seeds"]}


def table(old: dict, new: dict) -> str:
    lines = [
        "| regime | seed | lr | fine-tuned (alone) | merged (absolute) | normalised | negation: target after | control | mean ξ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in REGIMES:
        before, after = _seeds(old, regime), _seeds(new, regime)
        xi = (old["rows"][regime]["disentanglement"]["xi_mean"], new["rows"][regime]["disentanglement"]["xi_mean"])
        lr = (old["rows"][regime]["lr"], new["rows"][regime]["lr"])
        for seed in sorted(set(before) & set(after)):
            a, b = before[seed], after[seed]

            def pct(part: str, key: str, a: dict = a, b: dict = b) -> str:
                return f"{100 * a[part][key]:.1f} → {100 * b[part][key]:.1f}"

            lr_text = f"{lr[0]:g}" if lr[0] == lr[1] else f"{lr[0]:g} → {lr[1]:g}"
            lines.append(
                f"| {regime} | {seed} | {lr_text} | {pct('addition', 'single')} | {pct('addition', 'merged')} | {pct('addition', 'normalized')} "
                f"| {pct('negation', 'target')} | {pct('negation', 'control')} | {xi[0]:.3f} → {xi[1]:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    old_path, new_path = (Path(a) for a in argv) if argv else (HERE.parent / "study" / "study.json", HERE / "study.json")
    print(table(json.loads(old_path.read_text()), json.loads(new_path.read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
