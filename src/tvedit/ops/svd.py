"""Pure per-tensor singular-value math: TSV-M, Iso-C, Iso-CTS merges and low-rank truncation.

Every function takes plain tensors (one key's matrices) and returns tensors; no I/O, no options
parsing. SVDs run in float32 at least (float64 when the inputs are float64), on the inputs' device;
callers move tensors to a GPU first if they want the SVDs there. Semantics: docs/methods.md
("Singular-value merges") and docs/manifest.md ("Low-rank layout").

Conventions: a thin SVD ``A = U diag(S) V^T`` with U (m, r), S (r,), V (n, r), r = min(m, n),
singular values descending. Low-rank factors are returned as a :class:`Factors` triple in that
same orientation (V holds the right singular vectors as columns, not V^T).

Routes to the same triplets (``route``): ``exact`` is LAPACK's full SVD in the working dtype
(of A^T when A is wide). ``auto`` (the default) applies to float32 (or narrower) matrices on the
CPU and tries, in order:

* the refined route (:func:`refine_top`), when only the top k < r triplets are kept (TSV-M's
  inputs, Iso-CTS's residuals, ``compress``): eigh of the float32 Gram matrix of the short side
  gives a starting basis of the top b > k eigenvectors (b grows until the eigenvalue after it is
  at most REFINE_FAR times the k-th, and at most r / 2), then one Rayleigh-Ritz step in float64
  on A itself (U = A V / S). Its error estimate (first order, from the Ritz residuals: see
  :func:`refine_top`) must be at most REFINE_TOL, relative to the rank-k product; otherwise, or
  when no such b exists, the next route runs;
* the Gram route, for matrices whose long side is at least ``GRAM_ASPECT`` times the short one: the
  eigendecomposition of the small Gram matrix A^T A (or A A^T) in float64, U = A V / S. Rounding
  there perturbs an eigenvalue by about L eps64 sigma_1^2 (L the long side), i.e. sigma_i by
  L eps64 sigma_1^2 / (2 sigma_i), against eps32 sigma_1 for the float32 SVD; so the Gram route is
  at least as accurate as the float32 SVD for every triplet with sigma_i >= L (eps64 / eps32)
  sigma_1 (about 6e-6 sigma_1 at L = 3072), and it is taken only when every triplet asked for
  passes that test;
* otherwise the full SVD.

float64 inputs always take the full SVD (neither float32 start nor Gram matrix would keep their
digits). Randomized SVDs are not used: on matrices without a wide spectral gap at k (random task
vectors, power-law spectra) they do not give the same triplets (docs/performance.md,
"Singular-value merges").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
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


ROUTES = ("auto", "exact")
GRAM_ASPECT = 2.0  # long side / short side from which the Gram route pays (docs/performance.md)
REFINE_FAR = 0.9  # the refined route's basis ends where the eigenvalue of G falls to 0.9 lambda_k
REFINE_TOL = 5e-5  # the largest estimated relative error of a top-k product the refined route returns (half of 1e-4)
_EPS32 = torch.finfo(torch.float32).eps
_EPS_RATIO = torch.finfo(torch.float64).eps / _EPS32


Keep = int | Callable[[torch.Tensor], int] | None  # k, a rule choosing k from all singular values, or all


def svd(a: torch.Tensor, k: Keep = None, route: str = "auto") -> Factors:
    """The top k singular triplets of a 2-D tensor (all r = min(m, n) when k is None; k(S) when k is
    a function of the whole descending spectrum S), in float32 (float64 stays float64):
    A ~ U diag(S) V^T. ``route``: see the module docstring."""
    work = a.to(_work_dtype(a))
    if route == "auto" and _fast_routes_apply(work):
        refined = refine_top(work, k) if k is not None else None
        if refined is not None and refined.error_estimate <= REFINE_TOL:
            return refined.factors
        f = _gram_svd(work, k) if max(work.shape) >= GRAM_ASPECT * min(work.shape) else None
        if f is not None:
            return f
    u, s, vh = _lapack_svd(work)
    k = k(s) if callable(k) else k
    if k is not None:
        u, s, vh = u[:, :k], s[:k], vh[:k]
    return Factors(u, s, vh.mT)


def _lapack_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAPACK's thin SVD (gesdd), of A^T when A is wide (A^T = V S U^T: gesdd is much slower on wide
    row-major inputs in this torch build). gesdd can fail
    to converge on matrices with many repeated near-zero singular values (Iso-CTS's residuals have
    r - k of them): then the other orientation, then float64, are tried before giving up."""
    wide = a.shape[0] < a.shape[1]
    for x, transposed in ((a.mT, True), (a, False)) if wide else ((a, False), (a.mT, True)):
        try:
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
        except torch.linalg.LinAlgError:
            continue
        return (vh.mT, s, u.mT) if transposed else (u, s, vh)
    if a.dtype == torch.float64:
        return torch.linalg.svd(a, full_matrices=False)  # raises LAPACK's error
    u, s, vh = _lapack_svd(a.to(torch.float64))
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _fast_routes_apply(a: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and a.device.type == "cpu" and min(a.shape) > 0


@dataclass
class Refined:
    """The refined route's answer: the top-k factors, the estimated relative error of their
    product U diag(S) V^T against the exact top-k product, and the basis size b it used."""

    factors: Factors
    error_estimate: float
    basis: int


def refine_top(a: torch.Tensor, k: Keep) -> Refined | None:
    """The top k singular triplets of a float32 matrix from a float32 eigensolve refined in float64.

    Let x be A or A^T, whichever is tall (L x r), G = x^T x. (1) eigh of G formed in float32 gives
    approximate eigenpairs (lam_i, w_i), lam descending; k is chosen here when it is a rule (from
    sqrt(lam)). (2) b = the least index > k with lam_{b+1} <= REFINE_FAR lam_k; None (no answer)
    when b > r / 2 (no clear gap after k: the full routes are as cheap). (3) Rayleigh-Ritz in
    float64 on Q = orth(w_1 .. w_b): Y = x Q, Z = x^T Y = G Q, H = Q^T Z = C diag(theta) C^T,
    V = Q C[:, :k], S = sqrt(theta[:k]), U = Y C[:, :k] / S. The triplets are then as exact as
    the subspace span(Q) allows, whatever the gap at the cut k (the float64 eigh of H resolves it).
    (4) The error estimate: with E = Z - Q H (the residual, orthogonal to span(Q)), r_i its part on
    the i-th Ritz vector, mu = lam_{b+1} + r eps32 lam_1 + ||E||_F (a bound on G's spectrum outside
    span(Q), from the float32 eigenvalues and Weyl), each kept Ritz vector is off by at most about
    ||r_i|| / (theta_i - mu) (first order), plus the coupling to the other Ritz vectors through the
    outside, a factor (1 + ||E||_F / (theta_k - theta_{k+1})); the product's error is estimated as
    2 sqrt(sum_i (S_i ||r_i|| / (theta_i - mu))^2) (1 + ||E||_F / (theta_k - theta_{k+1})) / ||S||_F.
    It is infinite when theta_k <= mu or theta_k = theta_{k+1} (the cut is not resolved).
    For a rule k, the rule is re-applied to the refined spectrum (theta_1..b, then lam_{b+1}..) and
    must give the same k (else the estimate is infinite)."""
    if a.dtype != torch.float32 or min(a.shape) == 0:
        return None
    wide = a.shape[0] < a.shape[1]
    x = a.mT if wide else a  # tall: (L, r)
    start = _start_basis(x, k)
    if start is None:
        return None
    lam, q, kept = start
    ritz = _rayleigh_ritz(x.double(), q)
    if ritz is None:
        return None
    y, resid, theta, c = ritz
    s = theta[:kept].clamp_min(0).sqrt()
    estimate = _ritz_error(lam, theta, c, resid, kept, k if callable(k) else None)
    c = c[:, :kept]
    v = q @ c
    u = (y @ c).div_(s)
    if wide:
        u, v = v, u
    return Refined(Factors(u.to(a.dtype), s.to(a.dtype), v.to(a.dtype)), estimate, q.shape[1])


def _start_basis(x: torch.Tensor, k: Keep) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Steps (1)-(2) of :func:`refine_top` on a tall float32 x: G's eigenvalues (descending,
    float64), an orthonormal float64 basis of its top b eigenvectors, and k (a rule applied to
    sqrt(lam)); None when there is nothing to refine or no b <= r / 2."""
    r = x.shape[1]
    try:
        lam, w = torch.linalg.eigh(x.mT @ x)  # ascending
    except torch.linalg.LinAlgError:
        return None
    lam, w = lam.flip(0).double(), w.flip(1)
    k = k(lam.clamp_min(0).sqrt()) if callable(k) else r if k is None else k
    if not 0 < k < r or float(lam[k - 1]) <= 0:
        return None
    past = torch.nonzero(lam[k:] <= REFINE_FAR * lam[k - 1])
    if past.numel() == 0:
        return None
    b = max(k + int(past[0]), k + 1)
    if b > r // 2:
        return None
    q = w[:, :b].double()
    try:
        q = torch.linalg.solve_triangular(torch.linalg.cholesky(q.mT @ q).mT, q, upper=True, left=False)  # q L^-T: orthonormal
    except torch.linalg.LinAlgError:
        return None
    return lam, q, k


def _rayleigh_ritz(x64: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step (3) of :func:`refine_top` in float64: Y = x Q, the residual E = x^T Y - Q H, and the
    eigenpairs (theta descending, C) of H = Q^T x^T x Q."""
    y = x64 @ q
    z = x64.mT @ y
    h = q.mT @ z
    theta, c = torch.linalg.eigh((h + h.mT) / 2)
    return y, z - q @ h, theta.flip(0), c.flip(1)


