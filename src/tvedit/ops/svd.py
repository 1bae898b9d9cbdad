"""Pure per-tensor singular-value math: TSV-M, Iso-C, Iso-CTS merges and low-rank truncation.

Every function takes plain tensors (one key's matrices) and returns tensors; no I/O, no options
parsing. SVDs run in float32 at least (float64 when the inputs are float64), on the inputs' device;
callers move tensors to a GPU first if they want the SVDs there. Semantics: docs/methods.md
("Singular-value merges") and docs/manifest.md ("Low-rank layout").

Conventions: a thin SVD ``A = U diag(S) V^T`` with U (m, r), S (r,), V (n, r), r = min(m, n),
singular values descending. Low-rank factors are returned as a :class:`Factors` triple in that
same orientation (V holds the right singular vectors as columns, not V^T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """A matrix held as U diag(S) V^T: U (m, k), S (k,), V (n, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def dense(self) -> torch.Tensor:
        """U diag(S) V^T (computed in the factors' dtype, at least float32)."""
        dtype = _work_dtype(self.U)
        return (self.U.to(dtype) * self.S.to(dtype)) @ self.V.to(dtype).T

    def to(self, *args, **kwargs) -> Factors:
        return Factors(self.U.to(*args, **kwargs), self.S.to(*args, **kwargs), self.V.to(*args, **kwargs))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.V))


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def svd(a: torch.Tensor) -> Factors:
    """Thin SVD of a 2-D tensor in float32 (float64 stays float64): A = U diag(S) V^T."""
    u, s, vh = torch.linalg.svd(a.to(_work_dtype(a)), full_matrices=False)
    return Factors(u, s, vh.mT)


def procrustes(m: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (rows, if m is wide) to m: P Q^T for m = P Sigma Q^T."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def keep_count(fraction: float, r: int) -> int:
    """Singular triplets kept at a rank fraction: floor(fraction * r), at least 1 (fraction > 0)."""
    return min(r, max(1, math.floor(fraction * r + 1e-9)))


def choose_rank(s: torch.Tensor, *, rank: int | None = None, fraction: float | None = None, energy: float | None = None) -> int:
    """The rank to keep for singular values s (exactly one criterion given).

    rank: min(rank, r); fraction: keep_count(fraction, r); energy: the smallest k >= 1 with
    sum_{i<k} s_i^2 >= energy * sum_i s_i^2 (k = r at energy 1)."""
    r = s.shape[0]
    if rank is not None:
        return max(1, min(int(rank), r))
    if fraction is not None:
        return keep_count(fraction, r)
    assert energy is not None
    sq = s.double().pow(2)
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0)
    k = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=torch.float64) * (1 - 1e-12)).item()) + 1
    return max(1, min(k, r))


def truncate(a: torch.Tensor, k: int) -> Factors:
    """The best rank-k approximation of a (Eckart-Young): the top k singular triplets."""
    f = svd(a)
    return Factors(f.U[:, :k].contiguous(), f.S[:k].contiguous(), f.V[:, :k].contiguous())


def product_svd(left: torch.Tensor, right: torch.Tensor, scale: float = 1.0) -> Factors:
    """The thin SVD of scale * left @ right for left (m, r), right (r, n), without forming the
    m x n product: QR of left and right^T, then the SVD of the small core (float64 throughout).
    Exact up to rounding: U diag(S) V^T = scale * left @ right, U and V orthonormal, S descending."""
    ql, rl = torch.linalg.qr(left.double())
    qr_, rr = torch.linalg.qr(right.double().T)
    core = svd(float(scale) * (rl @ rr.T))
    return Factors(ql @ core.U, core.S, qr_ @ core.V)


