"""Start-up cost of tvedit commands on a small file: wall seconds and peak RSS, median of N runs.

Every command runs in a fresh process (`python -m tvedit ...`), so the figures include the
interpreter and every import. References: `python -c pass` (the interpreter alone) and
`python -c "import torch"`. `--src DIR` puts another source tree first on PYTHONPATH, to compare
two versions in one run (e.g. a `git archive` of the previous commit):

    python benchmarks/bench_startup.py --repeat 5
    python benchmarks/bench_startup.py --repeat 5 --src /tmp/old/src --src src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402


def commands(work: Path) -> list[tuple[str, list[str]]]:
    py, tv = sys.executable, [sys.executable, "-m", "tvedit"]
    small = str(work / "small.safetensors")
    return [
        ("python -c pass", [py, "-c", "pass"]),
        ("python -c 'import torch'", [py, "-c", "import torch"]),
        ("tvedit --help", [*tv, "--help"]),
        ("tvedit completions bash", [*tv, "completions", "bash"]),
        ("tvedit methods", [*tv, "methods"]),
        ("tvedit info SMALL", [*tv, "info", small]),
        ("tvedit info SMALL --tensors", [*tv, "info", small, "--tensors"]),
        ("tvedit add SMALL×2", [*tv, "add", small, str(work / "small2.safetensors"), "--base", small, "-o", str(work / "out.safetensors"), "--force"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--src", action="append", type=Path, help="source tree(s) to compare (default: this checkout's src)")
    args = ap.parse_args()
    srcs = args.src or [Path(__file__).resolve().parents[1] / "src"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        g = torch.Generator().manual_seed(0)
        state = {f"layer.{i}.weight": torch.randn(64, 64, generator=g) for i in range(8)}
        save_file(state, str(work / "small.safetensors"))
        save_file({k: v + 0.01 for k, v in state.items()}, str(work / "small2.safetensors"))
        table: dict[str, dict[str, dict[str, float]]] = {}
        for src in srcs:
            env = dict(os.environ, PYTHONPATH=str(src.resolve()), OMP_NUM_THREADS="1", TVEDIT_CACHE=str(work / "cache"), TVEDIT_SCRATCH=str(work / "scratch"))
            for name, cmd in commands(work):
                runs = [measure(cmd, env) for _ in range(args.repeat)]
                row = {"wall_s": statistics.median(r["wall_s"] for r in runs), "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs)}
                table.setdefault(name, {})[str(src)] = row
                print(json.dumps({"src": str(src), "command": name, **row}))
    print(f"\n| command | {' | '.join(f'{s} s / MiB' for s in srcs)} |", file=sys.stderr)
    print("|---|" + "---|" * len(srcs), file=sys.stderr)
    for name, per in table.items():
        cells = " | ".join(f"{per[str(s)]['wall_s']:.2f} / {per[str(s)]['peak_rss_mib']:.0f}" for s in srcs)
        print(f"| {name} | {cells} |", file=sys.stderr)


if __name__ == "__main__":
    main()