def _ritz_error(lam: torch.Tensor, theta: torch.Tensor, c: torch.Tensor, resid: torch.Tensor, k: int,
                rule: Callable[[torch.Tensor], int] | None) -> float:  # fmt: skip
    """Step (4) of :func:`refine_top`: the first-order estimate of the rank-k product's relative
    error (infinite when the cut at k is not resolved, or a rule would choose another k)."""
    r, b = lam.shape[0], theta.shape[0]
    e = float(resid.norm())
    s = theta[:k].clamp_min(0).sqrt()
    mu = float(lam[b]) + r * _EPS32 * float(lam[0]) + e
    cut = float(theta[k - 1] - theta[k])
    if rule is not None and rule(torch.cat([theta.clamp_min(0).sqrt(), lam[b:].clamp_min(0).sqrt()])) != k:
        cut = 0.0
    if not (float(theta[k - 1]) > mu and cut > 0 and float(s.norm()) > 0):
        return math.inf
    per_vector = (resid @ c[:, :k]).norm(dim=0) / (theta[:k] - mu)
    return 2 * float((s * per_vector).norm() / s.norm()) * (1 + e / cut)


def _gram_svd(a: torch.Tensor, k: Keep) -> Factors | None:
    """Top k triplets from eigh of the float64 Gram matrix of the short side; None when a triplet
    asked for has sigma_i < L (eps64 / eps32) sigma_1 (there the float32 SVD is the more accurate)."""
    wide = a.shape[0] < a.shape[1]
    x = (a.mT if wide else a).to(torch.float64)  # tall: (L, r)
    try:
        lam, w = torch.linalg.eigh(x.mT @ x)  # ascending
    except torch.linalg.LinAlgError:
        return None
    s = lam.flip(0).clamp_min(0).sqrt()
    k = s.shape[0] if k is None else k(s) if callable(k) else k
    s = s[:k]
    floor = x.shape[0] * _EPS_RATIO * float(s[0])
    if not (floor > 0 and float(s[-1]) >= floor):
        return None
    v = w.flip(1)[:, :k]
    u = (x @ v).div_(s)
    if wide:
        u, v = v, u
    return Factors(u.to(a.dtype), s.to(a.dtype), v.to(a.dtype))


