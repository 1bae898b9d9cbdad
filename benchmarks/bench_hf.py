"""Benchmark `tvedit add` on sharded Hugging Face directories (8-layer Llama-shaped models, bf16).

For each hidden size it writes a base and 3 fine-tuned copies as HF directories (config.json,
sharded model-0000i-of-0000N.safetensors + index, bfloat16; no transformers needed) and measures,
each in a fresh process, in one run:

* floor:  read every input shard once (16 MiB positional reads) and write an output-sized file;
* tvedit: `tvedit add FT0 FT1 FT2 --base BASE --alpha 0.3 -o OUT/ --max-shard-size 100MB` (a
          loadable HF directory), hashes of the plain inputs already cached (second run; the first
          run's time is printed as "first use");
* naive:  load every shard of every model with safetensors.torch.load_file, compute, save shards.

Usage: python benchmarks/bench_hf.py [--hidden 512,1024] [--workdir bench-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import FLOOR, measure  # noqa: E402

LAYERS = 8
VOCAB = 16000

NAIVE = r"""
import glob, json, os, sys, torch
from safetensors.torch import load_file, save_file
fts, base_dir, out = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
def load(d):
    state = {}
    for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        state.update(load_file(p))
    return state
base = load(base_dir)
models = [load(d) for d in fts]
merged = {k: (v.float() + 0.3 * sum(m[k].float() - v.float() for m in models)).to(v.dtype) for k, v in base.items()}
os.makedirs(out, exist_ok=True)
index = json.load(open(os.path.join(base_dir, "model.safetensors.index.json")))
for shard in sorted(set(index["weight_map"].values())):
    save_file({k: merged[k] for k, s in index["weight_map"].items() if s == shard}, os.path.join(out, shard), metadata={"format": "pt"})
"""


def llama_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    inter = hidden * 11 // 4
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden), "lm_head.weight": (VOCAB, hidden), "model.norm.weight": (hidden,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_model(d: Path, hidden: int, seed: int, shard_bytes: int = 100_000_000) -> int:
    """A sharded bf16 HF directory; returns its tensor bytes."""
    if (d / "model.safetensors.index.json").exists():
        return json.loads((d / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base_g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for key, shape in sorted(llama_shapes(hidden).items()):
        t = torch.randn(shape, generator=base_g) * 0.02
        if seed:
            t += 0.001 * torch.randn(shape, generator=g)
        t = t.to(torch.bfloat16)
        n = t.numel() * 2
        if size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
        total += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(d / name), metadata={"format": "pt"})
    weight_map = {k: n for n, s in zip(names, shards, strict=True) for k in s}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
              "num_hidden_layers": LAYERS, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "vocab_size": VOCAB,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="512,1024", help="comma-separated hidden sizes (one model size each)")
    ap.add_argument("--workdir", default="bench-hf")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args()
    work = Path(args.workdir)
    env = dict(os.environ, TVEDIT_CACHE=str((work / "cache").resolve()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        root = work / f"h{hidden}"
        nbytes = write_model(root / "base", hidden, 0)
        fts = [root / f"ft{i}" for i in range(3)]
        for i, d in enumerate(fts):
            write_model(d, hidden, i + 1)
        out = root / "out"
        tv = [sys.executable, "-m", "tvedit", "add", *map(str, fts), "--base", str(root / "base"), "--alpha", "0.3",
              "-o", f"{out}/", "--max-shard-size", "100MB", "--force"]  # fmt: skip
        floor = measure([sys.executable, "-c", FLOOR, *map(str, [root / "base", *fts]), str(root / "floor.bin"), str(nbytes), "-"], env)
        shutil.rmtree(out, ignore_errors=True)
        first = measure(tv, env)
        cached = measure(tv, env)
        naive = measure([sys.executable, "-c", NAIVE, *map(str, fts), str(root / "base"), str(root / "naive")], env)
        startup = measure([sys.executable, "-c", "import torch, tvedit.arith, tvedit.hfdir"], env)
        row = {"hidden": hidden, "model_mib": round(nbytes / 2**20, 1), "floor_s": floor["wall_s"], "floor_mib": floor["peak_rss_mib"],
               "tvedit_s": cached["wall_s"], "tvedit_mib": cached["peak_rss_mib"], "tvedit_first_s": first["wall_s"],
               "naive_s": naive["wall_s"], "naive_mib": naive["peak_rss_mib"], "startup_s": startup["wall_s"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        (root / "floor.bin").unlink(missing_ok=True)
        shutil.rmtree(root / "naive", ignore_errors=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| model (bf16, 8 layers) | I/O floor s / MiB | tvedit s / MiB | tvedit / floor | (tvedit − startup) / floor | first use s | naive s / MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| hidden {r['hidden']}, {r['model_mib']} MiB × 4 | {r['floor_s']:.2f} / {r['floor_mib']:.0f} | {r['tvedit_s']:.2f} / {r['tvedit_mib']:.0f} | "
              f"{r['tvedit_s'] / r['floor_s']:.2f}× | {(r['tvedit_s'] - r['startup_s']) / r['floor_s']:.2f}× | {r['tvedit_first_s']:.2f} | "
              f"{r['naive_s']:.2f} / {r['naive_mib']:.0f} |")  # fmt: skip
    startups = ", ".join(f"{r['startup_s']:.2f}" for r in rows)
    print(f"startup (import torch, tvedit.arith, tvedit.hfdir): {startups} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
