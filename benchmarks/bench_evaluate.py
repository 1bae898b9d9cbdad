"""Evaluation sweep speed: the affine f_lin sweep and the substitution sweep against naive loops.

    python benchmarks/bench_evaluate.py [--alphas 21] [--images 512] [--threads 2]

A 32-px open_clip ViT (patch 8, width 128, 4 layers: the demo's architecture) with a random theta0
and a random task vector; synthetic images held as one tensor. One run, wall-clock seconds:

* f_lin: ``Session`` (f0 and J tau once, then f0 + alpha J tau per alpha) vs the naive loop that
  calls the shared ``models.base.linearized`` helper (one jvp forward pass) for every alpha.
* non-linear: ``Session`` (theta0 built once, parameters substituted, head cached) vs the naive loop
  that materialises theta0 + alpha tau, builds the model and its head, and runs it, for every alpha.
Both check that the two ways give the same predictions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 4,
        "width": 128,
        "head_width": 32,
        "patch_size": 8,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 128,
        "heads": 4,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", type=int, default=21)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tvedit.evaluate import protocols as P
    from tvedit.evaluate.runner import Evaluator, LoadedVector, Session, TaskData
    from tvedit.models.base import linearized
    from tvedit.models.open_clip import OpenClipAdapter

    adapter = OpenClipAdapter("bench", CONFIG)
    torch.manual_seed(0)
    theta0 = adapter.state_dict(adapter.build())
    tau = {k: 0.02 * torch.randn_like(theta0[k]) for k in adapter.trainable_keys("full")}
    x = torch.randn(args.images, 3, 32, 32)
    labels = torch.randint(0, 10, (args.images,))
    record = {
        "name": "bench",
        "classes": [f"class {i}" for i in range(10)],
        "templates": ["a photo of a {}."],
    }
    alphas = P.alpha_grid(0, 1, 1 / (args.alphas - 1))
    results: dict[str, dict[str, float]] = {}

    def session(linear: bool) -> Session:
        ev = Evaluator(adapter, theta0)
        task = TaskData("bench", record, {"test": (x, labels)})
        return Session(ev, [task], [LoadedVector(Path("tau"), "bench", tau)], linear=linear)

    # f_lin -----------------------------------------------------------------------------------
    t = time.perf_counter()
    s = session(linear=True)
    fast = [s.predictions("bench", "test", [a]) for a in alphas]
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    model = adapter.build(theta0)
    head = adapter.make_head(model, record)
    keys = sorted(tau)
    p0 = {k: dict(model.named_parameters())[k].detach() for k in keys}
    naive = []
    for a in alphas:
        with torch.no_grad():
            out = linearized(
                model,
                p0,
                {k: p0[k] + a * tau[k] for k in keys},
                lambda m: adapter.scores(m, x, head),
            )
        naive.append(out.argmax(-1))
    t_naive = time.perf_counter() - t
    agree = float(
        torch.stack([(f == n).float().mean() for f, n in zip(fast, naive, strict=True)]).mean()
    )
    results["f_lin"] = {
        "sweep_s": t_fast,
        "naive_s": t_naive,
        "speedup": t_naive / t_fast,
        "agreement": agree,
    }

    # non-linear --------------------------------------------------------------------------------
    t = time.perf_counter()
    s = session(linear=False)
    fast = [s.predictions("bench", "test", [a]) for a in alphas]
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    naive = []
    for a in alphas:
        state = {k: (v + a * tau[k]) if k in tau else v for k, v in theta0.items()}
        m = adapter.build(state)
        h = adapter.make_head(adapter.build(theta0), record)  # the head always comes from theta0
        with torch.no_grad():
            naive.append(adapter.scores(m, x, h).argmax(-1))
    t_naive = time.perf_counter() - t
    agree = float(
        torch.stack([(f == n).float().mean() for f, n in zip(fast, naive, strict=True)]).mean()
    )
    results["nonlinear"] = {
        "sweep_s": t_fast,
        "naive_s": t_naive,
        "speedup": t_naive / t_fast,
        "agreement": agree,
    }

    meta = {
        "alphas": len(alphas),
        "images": args.images,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps({"meta": meta, "results": results}, indent=2))
    for name, r in results.items():
        print(
            f"{name:10s} sweep {r['sweep_s']:.2f} s  naive {r['naive_s']:.2f} s  speed-up x{r['speedup']:.1f}  (prediction agreement {r['agreement']:.4f})"
        )


if __name__ == "__main__":
    main()
