"""Pure per-tensor task-vector arithmetic (ALGORITHMS.md section 1). No I/O, no printing.

Everything is computed in ``compute_dtype`` (float32 by default, float64 on request) whatever the
storage dtype; the caller casts once on output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def task_vector(finetuned: torch.Tensor, base: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """tau = theta* - theta0."""
    return finetuned.to(compute_dtype) - base.to(compute_dtype)


def scaled(vector: torch.Tensor, coefficient: float, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """c * tau (negation is c = -1)."""
    return vector.to(compute_dtype) * coefficient


def weighted_sum(
    vectors: Sequence[torch.Tensor], weights: Sequence[float], compute_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_i w_i tau_i (into ``out`` when given: a preallocated buffer of the right shape)."""
    if len(vectors) != len(weights):
        raise ValueError("one weight per vector")
    if out is None:
        out = torch.empty(vectors[0].shape, dtype=compute_dtype, device=vectors[0].device)
    torch.mul(vectors[0].to(compute_dtype), weights[0], out=out)
    for v, w in zip(vectors[1:], weights[1:], strict=True):
        out.add_(v.to(compute_dtype), alpha=w)
    return out


def apply(base: torch.Tensor, merged: torch.Tensor, alpha: float, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta0 + alpha * merged."""
    return base.to(compute_dtype) + alpha * merged.to(compute_dtype)
