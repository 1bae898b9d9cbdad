"""Benchmark `tvedit add` against a naive load-everything baseline and the I/O floor.

For each model size it generates a base and N fine-tuned checkpoints (plain safetensors, float32,
tensors of at most --tensor-mib), then measures in fresh processes, in one run:

* floor:  read every input once (16 MiB positional reads into one reused buffer) and write an
          output-sized file: the least any implementation must do;
* tvedit first use: `tvedit add FT... --base BASE --alpha 0.3 -o OUT` (streams tensor by tensor)
          with an empty hash cache: the inputs are plain safetensors files without a recorded hash, so
          tvedit reads each once more to hash it for the provenance (cached afterwards);
* tvedit: the same command again, the input hashes cached (files tvedit wrote carry their hash);
* tvedit whole tensors: the same with TVEDIT_CHUNK_MIB=65536, i.e. without splitting tensors larger
          than the chunk (2 MiB by default) into chunks: what the chunked path saves;
* floor + hash: the same, also computing the sha256 of the bytes written (tvedit records the
          output's content hash in its manifest: the least tvedit itself must do);
* floor + fsync: the same, then fsync the output and its directory as tvedit does before reporting
          success (docs/outputs.md); the difference is what durability costs (the floor is run twice
          around it and the faster run is kept: the first may pay for writing back the inputs);
* startup: `python -c "import torch, tvedit.api"`, the fixed cost inside every tvedit figure;
* naive:  safetensors.torch.load_file for every input, sum, save_file (skipped when it would need
          more than half of this machine's memory).
* with --verify: the fine-tuned checkpoints extracted once to dense task vectors (their manifests
          record their content hashes), then `tvedit add TV... --alpha 0.3` without and with
          --verify-inputs, alternated twice, the faster of each kept: what verifying the inputs'
          recorded hashes while streaming costs.

Prints a table and one JSON object per size. Usage:

    python benchmarks/bench_add.py --sizes 1,4 --inputs 8 --workdir bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import FLOOR, measure  # noqa: E402

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
paths, base_path, out = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
base = load_file(base_path)
fts = [load_file(p) for p in paths]
merged = {k: (v.float() + 0.3 * sum(ft[k].float() - v.float() for ft in fts)).to(v.dtype) for k, v in base.items()}
save_file(merged, out)
"""


