"""First use (input hashes not cached: sha256 of every input byte while streaming) against the
cached run of the same `add`, in one process (no interpreter or torch start-up in either figure).

θ0 + 2 fine-tuned float32 checkpoints of 512 MiB (four 4096 x 8192 tensors each), page cache warm;
runs alternate first use / cached, and the minimum of each is compared. Usage:

    python benchmarks/bench_first_use.py [--workdir DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-first-use"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    d = args.workdir
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / "base.safetensors", d / "ft0.safetensors", d / "ft1.safetensors"]
    if not all(p.exists() for p in paths):
        g = torch.Generator().manual_seed(0)
        base = {f"w{i}": torch.randn(4096, 8192, generator=g) for i in range(4)}
        save_file(base, str(paths[0]))
        for p in paths[1:]:
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(p))
        del base
    from tvedit import arith

    times: dict[str, list[float]] = {"first": [], "cached": []}
    for _ in range(args.repeats):
        for kind in ("first", "cached"):
            if kind == "first":
                shutil.rmtree(d / "cache", ignore_errors=True)
            os.environ["TVEDIT_CACHE"] = str(d / "cache")
            t = time.perf_counter()
            arith.add(paths[1:], arith.OutputTarget(output=d / "out.safetensors", force=True), base=paths[0], alpha=0.3)
            times[kind].append(time.perf_counter() - t)
            print(kind, round(times[kind][-1], 2), flush=True)
    first, cached = min(times["first"]), min(times["cached"])
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: first use {first:.1f} s, cached {cached:.1f} s, {first / cached:.2f}x")


if __name__ == "__main__":
    main()
