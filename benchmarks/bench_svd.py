"""Benchmark the singular-value merges (tsv, iso-c, iso-cts) and `tvedit compress`.

Generates --inputs random float32 task vectors shaped like the ViT-B/32 image encoder (open_clip key
names and shapes: conv1, class/positional embeddings, --blocks residual blocks of in_proj 2304x768,
out_proj 768x768, c_fc 3072x768, c_proj 768x3072 with their biases and layer norms, proj 768x512;
--blocks 12 is the whole encoder, 87.8 M entries), then runs, each in a fresh process measured for
wall time, CPU time (user + system) and peak RSS (benchmarks/_measure.py), for each SVD route in
--routes (TVEDIT_SVD=auto: the refined and Gram routes where they apply; exact: LAPACK's full SVD everywhere):

* `tvedit add --emit vector --method M` for M in tsv, iso-c, iso-cts (and sum once, the baseline);
* `tvedit compress --rank-fraction 0.1` on one whole-encoder vector (always 12 blocks), with float32
  factors (and bfloat16 ones on the first route), reporting the file / dense-file size ratio;
* `tvedit scale --by 1` on that same vector (the I/O-bound reference for compress).

Every figure includes the ~2-3 s of process start-up (importing torch). Prints a table, the ratios
asked of the SVD paths (tsv / iso-c, iso-cts / iso-c, compress / scale; wall and CPU time, one run)
and one JSON line. Usage (the default, --blocks 1):

    python benchmarks/bench_svd.py --inputs 8 --blocks 1 --routes auto,exact
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure  # noqa: E402

from tvedit.manifest import Manifest  # noqa: E402
from tvedit.writer import save_tensors  # noqa: E402

WIDTH, PATCH, TOKENS, EMBED = 768, 32, 50, 512
METHODS = ("sum", "tsv", "iso-c", "iso-cts")


def vit_b_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    d = WIDTH
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (d, 3, PATCH, PATCH), "visual.class_embedding": (d,), "visual.positional_embedding": (TOKENS, d),
        "visual.ln_pre.weight": (d,), "visual.ln_pre.bias": (d,), "visual.ln_post.weight": (d,), "visual.ln_post.bias": (d,),
        "visual.proj": (d, EMBED),
    }  # fmt: skip
    for i in range(blocks):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({
            p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
            p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (4 * d, d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (d, 4 * d), p + "mlp.c_proj.bias": (d,),
        })  # fmt: skip
    return shapes


def write_vector(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    tau = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    save_tensors(path, tau, Manifest(kind="task-vector"), layout="dense")
    return sum(t.numel() for t in tau.values())


def run(n_inputs: int, blocks: int, workdir: Path, routes: list[str]) -> dict:
    base_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    shapes = vit_b_shapes(blocks)
    vecs = [workdir / f"tv{i}.safetensors" for i in range(n_inputs)]
    numel = [write_vector(p, shapes, i) for i, p in enumerate(vecs)][0]
    tvedit = [sys.executable, "-m", "tvedit"]
    rows = []

    def row(what: str, m: dict, **extra: float) -> None:
        rows.append({"what": what, "wall_s": m["wall_s"], "cpu_s": m["cpu_s"], "peak_rss_mib": m["peak_rss_mib"], **extra})

    out = workdir / "out.safetensors"
    add = [*tvedit, "add", *map(str, vecs), "--emit", "vector", "--layout", "dense", "-o", str(out), "--force", "--method"]
    row("add --method sum", measure([*add, "sum"], base_env))
    for route in routes:
        env = {**base_env, "TVEDIT_SVD": route}
        for method in METHODS[1:]:
            row(f"add --method {method} [{route}]", measure([*add, method], env))
    out.unlink()
    for p in vecs:
        p.unlink()
    full = workdir / "full.safetensors"
    full_numel = write_vector(full, vit_b_shapes(12), 0)
    row("scale --by 1 (the compress input)", measure([*tvedit, "scale", str(full), "--by", "1", "-o", str(out), "--force"], base_env))
    out.unlink()
    for n, route in enumerate(routes):
        env = {**base_env, "TVEDIT_SVD": route}
        for dtype in ("float32", "bfloat16") if n == 0 else ("float32",):
            lr = workdir / f"lr.{dtype}.safetensors"
            m = measure([*tvedit, "compress", str(full), "--rank-fraction", "0.1", "--factor-dtype", dtype, "-o", str(lr), "--force"], env)
            row(f"compress --rank-fraction 0.1 ({dtype} factors) [{route}]", m, size_ratio=lr.stat().st_size / full.stat().st_size)
    by = {r["what"]: r for r in rows}
    ratios = {}
    for route in routes:
        for num, den in ((f"add --method tsv [{route}]", f"add --method iso-c [{route}]"), (f"add --method iso-cts [{route}]", f"add --method iso-c [{route}]"),
                         (f"compress --rank-fraction 0.1 (float32 factors) [{route}]", "scale --by 1 (the compress input)")):  # fmt: skip
            ratios[f"{num} / {den}"] = {t: by[num][t] / by[den][t] for t in ("wall_s", "cpu_s")}
    return {
        "benchmark": "svd", "inputs": n_inputs, "blocks": blocks, "entries_per_input": numel, "compress_entries": full_numel,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, OMP_NUM_THREADS={base_env['OMP_NUM_THREADS']}",
        "rows": rows, "ratios": ratios,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=1, help="residual blocks per vector (12 = the whole ViT-B/32 encoder)")
    ap.add_argument("--routes", default="auto,exact", help="comma-separated TVEDIT_SVD routes to run (auto, exact)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = ap.parse_args()
    routes = args.routes.split(",")
    if not routes or any(r not in ("auto", "exact") for r in routes):
        ap.error("--routes: a comma-separated list of auto, exact")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tvedit-bench-svd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.inputs, args.blocks, workdir, routes)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{result['inputs']} inputs x {result['entries_per_input']:,} entries ({result['blocks']} blocks); {result['machine']}")
    print(f"{'what':<58}{'wall s':>8}{'cpu s':>8}{'peak MiB':>10}{'file/dense':>12}")
    for r in result["rows"]:
        ratio = f"{r['size_ratio']:.2%}" if "size_ratio" in r else ""
        print(f"{r['what']:<58}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['peak_rss_mib']:>10.0f}{ratio:>12}")
    for name, r in result["ratios"].items():
        print(f"{name}: {r['wall_s']:.2f}x wall, {r['cpu_s']:.2f}x cpu")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
