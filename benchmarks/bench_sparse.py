"""Benchmark sparse task-vector and mask files written by `tvedit mask` (tvedit.masking).

Generates one random task vector (float32, and a bfloat16 copy) of --mparams million entries in
tensors of --cols columns, stores it dense, then masks it with each method at each density and
reports, measured in this one run:

* size ratio: the sparse task-vector file / the dense task-vector file of the same dtype (targets:
  <= 20% at density 0.1, <= 3% at density 0.01, float32 and bfloat16);
* mask ratio: the bit-packed mask file / the same mask stored as plain bool tensors (1 byte/entry);
* the wall time of the masking call (library, in process: file read, mask, sparse write).

Prints a table and one JSON line. Usage:

    python benchmarks/bench_sparse.py --mparams 4 --densities 0.1,0.01 --workdir bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tvedit.manifest import Manifest
from tvedit.masking import mask
from tvedit.writer import save_tensors

TARGETS = {0.1: 0.20, 0.01: 0.03}  # for float32 and bfloat16 alike
METHODS = (("topk", {}), ("topk", {"scope": "global"}), ("dare", {"seed": 0}), ("breadcrumbs", {}))


def make_vector(mparams: float, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    total = int(mparams * 1_000_000)
    rows = 1024
    out: dict[str, torch.Tensor] = {}
    i = 0
    while total > 0:
        r = min(rows, max(1, total // cols))
        out[f"layer.{i:03d}.weight"] = torch.randn(r, cols, generator=g) * 1e-3
        out[f"layer.{i:03d}.bias"] = torch.randn(r, generator=g) * 1e-3
        total -= r * cols + r
        i += 1
    return out


def run(mparams: float, cols: int, densities: list[float], workdir: Path) -> dict:
    rows = []
    tau = make_vector(mparams, cols)
    numel = sum(t.numel() for t in tau.values())
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        dense = save_tensors(workdir / f"tv.{name}.safetensors", {k: v.to(dtype) for k, v in tau.items()}, Manifest(kind="task-vector"), layout="dense")
        dense_size = dense.path.stat().st_size
        for method, extra in METHODS if dtype == torch.float32 else METHODS[:1]:
            for density in densities:
                label = method + ("-global" if extra.get("scope") == "global" else "")
                out = workdir / f"{label}.{name}.{density}.safetensors"
                mpath = workdir / f"{label}.{name}.{density}.mask.safetensors"
                t0 = time.perf_counter()
                res = mask(method, [dense.path], out, options={"density": density, **extra}, save_mask=mpath)
                wall = time.perf_counter() - t0
                ratio = out.stat().st_size / dense_size
                mask_ratio = mpath.stat().st_size / numel
                target = TARGETS.get(density)
                rows.append({
                    "method": label, "dtype": name, "density": density, "kept": res.outputs[0].manifest.density,
                    "size_ratio": ratio, "target": target, "ok": None if target is None else ratio <= target,
                    "mask_ratio_vs_bool": mask_ratio, "wall_s": wall,
                })  # fmt: skip
                out.unlink()
                mpath.unlink()
        dense.path.unlink()
    return {
        "benchmark": "sparse", "params": numel, "cols": cols,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "rows": rows,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mparams", type=float, default=4.0, help="million entries in the task vector")
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--densities", default="0.1,0.01")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tvedit-bench-sparse-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.mparams, args.cols, [float(x) for x in args.densities.split(",")], workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{result['params']:,} entries; {result['machine']}")
    print(f"{'method':<14}{'dtype':<10}{'density':>8}{'kept':>9}{'file/dense':>12}{'target':>8}{'mask/bool':>11}{'wall s':>8}")
    for r in result["rows"]:
        target = "" if r["target"] is None else f"{r['target']:.0%}"
        print(f"{r['method']:<14}{r['dtype']:<10}{r['density']:>8}{r['kept']:>9.4f}{r['size_ratio']:>12.2%}{target:>8}{r['mask_ratio_vs_bool']:>11.2%}{r['wall_s']:>8.2f}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