def generate(dir: Path, gib: float, n_inputs: int, tensor_mib: int) -> tuple[Path, list[Path]]:
    dir.mkdir(parents=True, exist_ok=True)
    numel = tensor_mib * (1 << 20) // 4
    n_tensors = max(1, int(gib * 1024 / tensor_mib))
    base_path = dir / "base.safetensors"
    paths = [dir / f"ft{i}.safetensors" for i in range(n_inputs)]
    if base_path.exists() and all(p.exists() for p in paths):
        return base_path, paths
    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i:04d}.weight": torch.randn(numel, generator=g) for i in range(n_tensors)}
    save_file(base, str(base_path))
    for j, p in enumerate(paths):
        save_file({k: v + 0.001 * (j + 1) for k, v in base.items()}, str(p))
    del base
    return base_path, paths


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def total_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def run(gib: float, n_inputs: int, tensor_mib: int, workdir: Path, cold: bool, verify: bool = False) -> dict:
    dir = workdir / f"{gib:g}gib"
    base, fts = generate(dir, gib, n_inputs, tensor_mib)
    out = dir / "out.safetensors"
    size = base.stat().st_size
    shutil.rmtree(dir / "cache", ignore_errors=True)
    env = dict(os.environ, TVEDIT_CACHE=str(dir / "cache"))
    inputs = [str(p) for p in [*fts, base]]
    results: dict[str, dict] = {}
    tvedit = [sys.executable, "-m", "tvedit", "add", *map(str, fts), "--base", str(base), "--alpha", "0.3", "-o", str(out), "--force"]
    plan = [
        ("floor", [sys.executable, "-c", FLOOR, *inputs, str(out), str(size), "-"]),
        ("floor_fsync", [sys.executable, "-c", FLOOR, *inputs, str(out), str(size), "fsync"]),
        ("floor_again", [sys.executable, "-c", FLOOR, *inputs, str(out), str(size), "-"]),  # the first run may pay for writeback of the inputs
        ("floor_hash", [sys.executable, "-c", FLOOR, *inputs, str(out), str(size), "hash"]),  # + the sha256 of the output that the manifest needs
        ("startup", [sys.executable, "-c", "import torch, tvedit.api"]),  # fixed cost: interpreter + torch import
        ("tvedit_first_use", tvedit),
        ("tvedit", tvedit),
    ]
    naive_fits = (n_inputs + 3) * gib < total_ram_gib() / 2
    if naive_fits:
        plan.append(("naive", [sys.executable, "-c", NAIVE, *map(str, fts), str(base), str(out)]))
    plan.append(("tvedit_whole_tensors", tvedit))
    for name, cmd in plan:
        if cold:
            drop_caches()
        if out.exists():
            out.unlink()
        results[name] = measure(cmd, dict(env, TVEDIT_CHUNK_MIB="65536") if name == "tvedit_whole_tensors" else env)
    if verify:
        tv = dir / "tv"
        subprocess.run([sys.executable, "-m", "tvedit", "extract", *map(str, fts), "--base", str(base), "--out-dir", str(tv),
                        "--layout", "dense", "--force", "--json"], env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        add_tv = [sys.executable, "-m", "tvedit", "add", *sorted(map(str, tv.glob("*.safetensors"))), "--alpha", "0.3", "-o", str(out), "--force"]
        runs: dict[str, list[dict]] = {"tvedit_vectors": [], "tvedit_vectors_verify": []}
        for _ in range(2):
            for name, extra in (("tvedit_vectors", []), ("tvedit_vectors_verify", ["--verify-inputs"])):
                runs[name].append(measure([*add_tv, *extra], env))
        for name, rs in runs.items():
            results[name] = min(rs, key=lambda r: r["wall_s"])
    floor = min(results.pop("floor"), results.pop("floor_again"), key=lambda r: r["wall_s"])
    results["floor"] = floor
    summary = {
        "model_gib": round(size / (1 << 30), 3),
        "inputs": n_inputs,
        "largest_tensor_mib": tensor_mib,
        "cold_cache": cold,
        "results": results,
        "tvedit_over_floor_time": results["tvedit"]["wall_s"] / floor["wall_s"],
        "tvedit_minus_startup_over_floor_time": (results["tvedit"]["wall_s"] - results["startup"]["wall_s"]) / floor["wall_s"],
        "tvedit_minus_startup_over_floor_hash_time": (results["tvedit"]["wall_s"] - results["startup"]["wall_s"]) / results["floor_hash"]["wall_s"],
        "tvedit_first_use_over_floor_time": results["tvedit_first_use"]["wall_s"] / floor["wall_s"],
        "fsync_cost_s": results["floor_fsync"]["wall_s"] - floor["wall_s"],
        "tvedit_rss_minus_floor_mib": results["tvedit"]["peak_rss_mib"] - floor["peak_rss_mib"],
    }
    if verify:
        summary["verify_inputs_cost_s"] = results["tvedit_vectors_verify"]["wall_s"] - results["tvedit_vectors"]["wall_s"]
    if "naive" in results:
        summary["naive_over_tvedit_time"] = results["naive"]["wall_s"] / results["tvedit"]["wall_s"]
        summary["naive_over_tvedit_rss"] = results["naive"]["peak_rss_mib"] / results["tvedit"]["peak_rss_mib"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="model sizes in GiB, comma-separated")
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--tensor-mib", type=int, default=64, help="size of each tensor (the largest tensor)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (needs root)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--verify", action="store_true", help="also measure add over task vectors without and with --verify-inputs")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {total_ram_gib():.0f} GiB RAM, torch {torch.__version__}", file=sys.stderr)
    rows = []
    try:
        for gib in (float(s) for s in args.sizes.split(",")):
            t = time.perf_counter()
            summary = run(gib, args.inputs, args.tensor_mib, args.workdir, args.cold, args.verify)
            summary["bench_total_s"] = time.perf_counter() - t
            print(json.dumps(summary))
            rows.append(summary)
            if not args.keep:
                shutil.rmtree(args.workdir / f"{gib:g}gib", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print("\n| model | inputs | I/O floor s / MiB | floor + hash s | start-up s | tvedit s / MiB | tvedit first use s | whole tensors s / MiB | naive s / MiB "
          "| (tvedit - start-up) / floor | (tvedit - start-up) / (floor + hash) | fsync s |", file=sys.stderr)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        res = r["results"]
        naive = f"{res['naive']['wall_s']:.1f} / {res['naive']['peak_rss_mib']:.0f}" if "naive" in res else "skipped (would not fit)"
        print(
            f"| {r['model_gib']:.2f} GiB | {r['inputs']} | {res['floor']['wall_s']:.1f} / {res['floor']['peak_rss_mib']:.0f} "
            f"| {res['floor_hash']['wall_s']:.1f} | {res['startup']['wall_s']:.1f} "
            f"| {res['tvedit']['wall_s']:.1f} / {res['tvedit']['peak_rss_mib']:.0f} | {res['tvedit_first_use']['wall_s']:.1f} "
            f"| {res['tvedit_whole_tensors']['wall_s']:.1f} / {res['tvedit_whole_tensors']['peak_rss_mib']:.0f} "
            f"| {naive} | {r['tvedit_minus_startup_over_floor_time']:.2f}x | {r['tvedit_minus_startup_over_floor_hash_time']:.2f}x | {r['fsync_cost_s']:.2f} |",
            file=sys.stderr,
        )
    if args.verify:
        print("\n| model | inputs (task vectors) | add s / MiB | add --verify-inputs s / MiB | cost s |\n|---|---|---|---|---|", file=sys.stderr)
        for r in rows:
            a, v = r["results"]["tvedit_vectors"], r["results"]["tvedit_vectors_verify"]
            print(f"| {r['model_gib']:.2f} GiB | {r['inputs']} | {a['wall_s']:.2f} / {a['peak_rss_mib']:.0f} | {v['wall_s']:.2f} / {v['peak_rss_mib']:.0f} "
                  f"| {r['verify_inputs_cost_s']:+.2f} |", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
