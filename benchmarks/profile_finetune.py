"""Where one fine-tuning step spends its time, per phase and per operator, for each regime asked.

ViT-B-32 with random weights, batch 8, on CPU by default; the sparse mode's mask is calibrated as in
bench_finetune.py (density 0.1, 4 random batches of 2). Prints which tensors the mask trains, the
per-phase seconds (forward, backward, mask + clip, optimizer) of each step after one warm-up, and
torch.profiler's operator table of one more step. On CPU the phases are timed in process CPU time
(run with OMP_NUM_THREADS=1; a shared machine's other work does not inflate it). Usage:

    python benchmarks/profile_finetune.py [--model ViT-B-32] [--batch 8] [--device cpu] [--modes full,sparse]
    python benchmarks/profile_finetune.py --modes full,linearized,linearized-reference --steps 2 --rounds 2

``linearized-reference`` trains f_lin by reverse over forward (models.base.linearized_reference, the
implementation before this change) for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tvedit.finetune.calibration import calibrate_mask
from tvedit.finetune.config import FinetuneConfig
from tvedit.finetune.loop import Dist, train_step
from tvedit.finetune.optim import MaskedAdamW
from tvedit.finetune.regimes import make_regime
from tvedit.models.open_clip import OpenClipAdapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="full,sparse", help="comma-separated: full, attn, linearized, linearized-reference, sparse")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode, after one warm-up step")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the modes in turn (interleaved) this many times")
    ap.add_argument("--no-profiler", action="store_true", help="skip torch.profiler's operator tables")
    args = ap.parse_args()
    modes = args.modes.split(",")
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    torch.manual_seed(0)
    device = torch.device(args.device)
    adapter = OpenClipAdapter.from_name(args.model)
    model = adapter.build().to(device)
    size = adapter.model_info()["image_size"]
    head = torch.nn.functional.normalize(torch.randn(10, adapter.config["embed_dim"], device=device), dim=-1) * 100
    x, y = torch.randn(args.batch, 3, size, size, device=device), torch.randint(0, 10, (args.batch,), device=device)
    masks = None
    if "sparse" in modes:
        calib = (torch.randn(2, 3, size, size, device=device) for _ in range(4))
        masks = calibrate_mask(adapter, model, head, calib, density=0.1, rounds=4, calib_batches=4, chunk=2)
        kept = [n for n, _ in model.named_parameters() if n in masks and bool(masks[n].any())]
        print(f"maskable tensors {len(masks)}, with kept entries {len(kept)}; first trainable: {kept[:2]}")
    totals: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in modes:
            torch.manual_seed(0)
            model = adapter.build().to(device)
            cfg = FinetuneConfig(mode=mode, batch_size=args.batch, lr=1e-5)
            regime = make_regime(mode.split("-")[0], adapter, model, masks=masks if mode == "sparse" else None)
            if mode == "linearized-reference":  # f_lin by reverse over forward (the implementation before)
                from tvedit.models.base import linearized_reference

                regime.logits = lambda inputs, head, r=regime: linearized_reference(r.model, r.theta0, r.params, lambda m: r.adapter.scores(m, inputs, head))
            opt = MaskedAdamW(regime.params, regime.masks, weight_decay=cfg.weight_decay)
            model.train()
            for it in range(1 + args.steps):
                t0 = clock()
                loss = adapter.loss(regime.logits(x, head).float(), y, 0.0) / args.batch
                t1 = clock()
                loss.backward()
                t2 = clock()
                regime.after_backward()
                torch.nn.utils.clip_grad_norm_(list(regime.params.values()), 1.0)
                t3 = clock()
                opt.step(1e-5)
                opt.zero_grad()
                t4 = clock()
                if it:
                    totals[mode].append(t4 - t0)
                    print(f"{mode}: forward {t1 - t0:.3f}  backward {t2 - t1:.3f}  mask+clip {t3 - t2:.3f}  optimizer {t4 - t3:.3f}  total {t4 - t0:.3f} s", flush=True)
            if args.no_profiler or rnd:
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                train_step(regime, opt, head, x, y, 1e-5, cfg, local_batch=args.batch, micro=args.batch, dist=Dist())
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    if "full" in modes:
        full = statistics.median(totals["full"])
        print("median step, x full: " + ", ".join(f"{m} {statistics.median(t):.3f} s ({statistics.median(t) / full:.2f}x)" for m, t in totals.items()))


if __name__ == "__main__":
    main()
