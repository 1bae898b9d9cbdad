"""Would a randomized SVD do for TSV-M? The merged tensor's error against the float64 SVD, and the time.

TSV-M keeps the top k = r/N triplets of each input. This script merges --inputs float32 matrices of
--dim x --dim with k = dim / inputs three ways and prints, per spectrum, the CPU time and the
relative error ||merged - merged_float64||_F / ||merged_float64||_F of:

* LAPACK's full float32 SVD (tvedit's route for square matrices, TVEDIT_SVD=exact everywhere);
* torch.svd_lowrank(A, q=k+p, niter) (seeded with torch.manual_seed(0)) for a few (p, niter).

Spectra: "gaussian" (i.i.d. normal entries, like bench_svd.py's random vectors), and matrices with
singular values i^-0.5 and i^-1 (random singular vectors). Usage:

    OMP_NUM_THREADS=1 python benchmarks/svd_randomized_accuracy.py --dim 768 --inputs 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tvedit.ops import svd


def power_law(n: int, alpha: float, g: torch.Generator) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    return (u * torch.arange(1, n + 1, dtype=torch.float32).pow(-alpha)) @ v.T


def merge(mats: list[torch.Tensor], k: int, top) -> torch.Tensor:
    us, ss, vs = zip(*(top(m, k) for m in mats), strict=True)
    return svd.Factors(svd.procrustes(torch.cat(us, 1), "exact"), torch.cat(ss), svd.procrustes(torch.cat(vs, 1), "exact")).dense()


def lapack(m: torch.Tensor, k: int):
    f = svd.svd(m, k, route="exact")
    return f.U, f.S, f.V


def randomized(p: int, niter: int):
    def top(m: torch.Tensor, k: int):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(m, q=k + p, niter=niter)
        return u[:, :k], s[:k], v[:, :k]

    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--inputs", type=int, default=8)
    args = ap.parse_args()
    n, k = args.dim, args.dim // args.inputs
    g = torch.Generator().manual_seed(0)
    spectra = {
        "gaussian": lambda: torch.randn(n, n, generator=g),
        "sigma_i = i^-0.5": lambda: power_law(n, 0.5, g),
        "sigma_i = i^-1": lambda: power_law(n, 1.0, g),
    }
    variants = {"LAPACK float32 (full SVD)": lapack, **{f"svd_lowrank p={p} niter={it}": randomized(p, it) for p, it in ((10, 2), (10, 4), (k, 4), (k, 8))}}
    results = []
    print(f"{args.inputs} inputs of {n}x{n} float32, k = {k} triplets each; CPU {torch.get_num_threads()} thread(s)")
    for name, make in spectra.items():
        mats = [make() for _ in range(args.inputs)]
        ref = merge([m.double() for m in mats], k, lapack)
        for variant, top in variants.items():
            t = time.process_time()
            got = merge(mats, k, top)
            cpu = time.process_time() - t
            err = float((got.double() - ref).norm() / ref.norm())
            results.append({"spectrum": name, "variant": variant, "cpu_s": cpu, "rel_error": err})
            print(f"{name:<18}{variant:<32}{cpu:>7.2f} s cpu   relative error {err:.1e}", flush=True)
    print(json.dumps({"benchmark": "svd-randomized-accuracy", "dim": n, "inputs": args.inputs, "k": k, "results": results}))


if __name__ == "__main__":
    main()
