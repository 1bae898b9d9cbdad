"""tvedit's TSV-M and Iso-C against FusionBench's own functions, side by side on the same files.

Writes --inputs task vectors of --tensors float32 matrices of --dim x --dim (default 8 x twelve
1024 x 1024, random normal x 1e-3), then runs in fresh processes, each measured for wall time, CPU
time (user + system) and peak RSS (benchmarks/_measure.py), all with the same OMP_NUM_THREADS
(default 1):

* tvedit: `tvedit add VECTORS --method tsv|iso-c --emit vector --layout dense -o OUT` (the whole
  command: start-up, reading, hashing, the merge, the durable write);
* FusionBench: a script that loads the same files (safetensors.torch.load_file), calls
  `compute_and_sum_svd_mem_reduction` (method/task_singular_vector/utils/TSVM_utils.py) or `iso_c`
  (method/isotropic_merging/iso_utils.py) with accelerator="cpu", and saves the result
  (safetensors.torch.save_file). FusionBench's package __init__ imports its CLI dependencies
  (omegaconf, hydra, lightning, ...), so the script loads those two files by path, with stand-ins
  for the two names they import from fusion_bench.utils (timeit_context, StateDictType). Install
  it with `pip install --no-deps fusion-bench`; without it the FusionBench rows are skipped.

Prints a table, the ratios tvedit / FusionBench (wall, CPU, peak RSS) measured in this one run, the
relative error ||tvedit - FusionBench||_F / ||FusionBench||_F over all tensors, and one JSON line.

    python benchmarks/bench_svd_peer.py --inputs 8 --tensors 12 --dim 1024
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402

from tvedit.manifest import Manifest  # noqa: E402
from tvedit.writer import save_tensors  # noqa: E402

PEER_FILES = {"tsv": "method/task_singular_vector/utils/TSVM_utils.py", "iso-c": "method/isotropic_merging/iso_utils.py"}

PEER = r"""
import contextlib, importlib.util, os, sys, types, typing
import torch
from safetensors.torch import load_file, save_file
source, method, out, *paths = sys.argv[1:]
fb = types.ModuleType("fusion_bench"); fb.__path__ = []
utils = types.ModuleType("fusion_bench.utils"); utils.__path__ = []
utils.timeit_context = lambda *a, **k: contextlib.nullcontext()
typ = types.ModuleType("fusion_bench.utils.type"); typ.StateDictType = typing.Dict[str, torch.Tensor]
sys.modules.update({"fusion_bench": fb, "fusion_bench.utils": utils, "fusion_bench.utils.type": typ})
spec = importlib.util.spec_from_file_location("peer", source)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
tvs = [load_file(p) for p in paths]
with contextlib.redirect_stdout(sys.stderr):  # it prints a line per key
    merged = mod.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu") if method == "tsv" else mod.iso_c(tvs, accelerator="cpu")
save_file({k: v.contiguous() for k, v in merged.items()}, out)
"""


def fusion_bench_root() -> Path | None:
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if all((root / f).is_file() for f in PEER_FILES.values()) else None


def write_vectors(workdir: Path, n: int, tensors: int, dim: int) -> list[Path]:
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tau = {f"layer{j}.weight": torch.randn(dim, dim, generator=g) * 1e-3 for j in range(tensors)}
        paths.append(workdir / f"tv{i}.safetensors")
        save_tensors(paths[-1], tau, Manifest(kind="task-vector"), layout="dense")
    return paths


def rel_error(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    num = sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in y)
    den = sum(float(y[k].double().pow(2).sum()) for k in y)
    return (num / den) ** 0.5


def run(n: int, tensors: int, dim: int, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    vecs = write_vectors(workdir, n, tensors, dim)
    root = fusion_bench_root()
    rows, ratios = [], {}
    for method in PEER_FILES:
        mine = workdir / f"tvedit.{method}.safetensors"
        m = measure([sys.executable, "-m", "tvedit", "add", *map(str, vecs), "--method", method, "--emit", "vector", "--layout", "dense", "-o", str(mine), "--force"], env)
        rows.append({"what": f"tvedit add --method {method}", **m})
        if root is None:
            continue
        peer = workdir / f"fusionbench.{method}.safetensors"
        p = measure([sys.executable, "-c", PEER, str(root / PEER_FILES[method]), method, str(peer), *map(str, vecs)], env)
        rows.append({"what": f"FusionBench {method}", **p})
        ratios[method] = {
            "wall": m["wall_s"] / p["wall_s"], "cpu": m["cpu_s"] / p["cpu_s"], "peak_rss": m["peak_rss_mib"] / p["peak_rss_mib"],
            "rel_error": rel_error(mine, peer),
        }  # fmt: skip
    return {
        "benchmark": "svd-peer", "inputs": n, "tensors": tensors, "dim": dim, "fusion_bench": str(root) if root else None,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
        "rows": rows, "ratios": ratios,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--tensors", type=int, default=12)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tvedit-bench-svd-peer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.inputs, args.tensors, args.dim, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{result['inputs']} inputs x {result['tensors']} tensors of {result['dim']}x{result['dim']} float32; {result['machine']}")
    if result["fusion_bench"] is None:
        print("FusionBench not installed (pip install --no-deps fusion-bench): its rows are skipped")
    print(f"{'what':<32}{'wall s':>8}{'cpu s':>8}{'peak MiB':>10}")
    for r in result["rows"]:
        print(f"{r['what']:<32}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['peak_rss_mib']:>10.0f}")
    for method, r in result["ratios"].items():
        print(f"{method}: tvedit / FusionBench {r['wall']:.2f}x wall, {r['cpu']:.2f}x cpu, {r['peak_rss']:.2f}x peak RSS; relative error {r['rel_error']:.1e}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