def split_factors(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = U diag(S) V^T and the singular values shared evenly:
    B = U diag(sqrt S) (m, k), A = diag(sqrt S) V^T (k, n) (a LoRA pair at scale 1)."""
    root = f.S.clamp(min=0).sqrt()
    return f.U * root, (f.V * root).T.contiguous()


def tail_energy(s: torch.Tensor, k: int) -> tuple[float, float]:
    """(absolute, relative) Frobenius error of keeping the top k of singular values s:
    sqrt(sum_{i>=k} s_i^2), divided by sqrt(sum_i s_i^2) for the relative one (0 for a zero matrix)."""
    sq = s.double().pow(2)
    total = float(sq.sum())
    tail = float(sq[k:].sum())
    return math.sqrt(tail), (math.sqrt(tail / total) if total > 0 else 0.0)


def _weighted(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    return [v.to(_work_dtype(v)) * float(w) for v, w in zip(vectors, weights, strict=True)]


# --------------------------------------------------------------------------------------------
# merges (on the weighted matrices w_i tau_i)
# --------------------------------------------------------------------------------------------
def tsv_merge(vectors: Sequence[torch.Tensor], weights: Sequence[float], rank_fraction: float) -> Factors:
    """TSV-M: per input the top k = keep_count(rank_fraction, r) triplets of w_i tau_i; concatenate;
    U_perp = procrustes([U_1k .. U_Nk]), V_perp likewise; merged = U_perp diag([S_1k .. S_Nk]) V_perp^T."""
    us, ss, vs = [], [], []
    for m in _weighted(vectors, weights):
        f = svd(m)
        k = keep_count(rank_fraction, f.S.shape[0])
        us.append(f.U[:, :k])
        ss.append(f.S[:k])
        vs.append(f.V[:, :k])
    return Factors(procrustes(torch.cat(us, 1)), torch.cat(ss), procrustes(torch.cat(vs, 1)))


def iso_c(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Iso-C: M = sum_i w_i tau_i = U diag(S) V^T; merged = mean(S) * U V^T (a flat spectrum)."""
    total = torch.stack(_weighted(vectors, weights)).sum(0)
    f = svd(total)
    return (f.U * f.S.mean()) @ f.V.T


def iso_cts_sizes(r: int, n_inputs: int, common_fraction: float, sizing: str) -> tuple[int, int]:
    """(k common directions, s directions per input).

    ``fill`` (reference code): k0 = floor(f r); N s = round((r - k0) / N) * N; k = r - N s, so the
    N s + k directions fill r exactly. ``floor``: k = floor(f r), s = floor((r - k) / N)."""
    k0 = math.floor(common_fraction * r)
    if sizing == "fill":
        s = round((r - k0) / n_inputs)
        return r - s * n_inputs, s
    return k0, (r - k0) // n_inputs


def iso_cts(
    vectors: Sequence[torch.Tensor], weights: Sequence[float], common_fraction: float, sizing: str = "fill", spectrum: str = "combined"
) -> torch.Tensor:
    """Iso-CTS: the top k directions of M = sum_i w_i tau_i (common subspace), plus for each input the
    top s directions of (I - U_k U_k^T) w_i tau_i; U = procrustes([U_k, U_1s .. U_Ns]), V likewise;
    merged = sigma * U V^T with sigma the mean of the kept singular values (``combined``: S_k of M and
    the per-input S_s) or of all singular values of M (``sum``: Iso-C's sigma)."""
    weighted = _weighted(vectors, weights)
    total = torch.stack(weighted).sum(0)
    f = svd(total)
    k, s = iso_cts_sizes(f.S.shape[0], len(weighted), common_fraction, sizing)
    uc, vc = f.U[:, :k], f.V[:, :k]
    us, vs, ss = [uc], [vc], [f.S[:k]]
    if s > 0:
        for m in weighted:
            g = svd(m - uc @ (uc.T @ m))
            us.append(g.U[:, :s])
            vs.append(g.V[:, :s])
            ss.append(g.S[:s])
    u, v = procrustes(torch.cat(us, 1)), procrustes(torch.cat(vs, 1))
    sigma = torch.cat(ss).mean() if spectrum == "combined" else f.S.mean()
    return (u * sigma) @ v.T
