"""Ways to train f_lin(θ) = f(θ0) + J f(θ0)(θ − θ0), timed on one batch and checked against each other.

Each variant returns logits whose value is f_lin and whose gradient in θ is J(θ0)^T g; the script
times logits + cross-entropy (forward) and loss.backward() (backward) per variant, interleaved over
--rounds, and prints the largest logit difference and the relative gradient difference to
``reference``. ViT-B-32 with random weights, batch 8, CPU; times are process CPU time (run with
OMP_NUM_THREADS=1). Variants:

* reference — the definition, reverse over forward: one torch.func.jvp, backpropagated through
  (models.base.linearized_reference; tvedit's implementation before).
* forward_ad — tvedit's implementation (models.base.linearized): one torch.autograd.forward_ad
  pass; primal at θ0 credited to θ, tangent detached; backward = an ordinary backward at θ0.
* func_jvp_primal — the same idea through torch.func.jvp (primal requiring grad, tangent detached).
* two_pass — the jvp without a graph (no_grad), then a separate ordinary forward/backward at θ0.
* double_vjp — J δ as the vjp of a vjp: u -> J^T u with create_graph, then d/du <J^T u, δ>.
* func_linearize — torch.func.linearize (traces the jvp for this batch), then reverse over its
  jvp_fn; retraced every batch because x changes.
* full — ordinary f(θ) for scale (not f_lin).

    python benchmarks/linearized_variants.py [--variants full,reference,forward_ad] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from tvedit.models.base import (
    _AtTheta0,
    forward_ad_safe,
    functional,
    linearized,
    linearized_reference,
)
from tvedit.models.open_clip import OpenClipAdapter


def func_jvp_primal(model, theta0, theta, fn) -> Tensor:
    names = sorted(theta0)
    prim = tuple(_AtTheta0.apply(theta[k], theta0[k].detach()) for k in names)
    tang = tuple(theta[k].detach() - theta0[k] for k in names)

    def f(*v: Tensor) -> Tensor:
        return functional(model, dict(zip(names, v, strict=True)), fn)

    with forward_ad_safe():
        out, t = torch.func.jvp(f, prim, tang)
    return out + t.detach()


def two_pass(model, theta0, theta, fn) -> Tensor:
    names = sorted(theta0)
    prim = tuple(theta0[k].detach() for k in names)
    tang = tuple(theta[k].detach() - theta0[k] for k in names)

    def f(*v: Tensor) -> Tensor:
        return functional(model, dict(zip(names, v, strict=True)), fn)

    with torch.no_grad(), forward_ad_safe():
        _, t = torch.func.jvp(f, prim, tang)
    return functional(model, {k: _AtTheta0.apply(theta[k], theta0[k].detach()) for k in names}, fn) + t


def double_vjp(model, theta0, theta, fn) -> Tensor:
    names = sorted(theta0)
    p = {k: theta0[k].detach().requires_grad_(True) for k in names}
    with forward_ad_safe():  # the fused attention backward has no double backward either
        y = functional(model, p, fn)
        u = torch.zeros_like(y, requires_grad=True)
        g = torch.autograd.grad(y, [p[k] for k in names], u, create_graph=True)
        s = sum((gi * (theta[k] - theta0[k])).sum() for gi, k in zip(g, names, strict=True))
        jd = torch.autograd.grad(s, u, create_graph=True)[0]
    return y.detach() + jd


def func_linearize(model, theta0, theta, fn) -> Tensor:
    names = sorted(theta0)

    def f(*v: Tensor) -> Tensor:
        return functional(model, dict(zip(names, v, strict=True)), fn)

    with forward_ad_safe():
        out, jvp_fn = torch.func.linearize(f, *(theta0[k].detach() for k in names))
        return out + jvp_fn(*(theta[k] - theta0[k].detach() for k in names))


VARIANTS = {"reference": linearized_reference, "forward_ad": linearized, "func_jvp_primal": func_jvp_primal, "two_pass": two_pass,
            "double_vjp": double_vjp, "func_linearize": func_linearize}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="full,reference,forward_ad,func_jvp_primal,two_pass,double_vjp,func_linearize")
    ap.add_argument("--rounds", type=int, default=2, help="timed steps per variant, interleaved, after one warm-up round")
    args = ap.parse_args()
    torch.manual_seed(0)
    adapter = OpenClipAdapter.from_name(args.model)
    model = adapter.build().train()
    size = adapter.model_info()["image_size"]
    head = torch.nn.functional.normalize(torch.randn(10, adapter.config["embed_dim"]), dim=-1) * 100
    x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, 10, (args.batch,))
    keys = adapter.trainable_keys("linearized")
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    theta = {k: named[k].requires_grad_(True) for k in keys}
    theta0 = {k: p.detach().clone() for k, p in theta.items()}
    with torch.no_grad():  # a point away from theta0
        for p in theta.values():
            p.add_(torch.randn_like(p), alpha=1e-3)
    variants = args.variants.split(",")
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    results: dict[str, tuple[Tensor, Tensor]] = {}
    failed: dict[str, str] = {}
    for rnd in range(1 + args.rounds):
        for name in variants:
            for p in theta.values():
                p.grad = None
            if name in failed:
                continue
            t0 = time.process_time()
            try:
                if name == "full":
                    logits = adapter.scores(model, x, head)
                else:
                    logits = VARIANTS[name](model, theta0, theta, lambda m: adapter.scores(m, x, head))
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                t1 = time.process_time()
                loss.backward()
                t2 = time.process_time()
            except Exception as exc:  # noqa: BLE001  # a variant that torch cannot run here
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                print(f"  {name}: failed: {failed[name]}", flush=True)
                continue
            if rnd:
                times[name].append((t1 - t0, t2 - t1))
                print(f"  round {rnd} {name}: forward {t1 - t0:.2f} backward {t2 - t1:.2f} s", flush=True)
            else:
                results[name] = (logits.detach(), torch.cat([theta[k].grad.reshape(-1) for k in keys]))
    full = statistics.median(f + b for f, b in times["full"]) if "full" in times else None
    print(f"\nlinearized_variants: {args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'variant':<16} {'forward':>8} {'backward':>9} {'total':>7} {'x full':>7}  {'max |logit diff|':>16} {'grad rel diff':>13}")
    for name, ts in times.items():
        if name in failed:
            print(f"{name:<16} failed: {failed[name]}")
            continue
        f, b = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        diff = ""
        if "reference" in results and name not in ("full", "reference"):
            (lo, g), (lr, gr) = results[name], results["reference"]
            diff = f"{float((lo - lr).abs().max()):>16.2e} {float((g - gr).norm() / gr.norm()):>13.2e}"
        ratio = f"{(f + b) / full:>7.2f}" if full else f"{'-':>7}"
        print(f"{name:<16} {f:>8.2f} {b:>9.2f} {f + b:>7.2f} {ratio}  {diff}")


if __name__ == "__main__":
    main()
