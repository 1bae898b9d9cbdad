"""Benchmark `tvedit add RECIPE.yml` against mergekit's `mergekit-yaml` on the same merge (CPU).

For each hidden size it writes a base and 3 fine-tuned Llama-shaped HF directories (bench_hf.py's
generator: 8 layers, bfloat16, sharded) and one mergekit recipe per method (every model weight
--weight, density --density for the sparsifying methods, `dtype: float32`, `out_dtype: bfloat16`),
then measures, each in a fresh process, in one run (wall time and peak RSS, benchmarks/_measure.py):

* mergekit:        `mergekit-yaml RECIPE OUT --lazy-unpickle --no-copy-tokenizer --quiet
                   --random-seed 0` (mergekit's defaults otherwise: CPU, no async write, output
                   shards of 5B parameters, i.e. the whole output is collected in memory first);
* mergekit shards: the same with `--out-shard-size 50M` (50M bf16 parameters = 100 MB shards);
* tvedit:          `tvedit add RECIPE -o OUT/` (tvedit runs mergekit recipes natively,
                   docs/mergekit.md; default shard size, which asks transformers for its default);
* tvedit 100MB:    the same with `--max-shard-size 100MB` (transformers is not imported);
* start-up:        `python -c "import torch"`, `python -c "import torch, tvedit.arith"` and, in
                   mergekit's interpreter, `python -c "import torch, mergekit.merge"`.

The input hashes are cached by one tvedit run before the timed runs (a first use hashes the plain
inputs; its time is printed as "first use"). The outputs are compared tensor by tensor: max |Δ| and
the fraction of differing entries (task_arithmetic and ties are deterministic: expect bf16
rounding; dare_ties draws random masks, mergekit from torch's global RNG, so its outputs are not
expected to agree).

mergekit is not a tvedit dependency; install it in its own virtual environment, e.g. one that reuses
this project's torch (see docs/performance.md), and pass its executable with --mergekit. Without it
the benchmark is skipped.

Usage: python benchmarks/bench_mergekit.py [--hidden 512,1024] [--methods task_arithmetic,ties,dare_ties]
                                           [--mergekit /path/to/mergekit-yaml] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402
from bench_hf import write_model  # noqa: E402

SRC = Path(__file__).resolve().parent.parent / "src"
MK_FLAGS = ["--lazy-unpickle", "--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
MK_SHARDS = ["--out-shard-size", "50M"]
TV_SHARDS = ["--max-shard-size", "100MB"]


def recipe(path: Path, method: str, base: Path, fts: list[Path], weight: float, density: float) -> Path:
    """A mergekit YAML file (written as JSON, which is YAML) with absolute model paths."""
    params = {"weight": weight} if method == "task_arithmetic" else {"weight": weight, "density": density}
    body = {"merge_method": method, "base_model": str(base.resolve()), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(d.resolve()), "parameters": params} for d in fts]}  # fmt: skip
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def tensors(d: Path) -> dict[str, tuple[str, str]]:
    """{key: (file, key)} over every safetensors file of an output directory."""
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({k: (str(p), k) for k in f.keys()})
    return out


def compare(a: Path, b: Path) -> dict[str, float]:
    """Max |a - b| over every tensor, the fraction of entries that differ, and the key sets."""
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return {"same_keys": False, "only_a": sorted(set(ta) - set(tb))[:5], "only_b": sorted(set(tb) - set(ta))[:5]}
    worst, worst_key, differ, total = 0.0, "", 0, 0
    for k in sorted(ta):
        with safe_open(ta[k][0], "pt") as fa, safe_open(tb[k][0], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"same_keys": True, "mismatch": k, "a": f"{x.dtype}{tuple(x.shape)}", "b": f"{y.dtype}{tuple(y.shape)}"}
        d = (x.float() - y.float()).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > worst:
            worst, worst_key = m, k
        differ += int((d > 0).sum())
        total += d.numel()
    return {"same_keys": True, "max_abs_diff": worst, "worst_key": worst_key, "differ_frac": differ / max(total, 1), "dtype": str(x.dtype)}


def median_run(cmd: list[str], env: dict[str, str], repeat: int, out: Path | None = None) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        runs.append(measure(cmd, env))
    return {"wall_s": statistics.median(r["wall_s"] for r in runs), "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs)}


def interpreter_of(exe: str) -> str:
    """The Python interpreter named by a console script's #! line (mergekit lives in its own venv)."""
    first = Path(exe).read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def versions(python: str, dists: list[str]) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys\nprint(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    out = subprocess.run([python, "-c", code, *dists], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="512,1024", help="comma-separated hidden sizes (one model size each)")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable (default: on PATH)")
    ap.add_argument("--weight", type=float, default=0.3, help="every model's weight (task_arithmetic)")
    ap.add_argument("--ties-weight", type=float, default=1.0, help="every model's weight (ties, dare_ties)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=1, help="runs per command (median)")
    ap.add_argument("--workdir", default="bench-mergekit")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    args = ap.parse_args()
    if not args.mergekit or not Path(args.mergekit).exists():
        print("SKIPPED: mergekit-yaml not found (not a tvedit dependency). Install it in its own venv "
              "(docs/performance.md, 'tvedit vs mergekit') and pass --mergekit /path/to/mergekit-yaml.")  # fmt: skip
        return
    mk_python = interpreter_of(args.mergekit)
    work = Path(args.workdir)
    env = dict(os.environ, TVEDIT_CACHE=str((work / "cache").resolve()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    tv = [sys.executable, "-m", "tvedit", "add"]
    startup = {
        "import torch": measure([sys.executable, "-c", "import torch"], env),
        "import torch, tvedit.arith": measure([sys.executable, "-c", "import torch, tvedit.arith"], env),
        "import torch, tvedit.arith, transformers": measure([sys.executable, "-c", "import torch, tvedit.arith, transformers"], env),
        "mergekit: import torch, mergekit.merge": measure([mk_python, "-c", "import torch, mergekit.merge"], env),
    }
    rows = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        root = work / f"h{hidden}"
        base = root / "base"
        nbytes = write_model(base, hidden, 0)
        fts = [root / f"ft{i}" for i in range(3)]
        for i, d in enumerate(fts):
            write_model(d, hidden, i + 1)
        first = None
        for method in args.methods.split(","):
            weight = args.weight if method == "task_arithmetic" else args.ties_weight
            rec = recipe(root / f"{method}.yml", method, base, fts, weight, args.density)
            outs = {name: root / f"out-{method}-{name}" for name in ("mergekit", "mergekit_shards", "tvedit", "tvedit_100mb")}
            cmds = {
                "mergekit": [args.mergekit, str(rec), str(outs["mergekit"]), *MK_FLAGS],
                "mergekit_shards": [args.mergekit, str(rec), str(outs["mergekit_shards"]), *MK_FLAGS, *MK_SHARDS],
                "tvedit": [*tv, str(rec), "-o", f"{outs['tvedit']}/", "--force"],
                "tvedit_100mb": [*tv, str(rec), "-o", f"{outs['tvedit_100mb']}/", "--force", *TV_SHARDS],
            }
            if first is None:  # hash the plain inputs once (cached for every later tvedit run)
                first = measure(cmds["tvedit"], env)
            res = {name: median_run(cmd, env, args.repeat, outs[name]) for name, cmd in cmds.items()}
            agree = compare(outs["tvedit"], outs["mergekit"])
            row = {"hidden": hidden, "model_mib": round(nbytes / 2**20, 1), "method": method, "weight": weight,
                   "density": None if method == "task_arithmetic" else args.density,
                   **{f"{n}_s": r["wall_s"] for n, r in res.items()}, **{f"{n}_mib": r["peak_rss_mib"] for n, r in res.items()},
                   "tvedit_first_use_s": first["wall_s"],
                   "ratio_s": res["tvedit"]["wall_s"] / res["mergekit"]["wall_s"],
                   "ratio_mib": res["tvedit"]["peak_rss_mib"] / res["mergekit"]["peak_rss_mib"],
                   "ratio_shards_s": res["tvedit_100mb"]["wall_s"] / res["mergekit_shards"]["wall_s"],
                   "ratio_shards_mib": res["tvedit_100mb"]["peak_rss_mib"] / res["mergekit_shards"]["peak_rss_mib"],
                   "agreement": agree}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                for d in outs.values():
                    shutil.rmtree(d, ignore_errors=True)
    info = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "OMP_NUM_THREADS": env["OMP_NUM_THREADS"],
        "tvedit_python": sys.executable, "tvedit_versions": versions(sys.executable, ["torch", "safetensors", "transformers"]),
        "mergekit": args.mergekit, "mergekit_versions": versions(mk_python, ["mergekit", "torch", "safetensors", "transformers"]),
        "mergekit_flags": " ".join(MK_FLAGS), "mergekit_shards_flags": " ".join(MK_FLAGS + MK_SHARDS),
        "tvedit_flags": "-o OUT/ --force", "tvedit_100mb_flags": "-o OUT/ --force " + " ".join(TV_SHARDS),
        "startup": startup,
    }  # fmt: skip
    print(f"\nmachine: {info['machine']}, torch {torch.__version__}, mergekit {info['mergekit_versions'].get('mergekit')}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")  # fmt: skip
    print(f"mergekit flags: {info['mergekit_flags']}; 'shards' adds {' '.join(MK_SHARDS)}; tvedit '100MB' adds {' '.join(TV_SHARDS)}")
    print("| model (bf16, 8 layers) | method | mergekit s / MiB | tvedit s / MiB | tvedit / mergekit (time, RSS) "
          "| mergekit shards s / MiB | tvedit 100MB s / MiB | ratio (time, RSS) | max abs diff (differing) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["agreement"]
        diff = f"{a['max_abs_diff']:.3g} ({a['differ_frac']:.2%})" if "max_abs_diff" in a else json.dumps(a)
        print(f"| hidden {r['hidden']}, {r['model_mib']} MiB × 4 | {r['method']} | {r['mergekit_s']:.2f} / {r['mergekit_mib']:.0f} | "
              f"{r['tvedit_s']:.2f} / {r['tvedit_mib']:.0f} | {r['ratio_s']:.2f}×, {r['ratio_mib']:.2f}× | "
              f"{r['mergekit_shards_s']:.2f} / {r['mergekit_shards_mib']:.0f} | {r['tvedit_100mb_s']:.2f} / {r['tvedit_100mb_mib']:.0f} | "
              f"{r['ratio_shards_s']:.2f}×, {r['ratio_shards_mib']:.2f}× | {diff} |")  # fmt: skip
    print("start-up: " + ", ".join(f"`{k}` {v['wall_s']:.2f} s / {v['peak_rss_mib']:.0f} MiB" for k, v in startup.items()))
    firsts = sorted({(r["hidden"], r["tvedit_first_use_s"]) for r in rows})
    print("tvedit first use (hashing the inputs): " + ", ".join(f"hidden {h}: {s:.2f} s" for h, s in firsts))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
