"""What the README's sweep paragraph quotes beyond table.py, from the committed study.json files
(and, where the sweep's vectors are still on disk, from the vectors themselves).

    python docs/study-sweep/details.py [SWEEP_OUT]      # > docs/study-sweep/details.md

Per point and regime (a point an axis reuses from another axis is listed under that one): the
chosen α, single-task accuracy (mean and per task), the training loss at the end (mean of the last
5 logged values, per task) and, when SWEEP_OUT (default demo-out/sweep)
still holds the runs, the digits vector's L2 norm and its fraction of non-zero entries (else the
value the committed details.md has for that row, measured while the runs existed; else n/a).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _vector_stats(path: Path) -> str:
    if not path.exists():
        return "n/a"
    import torch

    from tvedit.reader import load_tensors

    tensors, _ = load_tensors(path)
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
    nonzero = sum(int((t != 0).sum()) for t in tensors.values()) / sum(t.numel() for t in tensors.values())
    return f"{norm:.2f}, {nonzero:.3f}"


def _committed_stats() -> dict[str, str]:
    """The vector column of the committed details.md, by its row's axis | point | regime."""
    path = HERE / "details.md"
    lines = path.read_text().splitlines()[2:] if path.exists() else []
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {" | ".join(c[:3]): c[-1] for c in cells if len(c) == 8}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out/sweep")
    committed = _committed_stats()
    sweep = json.loads((HERE / "sweep.json").read_text())
    print("| axis | point | regime | α | single-task | single per task | final training loss per task | digits vector: norm, non-zero |")
    print("|---|---|---|---|---|---|---|---|")
    for axis in sweep["axes"]:
        for point in axis["points"]:
            if not point["study"].startswith(f"sweep/{axis['name']}/"):
                continue  # a point reused from another axis (the same study): its rows are there
            study = json.loads((HERE / point["study"]).read_text())
            rows = study["rows"].values() if isinstance(study["rows"], dict) else study["rows"]
            for row in rows:
                if row.get("kind") != "regime":
                    continue
                seed = row["seeds"][0]
                add = seed["addition"]
                single = ", ".join(f"{t} {100 * v:.1f}" for t, v in add["single_per_task"].items())
                loss = ", ".join(f"{t} {sum(x[1] for x in c[-5:]) / len(c[-5:]):.2f}" for t, c in seed["loss"].items())
                lr = row["lr"]
                vec = out / Path(point["study"]).parent / "runs" / row["regime"] / f"lr{lr:g}" / "seed0" / "digits.safetensors"
                key = f"{axis['name']} | {point['label']} | {row['regime']}"
                stats = _vector_stats(vec)
                stats = committed.get(key, stats) if stats == "n/a" else stats
                print(f"| {key} | {add['alpha']:g} | {100 * add['single']:.1f} | {single} | {loss} | {stats} |")


if __name__ == "__main__":
    main()