def procrustes(m: torch.Tensor, route: str = "auto") -> torch.Tensor:
    """The nearest matrix with orthonormal columns (rows, if m is wide) to m: P Q^T for m = P Sigma Q^T."""
    f = svd(m, route=route)
    return f.U @ f.V.mT


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
    k = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=torch.float64, device=cum.device) * (1 - 1e-12)).item()) + 1
    return max(1, min(k, r))


def truncate(a: torch.Tensor, k: int, route: str = "auto") -> Factors:
    """The best rank-k approximation of a (Eckart-Young): the top k singular triplets."""
    f = svd(a, k, route)
    return Factors(f.U.contiguous(), f.S.contiguous(), f.V.contiguous())


def _weighted(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> Iterator[torch.Tensor]:
    """w_i tau_i in the working dtype, one at a time."""
    for v, w in zip(vectors, weights, strict=True):
        yield v.to(_work_dtype(v)) * float(w)


def weighted_sum(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i tau_i in the working dtype, accumulated in one buffer (no stacked copies)."""
    total = vectors[0].to(_work_dtype(vectors[0])) * float(weights[0])
    for v, w in zip(vectors[1:], weights[1:], strict=True):
        total.add_(v.to(total.dtype), alpha=float(w))
    return total


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


# --------------------------------------------------------------------------------------------
# merges (on the weighted matrices w_i tau_i)
# --------------------------------------------------------------------------------------------
def tsv_merge(vectors: Sequence[torch.Tensor], weights: Sequence[float], rank_fraction: float, route: str = "auto") -> Factors:
    """TSV-M: per input the top k = keep_count(rank_fraction, r) triplets of w_i tau_i; concatenate;
    U_perp = procrustes([U_1k .. U_Nk]), V_perp likewise; merged = U_perp diag([S_1k .. S_Nk]) V_perp^T."""
    us, ss, vs = [], [], []
    for m in _weighted(vectors, weights):
        f = svd(m, keep_count(rank_fraction, min(m.shape)), route)
        us.append(f.U)
        ss.append(f.S)
        vs.append(f.V)
    return Factors(procrustes(torch.cat(us, 1), route), torch.cat(ss), procrustes(torch.cat(vs, 1), route))


def iso_c(vectors: Sequence[torch.Tensor], weights: Sequence[float], route: str = "auto") -> torch.Tensor:
    """Iso-C: M = sum_i w_i tau_i = U diag(S) V^T; merged = mean(S) * U V^T (a flat spectrum)."""
    f = svd(weighted_sum(vectors, weights), route=route)
    return (f.U * f.S.mean()) @ f.V.mT


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
    vectors: Sequence[torch.Tensor], weights: Sequence[float], common_fraction: float, sizing: str = "fill", spectrum: str = "combined",
    route: str = "auto",
) -> torch.Tensor:
    """Iso-CTS: the top k directions of M = sum_i w_i tau_i (common subspace), plus for each input the
    top s directions of (I - U_k U_k^T) w_i tau_i; U = procrustes([U_k, U_1s .. U_Ns]), V likewise;
    merged = sigma * U V^T with sigma the mean of the kept singular values (``combined``: S_k of M and
    the per-input S_s) or of all singular values of M (``sum``: Iso-C's sigma)."""
    f = svd(weighted_sum(vectors, weights), route=route)
    k, s = iso_cts_sizes(f.S.shape[0], len(vectors), common_fraction, sizing)
    uc, vc = f.U[:, :k], f.V[:, :k]
    us, vs, ss = [uc], [vc], [f.S[:k]]
    if s > 0:
        for m in _weighted(vectors, weights):
            g = svd(m - uc @ (uc.mT @ m), s, route)
            us.append(g.U)
            vs.append(g.V)
            ss.append(g.S)
    u, v = procrustes(torch.cat(us, 1), route), procrustes(torch.cat(vs, 1), route)
    sigma = torch.cat(ss).mean() if spectrum == "combined" else f.S.mean()
    return (u * sigma) @ v.mT
