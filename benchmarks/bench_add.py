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
* startup: `python -c "import torch, tvedit.arith"`, the fixed cost inside every tvedit figure;
* naive:  safetensors.torch.load_file for every input, sum, save_file (skipped when it would need
          more than half of this machine's memory).
* with --verify: the fine-tuned checkpoints extracted once to dense task vectors (their manifests
          record their content hashes), then `tvedit add TV... --alpha 0.3` without and with
          --verify-inputs, alternated twice, the faster of each kept: what verifying the inputs'
          recorded hashes while streaming costs.

Prints a table and one JSON object per size. Usage:

    python benchmarks/bench_add.py --sizes 1,4 --inputs 8 --workdir bench-out

``--methods all`` measures, in the same run, peak RSS and time for every method that streams: each
``mask`` method (on task vectors extracted from the fine-tunes; the mask algebra on masks that
``topk --save-mask`` wrote), each ``add`` method (dare-ties with rescale=l1 included; not the SVD
merges, see bench_svd.py) and each mergekit recipe method, with time / floor where floor is the
I/O floor of that command's bytes (bytes read once + bytes written) at the rate the measured floor
run achieved. The first-use row (input hashes not cached) against the cached run is in the main table.
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
    shape = (numel // COLUMNS, COLUMNS) if numel % COLUMNS == 0 else (numel,)  # matrices with rows of 8192 (rows matter to breadcrumbs, della)
    base = {f"blocks.{i:04d}.weight": torch.randn(shape, generator=g) for i in range(n_tensors)}
    save_file(base, str(base_path))
    for j, p in enumerate(paths):
        save_file({k: v + 0.001 * (j + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(p))
    del base
    return base_path, paths


COLUMNS = 8192


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
        ("startup", [sys.executable, "-c", "import torch, tvedit.arith"]),  # fixed cost: interpreter + torch import
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
        "model_bytes": size,
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


MASK_METHODS = [
    ("mask topk", ["topk", "--density", "0.1"]),
    ("mask topk global", ["topk", "--density", "0.1", "--scope", "global"]),
    ("mask dare", ["dare", "--density", "0.1"]),
    ("mask dare l1", ["dare", "--density", "0.1", "--rescale", "l1"]),
    ("mask breadcrumbs", ["breadcrumbs", "--density", "0.1"]),
    ("mask breadcrumbs tensor", ["breadcrumbs", "--density", "0.1", "--scope", "tensor"]),
    ("mask tall", ["tall"]),
    ("mask consensus", ["consensus"]),
    ("mask apply", ["apply"]),
    ("mask invert", ["invert"]),
    ("mask intersect", ["intersect"]),
    ("mask union", ["union"]),
]
ADD_METHODS = [
    ("add sum", []),
    ("add mean", ["--method", "mean"]),
    ("add ties", ["--method", "ties"]),
    ("add ties global", ["--method", "ties", "--option", "scope=global"]),
    ("add dare-ties", ["--method", "dare-ties"]),
    ("add dare-ties l1", ["--method", "dare-ties", "--option", "rescale=l1"]),
    ("add consensus", ["--method", "consensus"]),
]
RECIPES = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def _recipe(dir: Path, method: str, base: Path, fts: list[Path]) -> Path:
    extra = {"gamma": 0.01} if method.startswith("breadcrumbs") else {"epsilon": 0.05} if method.startswith("della") else {}
    models = [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3, **extra}} for p in fts]
    path = dir / f"{method}.yml"
    path.write_text(json.dumps({"merge_method": method, "base_model": str(base), "models": models}))  # JSON is YAML
    return path


def run_methods(gib: float, n_inputs: int, tensor_mib: int, workdir: Path, floor: dict, floor_bytes: int) -> list[dict]:
    """Every streaming method once: peak RSS, wall time, and time over the I/O floor of its bytes."""
    dir = workdir / f"{gib:g}gib"
    base, fts = generate(dir, gib, n_inputs, tensor_mib)
    env = dict(os.environ, TVEDIT_CACHE=str(dir / "cache"))
    tv = [sys.executable, "-m", "tvedit"]
    rate = floor_bytes / floor["wall_s"]  # bytes per second the floor moved
    vdir = dir / "vectors"
    subprocess.run([*tv, "extract", *map(str, fts[:2]), "--base", str(base), "--out-dir", str(vdir), "--layout", "dense", "--force"], env=env, check=True, capture_output=True)
    vectors = sorted(vdir.glob("*.safetensors"))
    masks = [dir / "m0.safetensors", dir / "m1.safetensors"]
    for v, m in zip(vectors, masks, strict=True):  # the masks of the mask algebra (and of apply)
        subprocess.run([*tv, "mask", "topk", str(v), "--density", "0.3", "-o", str(dir / "t.safetensors"), "--save-mask", str(m), "--force"], env=env, check=True, capture_output=True)
    out = dir / "out.safetensors"
    rows = []

    def measure_row(name: str, cmd: list[str], read: list[Path], written: Path) -> None:
        shutil.rmtree(written, ignore_errors=True) if written.is_dir() else written.unlink(missing_ok=True)
        r = measure(cmd, env)
        nbytes = sum(p.stat().st_size for p in read) + (sum(f.stat().st_size for f in written.rglob("*")) if written.is_dir() else written.stat().st_size)
        rows.append({"method": name, **r, "floor_s": nbytes / rate, "over_floor": r["wall_s"] / (nbytes / rate)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    for name, args in MASK_METHODS:
        if args[0] in ("invert", "intersect", "union"):
            inputs = masks[:1] if args[0] == "invert" else masks
        else:
            inputs = vectors if args[0] in ("tall", "consensus") else vectors[:1]
        extra = ["--mask", str(masks[0])] if args[0] == "apply" else []
        many = len(inputs) > 1 and args[0] not in ("intersect", "union")
        target = ["--out-dir", str(dir / "mout")] if many else ["-o", str(out)]
        measure_row(name, [*tv, "mask", args[0], *map(str, inputs), *args[1:], *extra, *target, "--force"],
                    inputs + (masks[:1] if extra else []), dir / "mout" if many else out)  # fmt: skip
    for name, args in ADD_METHODS:
        measure_row(name, [*tv, "add", *map(str, fts), "--base", str(base), "--alpha", "0.3", *args, "-o", str(out), "--force"], [*fts, base], out)
    for method in RECIPES:
        recipe = _recipe(dir, method, base, fts)
        measure_row(f"mergekit {method}", [*tv, "add", str(recipe), "-o", str(out), "--force"], [*fts, base], out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="model sizes in GiB, comma-separated")
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--tensor-mib", type=int, default=64, help="size of each tensor (the largest tensor)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (needs root)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--verify", action="store_true", help="also measure add over task vectors without and with --verify-inputs")
    ap.add_argument("--methods", choices=["sum", "all"], default="sum",
                    help="all: also every mask, add and mergekit recipe method (peak RSS, time / floor)")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {total_ram_gib():.0f} GiB RAM, torch {torch.__version__}", file=sys.stderr)
    rows = []
    try:
        for gib in (float(s) for s in args.sizes.split(",")):
            t = time.perf_counter()
            summary = run(gib, args.inputs, args.tensor_mib, args.workdir, args.cold, args.verify)
            print(json.dumps(summary), file=sys.stderr, flush=True)  # kept if the methods' runs are cut short
            if args.methods == "all":
                floor_bytes = (args.inputs + 2) * summary["model_bytes"]  # the floor read base + inputs and wrote one model
                summary["methods"] = run_methods(gib, args.inputs, args.tensor_mib, args.workdir, summary["results"]["floor"], floor_bytes)
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
    for r in rows:
        if "methods" not in r:
            continue
        res = r["results"]
        print(f"\n{r['model_gib']:.2f} GiB, {r['inputs']} inputs, tensors of {r['largest_tensor_mib']} MiB: first use "
              f"{res['tvedit_first_use']['wall_s']:.1f} s vs cached {res['tvedit']['wall_s']:.1f} s "
              f"({res['tvedit_first_use']['wall_s'] / res['tvedit']['wall_s']:.2f}x)", file=sys.stderr)  # fmt: skip
        print("| method | peak RSS MiB | time s | floor s | time / floor |", file=sys.stderr)
        print("|---|---|---|---|---|", file=sys.stderr)
        for m in r["methods"]:
            print(f"| {m['method']} | {m['peak_rss_mib']:.0f} | {m['wall_s']:.1f} | {m['floor_s']:.1f} | {m['over_floor']:.2f}x |", file=sys.stderr)


if __name__ == "__main__":
    main()
