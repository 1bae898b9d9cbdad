"""Per-iteration time and peak memory of the four fine-tuning regimes on the same model and batch.

    python benchmarks/bench_finetune.py                       # ViT-B-32, random weights, CPU, batch 8
    python benchmarks/bench_finetune.py --device cuda --batch 128 --bf16   # as tvedit finetune trains on a GPU
    python benchmarks/bench_finetune.py --model my-config.json --batch 32 --iters 10
    python benchmarks/bench_finetune.py --model causal --batch 8       # a Llama-shaped causal LM (hf-causal)
    python benchmarks/bench_finetune.py --model causal:llama.json --device cuda --batch 32 --bf16

Each mode runs the real training step (tvedit.finetune.loop.train_step: regime logits, backward,
grad masking, clipping, masked AdamW) on one fixed random batch. CPU: every mode runs in a fresh
subprocess; its memory is the weights plus the growth of the process's peak RSS during training
(activations, gradients, optimizer state; the Python/torch runtime excluded). CUDA: peak allocated
GPU memory (torch.cuda.max_memory_allocated, weights included) per mode. The sparse mode's mask is
calibrated first (TaLoS, density 0.1) in its own process on a few random images; its time is
reported separately. ``--model causal`` (or ``causal:CONFIG.json``, a transformers LlamaConfig /
any causal-LM config dict with ``model_type``) runs the same rows on a random causal LM: each
example is a random context of --seq-len tokens with two 4-token choices, scored and trained as
tvedit scores choice tasks (summed continuation log-likelihood; models/hf_causal.py). Ratios are to
``full`` measured in the same run. Prints a table and writes JSON (--json PATH).

Clock (--clock): on CPU the ratios use each iteration's process CPU time by default (``cpu``), which
a shared machine's other work does not inflate; run with OMP_NUM_THREADS=1 so that CPU time and
wall time measure the same work. Wall-clock seconds are reported too (``time_s``). On CUDA the
clock is the wall clock (after a synchronize).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "attn", "linearized", "sparse")
TARGETS = {"attn": {"time": 0.8}, "linearized": {"time": 2.0}, "sparse": {"time": 0.5, "memory": 0.75}}


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


CAUSAL_CONFIG = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=2048, hidden_size=256, intermediate_size=688,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
)  # fmt: skip


def _causal(args: argparse.Namespace):
    """(adapter, head, batch maker) of a random causal LM: contexts of --seq-len random tokens, two
    4-token choices each (a TokenBatch as HFCausalAdapter.collate builds it)."""
    import torch

    from tvedit.models.hf_causal import ContinuationHead, HFCausalAdapter
    from tvedit.models.hf_seq2seq import TokenBatch

    _, _, path = args.model.partition(":")
    config = json.loads(Path(path).read_text()) if path else dict(CAUSAL_CONFIG)
    adapter = HFCausalAdapter(config, {"class": None, "source": None})
    vocab = int(config.get("vocab_size", 2048))
    device = torch.device(args.device)

    def make_batch(n: int) -> TokenBatch:
        ids = torch.randint(3, vocab, (n, 2, args.seq_len + 4), device=device)
        ids[:, 1, : args.seq_len] = ids[:, 0, : args.seq_len]  # both choices follow the same context
        cont = torch.zeros_like(ids, dtype=torch.bool)
        cont[:, :, args.seq_len :] = True
        return TokenBatch({"input_ids": ids, "cont": cont, "valid": torch.ones(n, 2, dtype=torch.bool, device=device), "chars": torch.ones(n, 2, device=device)})

    return adapter, ContinuationHead(None), make_batch


def run_mode(args: argparse.Namespace) -> dict:
    import torch

    from tvedit.finetune.calibration import calibrate_mask
    from tvedit.finetune.config import FinetuneConfig
    from tvedit.finetune.loop import Dist, train_step
    from tvedit.finetune.optim import MaskedAdamW
    from tvedit.finetune.regimes import make_regime
    from tvedit.models.open_clip import OpenClipAdapter

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.model.startswith("causal"):
        adapter, head, make_batch = _causal(args)
        model = adapter.build().to(device)
        n_classes = 2
    else:
        adapter = OpenClipAdapter.from_name(args.model)
        model = adapter.build().to(device)
        size = adapter.model_info()["image_size"]
        n_classes = 10
        head = torch.nn.functional.normalize(torch.randn(n_classes, adapter.config["embed_dim"], device=device), dim=-1) * 100

        def make_batch(n: int):
            return torch.randn(n, 3, size, size, device=device)

    x = make_batch(args.batch)
    y = torch.randint(0, n_classes, (args.batch,), device=device)
    extra: dict = {}
    masks = None
    if args.mode == "calibrate":  # run in its own process so its peak does not count for sparse
        t0 = time.perf_counter()
        calib = (make_batch(args.calib_batch) for _ in range(args.calib_batches))
        masks = calibrate_mask(adapter, model, head, calib, density=args.density, rounds=min(4, args.calib_batches),
                               calib_batches=args.calib_batches, chunk=args.calib_batch)  # fmt: skip
        from safetensors.torch import save_file

        save_file({k: m.to(torch.uint8) for k, m in masks.items()}, str(args.mask_file))
        return {"calibration_s": time.perf_counter() - t0, "frozen_maskable_tensors": sum(1 for m in masks.values() if not m.any()), "maskable_tensors": len(masks)}
    if args.mode == "sparse":
        from safetensors.torch import load_file

        masks = {k: m.bool() for k, m in load_file(str(args.mask_file)).items()}
    cfg = FinetuneConfig(mode=args.mode, batch_size=args.batch, lr=1e-5)
    regime = make_regime(args.mode, adapter, model, masks=masks)
    opt = MaskedAdamW(regime.params, regime.masks, weight_decay=cfg.weight_decay)
    extra["trained_entries"] = sum(int(m.sum()) for m in regime.masks.values()) if regime.masks else sum(p.numel() for p in regime.params.values())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16 else None
    model.train()
    baseline = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for i in range(args.warmup + args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(regime, opt, head, x, y, 1e-5, cfg, local_batch=args.batch, micro=args.batch, dist=Dist(), autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # training memory = weights + what the training step added on top of the process's RSS
        peak = weights + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"mode": args.mode, "time_s": statistics.median(times), "times_s": times, "cpu_s": statistics.median(cpu_times), "cpu_times_s": cpu_times, "peak_mib": peak, "weights_mib": weights, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name or config JSON, or causal[:CONFIG.json] (random weights)")
    ap.add_argument("--seq-len", type=int, default=60, help="causal: context tokens per example (+ 4 choice tokens)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (as tvedit finetune does)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None, help="time the ratios use: process CPU time (default on CPU) or wall time (default on CUDA)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    ap.add_argument("--mask-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    import tempfile

    tmp = tempfile.TemporaryDirectory()
    args.mask_file = Path(tmp.name) / "mask.safetensors"
    results: dict[str, dict] = {}
    modes = args.modes.split(",")
    calibration = None
    for mode in (["calibrate"] if "sparse" in modes else []) + modes:
        if args.device == "cpu":  # a fresh process per mode: peak RSS is per mode
            cmd = [sys.executable, __file__, "--mode", mode, "--mask-file", str(args.mask_file), *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
        else:
            args.mode = mode
            result = run_mode(args)
            args.mode = None
        if mode == "calibrate":
            calibration = result
            continue
        results[mode] = result
        print(f"  {mode}: {results[mode]['time_s']:.3f} s/iter (cpu {results[mode]['cpu_s']:.3f} s), peak {results[mode]['peak_mib']:.0f} MiB", file=sys.stderr)
    full = results.get("full")
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    key = "cpu_s" if clock == "cpu" else "time_s"
    rows = []
    for mode, r in results.items():
        r["time_ratio"] = r[key] / full[key] if full else None
        r["memory_ratio"] = r["peak_mib"] / full["peak_mib"] if full else None
        target = TARGETS.get(mode, {})
        r["targets"] = target
        r["meets_targets"] = all(r[f"{k}_ratio"] is not None and r[f"{k}_ratio"] <= v for k, v in target.items()) if target else None
        rows.append(r)
    import platform

    import torch

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    report = {"calibration": calibration, "model": args.model, "device": args.device, "machine": machine, "batch": args.batch, "iters": args.iters, "bf16": args.bf16, "clock": clock, "results": rows}
    print(f"\nbench_finetune: {args.model}, batch {args.batch}, {args.device} ({machine}), median of {args.iters} iterations; time ratios by {clock} time\n")
    print(f"{'mode':<11} {'wall s':>7} {'cpu s':>7} {'x full':>7} {'peak MiB':>9} {'x full':>7}  target")
    for r in rows:
        marks = [f"{k} <= {v}x {'ok' if r[f'{k}_ratio'] <= v else 'MISSED'}" for k, v in r["targets"].items()]
        print(f"{r['mode']:<11} {r['time_s']:>7.3f} {r['cpu_s']:>7.3f} {r['time_ratio']:>7.2f} {r['peak_mib']:>9.0f} {r['memory_ratio']:>7.2f}  {', '.join(marks) or '-'}")
    if calibration:
        c = calibration
        print(f"\nsparse: calibration {c['calibration_s']:.1f} s ({args.calib_batches} batches of {args.calib_batch}); {c['frozen_maskable_tensors']}/{c['maskable_tensors']} maskable tensors have no kept entry")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
