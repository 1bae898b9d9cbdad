"""Pure per-tensor masking and merging of task vectors (ALGORITHMS.md section 4). No I/O, no printing.

Every function computes in float32 whatever the input dtype (bf16 included) and returns float32
results or bool masks; the caller casts once on output. Exact semantics, tie rules and the option
names that switch between the peers' variants: docs/methods.md.

Conventions used throughout:

* ``density`` is the fraction of entries KEPT, in [0, 1].
* ``keep_count(density, n)`` = 0 if density == 0, else min(n, max(1, floor(density * n + 1/2))):
  round half up, and at least one entry is kept whenever density > 0 (never a silent all-zero).
* Magnitude ranking ("top-k"): larger |tau| first, ties broken by the LOWER flat (row-major) index;
  under a global scope the flat index runs over the tensors concatenated in sorted key order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tvedit.errors import UsageError

COMPUTE = torch.float32
RESCALES = ("inverse", "l1")
DIVISORS = ("count", "weight-sum")
SCOPES = ("tensor", "global")

# (stream index, key, tensor): one input vector's tensor for one key. Streams are re-iterable.
Stream = Callable[[], Iterable[tuple[int, str, torch.Tensor]]]


# --------------------------------------------------------------------------------------------
# densities and counts
# --------------------------------------------------------------------------------------------
def check_fraction(value: object, name: str = "density") -> float:
    """``value`` as a float in [0, 1], else a UsageError naming the option."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number in [0, 1], not {value!r}") from None
    if not 0.0 <= x <= 1.0 or math.isnan(x):
        raise UsageError(f"{name} must be in [0, 1] (the fraction kept), not {value!r}")
    return x


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def keep_count(density: float, numel: int) -> int:
    """Entries kept out of ``numel``: 0 if density == 0, else clamp(round_half_up(density*numel), 1, numel)."""
    if density <= 0.0 or numel == 0:
        return 0
    return min(numel, max(1, round_half_up(density * numel)))


def _abs32(tau: torch.Tensor) -> torch.Tensor:
    return tau.detach().to(COMPUTE).abs()


def tie_limited_mask(magnitude: torch.Tensor, threshold: float, quota: int | None) -> torch.Tensor:
    """1[|x| > t] plus, among entries with |x| == t, the first ``quota`` in row-major order (all if None)."""
    above = magnitude > threshold
    if quota is None:
        return above | (magnitude == threshold)
    equal = (magnitude == threshold).reshape(-1)
    first = equal & (torch.cumsum(equal, 0) <= quota)
    return above | first.reshape(magnitude.shape)


# --------------------------------------------------------------------------------------------
# magnitude top-k (TIES "trim")
# --------------------------------------------------------------------------------------------
def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Per-tensor magnitude mask keeping exactly keep_count(density, numel) entries.

    m = 1 for the n_keep entries of largest |tau|; ties at the threshold go to the lower flat index.
    """
    a = _abs32(tau)
    return largest_mask(a.reshape(-1), keep_count(density, a.numel())).reshape(a.shape)


def largest_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """1 for the ``k`` largest entries of a flat ``magnitude``; ties at the threshold go to the
    lower index (the order of a stable descending sort, without sorting)."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitude.device)
    threshold = float(torch.kthvalue(magnitude, n - k + 1).values)
    return tie_limited_mask(magnitude, threshold, k - int((magnitude > threshold).sum()))


@dataclass(frozen=True)
class KthLargest:
    """The k-th largest |x| of one stream, with how many entries are strictly greater / equal."""

    value: float
    greater: int
    equal: int


_DIGITS = 1 << 16


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns of |t| as int32: for non-negative floats, integer order == float order."""
    return _abs32(t).reshape(-1).view(torch.int32)


def _pick_digit(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Digit holding the k-th largest (1-based) of a histogram, and the count strictly above it."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)).item())
    digit = _DIGITS - 1 - j
    return digit, int(from_top[j]) - int(hist[digit])


def kth_largest_abs(stream: Stream, ks: Sequence[int]) -> list[KthLargest | None]:
    """Exact k-th largest |x| of each stream (ks[i] for stream i; None where ks[i] == 0).

    Radix select on float32 bit patterns in two passes over the stream, with 16-bit digits counted
    by torch.bincount: pass 1 histograms the high 16 bits, pass 2 the low 16 bits of the entries in
    the selected high bucket. Memory: two 65,536-bin histograms per stream, never the data.
    """
    n = len(ks)
    high = torch.zeros(n, _DIGITS, dtype=torch.int64, device="cpu")  # moved to the data's device (--device)
    for i, _key, t in stream():
        if ks[i] > 0:
            high = high.to(t.device)
            high[i] += torch.bincount(_bits(t) >> 16, minlength=_DIGITS)
    picks = [_pick_digit(high[i], ks[i]) if ks[i] > 0 else (0, 0) for i in range(n)]
    low = torch.zeros(n, _DIGITS, dtype=torch.int64, device=high.device)
    for i, _key, t in stream():
        if ks[i] > 0:
            b = _bits(t)
            sel = b[(b >> 16) == picks[i][0]]
            low = low.to(t.device)
            low[i] += torch.bincount(sel & 0xFFFF, minlength=_DIGITS)
    out: list[KthLargest | None] = []
    for i in range(n):
        if ks[i] <= 0:
            out.append(None)
            continue
        hi, greater_hi = picks[i]
        lo, greater_lo = _pick_digit(low[i], ks[i] - greater_hi)
        bits = torch.tensor([(hi << 16) | lo], dtype=torch.int32, device="cpu")
        out.append(KthLargest(float(bits.view(torch.float32)), greater_hi + greater_lo, int(low[i][lo])))
    return out


@dataclass(frozen=True)
class GlobalThreshold:
    """One vector's global top-k plan: keep |x| > value, and of |x| == value the per-key quotas.

    ``ties`` is None when every entry equal to the threshold is kept; ``keep`` == 0 keeps nothing.
    """

    value: float
    keep: int
    total: int
    ties: dict[str, int] | None = None

    def mask(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        if self.keep == 0:
            return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
        quota = None if self.ties is None else self.ties.get(key, 0)
        return tie_limited_mask(_abs32(tau), self.value, quota)


@dataclass
class Cut:
    """A magnitude cut applied to the consecutive pieces of one tensor in turn: keep |x| > value
    and, of |x| == value, after skipping the first ``skip`` in row-major order, the next ``quota``
    (None: all of them); ``value`` None keeps nothing. Over the pieces it keeps what topk_mask /
    GlobalThreshold.mask keep on the whole tensor (``skip`` 0: ties to the lower index), or with
    ``of_kth(..., ties="high")`` the k largest with ties to the higher index (an ascending stable
    sort's top k)."""

    value: float | None
    quota: int | None = None
    skip: int = 0

    @classmethod
    def of_kth(cls, kth: KthLargest | None, keep: int, ties: str = "low") -> Cut:
        if kth is None:
            return cls(None)
        quota = keep - kth.greater
        return cls(kth.value, quota, kth.equal - quota if ties == "high" else 0)

    @classmethod
    def of_plan(cls, plan: GlobalThreshold, key: str) -> Cut:
        if plan.keep == 0:
            return cls(None)
        return cls(plan.value, None if plan.ties is None else plan.ties.get(key, 0))

    def take(self, tau: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
        magnitude = _abs32(tau)
        if self.skip == 0:
            keep = tie_limited_mask(magnitude, self.value, self.quota)
            if self.quota is not None:
                self.quota -= min(self.quota, int((magnitude == self.value).sum()))
            return keep
        assert self.quota is not None
        equal = (magnitude == self.value).reshape(-1)
        seen = torch.cumsum(equal, 0)
        keep = (magnitude > self.value) | (equal & (seen > self.skip) & (seen <= self.skip + self.quota)).reshape(magnitude.shape)
        n_equal = int(seen[-1]) if seen.numel() else 0
        skipped = min(self.skip, n_equal)
        self.skip -= skipped
        self.quota -= min(self.quota, n_equal - skipped)
        return keep


def chunk_cuts(chunks: Callable[[], Iterable[Sequence[torch.Tensor]]], ks: Sequence[int], ties: str = "low") -> list[Cut]:
    """For input i, the cut keeping the ks[i] largest |x| of one huge tensor whose inputs come in
    chunks (``chunks()`` iterates lists with one piece per input and can be called twice): an exact
    radix select over the pieces (kth_largest_abs). ``ties``: "low" (to the lower index) or "high"."""

    def stream() -> Iterator[tuple[int, str, torch.Tensor]]:
        for pieces in chunks():
            for i, piece in enumerate(pieces):
                yield i, "", piece

    return [Cut.of_kth(r, k, ties) for r, k in zip(kth_largest_abs(stream, ks), ks, strict=True)]


def global_topk_plan(stream: Stream, n_streams: int, density: float) -> list[GlobalThreshold]:
    """Per stream, one threshold over all its tensors keeping keep_count(density, total numel).

    Three passes at most (sizes, then radix select); a fourth counts threshold ties per key only
    when the ties straddle the cut. Ties go to the lower flat index over keys in sorted order.
    """
    totals = [0] * n_streams
    for i, _key, t in stream():
        totals[i] += t.numel()
    ks = [keep_count(density, n) for n in totals]
    kth = kth_largest_abs(stream, ks)
    plans: list[GlobalThreshold] = []
    straddle = [r is not None and r.greater + r.equal > ks[i] for i, r in enumerate(kth)]
    counts: list[dict[str, int]] = [{} for _ in range(n_streams)]
    if any(straddle):
        for i, key, t in stream():
            r = kth[i]
            if straddle[i] and r is not None:
                counts[i][key] = counts[i].get(key, 0) + int((_abs32(t) == r.value).sum())
    for i, r in enumerate(kth):
        if r is None:
            plans.append(GlobalThreshold(math.inf, 0, totals[i]))
            continue
        ties = None
        if straddle[i]:
            left = ks[i] - r.greater
            ties = {}
            for key in sorted(counts[i]):
                ties[key] = min(counts[i][key], left)
                left -= ties[key]
        plans.append(GlobalThreshold(r.value, ks[i], totals[i], ties))
    return plans


# --------------------------------------------------------------------------------------------
# exact L1 norms (the same value whole or summed over chunks)
# --------------------------------------------------------------------------------------------
def l1_parts(t: torch.Tensor) -> torch.Tensor:
    """Partial sums of ||t||_1 that add up exactly and in any order: per exponent, the sum of the
    mantissas (implicit bit included) as int64; float32 (and narrower) values: 256 bins; float64:
    2 x 2048 bins (the high and low 26 bits of the mantissa). Pieces of one tensor add up to the
    parts of the whole (``l1_parts(a) + l1_parts(b)``)."""
    if t.dtype == torch.float64:
        bits = t.detach().abs().reshape(-1).view(torch.int64)
        exponent = bits >> 52
        mantissa = (bits & ((1 << 52) - 1)) | ((exponent > 0).to(torch.int64) << 52)
        parts = torch.zeros(2, 2048, dtype=torch.int64, device=t.device)
        parts[0].index_add_(0, exponent, mantissa >> 26)
        parts[1].index_add_(0, exponent, mantissa & ((1 << 26) - 1))
        return parts.cpu()
    bits = _bits(t)
    exponent = bits >> 23
    mantissa = (bits & 0x7FFFFF) | ((exponent > 0).to(torch.int32) << 23)
    return torch.zeros(256, dtype=torch.int64, device=t.device).index_add_(0, exponent, mantissa.to(torch.int64)).cpu()


def l1_value(parts: torch.Tensor) -> float:
    """||t||_1 from its ``l1_parts``: the exact sum rounded once to float64 (NaN for any non-finite
    entry), so it does not depend on summation order or on how the tensor was split."""
    if parts.dim() == 2:  # float64: entry = mantissa * 2^(max(e, 1) - 1075)
        sums = [(hi << 26) + lo for hi, lo in zip(parts[0].tolist(), parts[1].tolist(), strict=True)]
        scale = 1074
    else:  # float32: entry = mantissa * 2^(max(e, 1) - 150)
        sums = [int(x) for x in parts.tolist()]
        scale = 149
    if sums[-1]:
        return math.nan
    # scaled by 2^scale every term is an integer
    return sum(m << (max(e, 1) - 1) for e, m in enumerate(sums) if m) / (1 << scale)


def l1_norm(t: torch.Tensor) -> float:
    """sum |t| computed exactly (see l1_value)."""
    return l1_value(l1_parts(t))


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------
def derived_seed(seed: int, index: int, key: str) -> int:
    """The generator seed for input ``index`` (0-based) and tensor ``key``: sha256("seed/index/key")[:8]."""
    digest = hashlib.sha256(f"{int(seed)}/{int(index)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_mask(shape: Sequence[int], density: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli(density) keep-mask: m = 1[u < density], u ~ U[0, 1) float32 from ``generator``
    (a CPU generator: the mask is drawn on the host, the same on every ``device``, then moved)."""
    return (torch.rand(tuple(shape), generator=generator, dtype=COMPUTE, device="cpu") < density).to(device)


def dare_rescale(tau: torch.Tensor, keep: torch.Tensor, density: float, rescale: str = "inverse",
                 norms: tuple[float, float] | None = None) -> torch.Tensor:
    """DARE survivors rescaled: ``inverse``: tau*m/density (0 if density == 0);
    ``l1``: tau*m * ||tau||_1 / ||tau*m||_1 (0 if nothing survives), the norms exact (l1_norm), or
    ``norms`` = (||tau||_1, ||tau*m||_1) of the whole tensor when ``tau`` is one chunk of it."""
    t = tau.to(COMPUTE)
    kept = torch.where(keep, t, torch.zeros((), dtype=COMPUTE, device=t.device))
    if rescale == "inverse":
        return kept / density if density > 0 else torch.zeros_like(kept)
    if rescale == "l1":
        total, kept_norm = norms if norms is not None else (l1_norm(t), l1_norm(kept))
        if kept_norm == 0.0:
            return torch.zeros_like(kept)
        return kept * (total / kept_norm)
    raise UsageError(f"rescale must be one of {', '.join(RESCALES)}, not {rescale!r}")


def dare(tau: torch.Tensor, density: float, generator: torch.Generator, rescale: str = "inverse") -> tuple[torch.Tensor, torch.Tensor]:
    """(rescaled survivors, keep-mask): dare_rescale(tau, dare_mask(...), density, rescale)."""
    keep = dare_mask(tau.shape, density, generator, tau.device)
    return dare_rescale(tau, keep, density, rescale), keep


# --------------------------------------------------------------------------------------------
# Breadcrumbs
# --------------------------------------------------------------------------------------------
def breadcrumbs_mask(tau: torch.Tensor, density: float, beta: float = 0.01, per_row: bool = True) -> torch.Tensor:
    """Drop the top beta of each row (last dim) by |tau|, keep the next density, drop the rest.

    Per row of length n: ranks r = 0..n-1 by (|tau| descending, index ascending);
    n_top = round_half_up(beta * n) (may be 0: nothing dropped), n_keep = min(keep_count(density, n),
    n - n_top); m = 1[n_top <= r < n_top + n_keep]. ``per_row=False`` ranks the whole tensor at once.
    """
    a = _abs32(tau)
    rows = a.reshape(-1, a.shape[-1]) if (per_row and a.dim() >= 1) else a.reshape(1, -1)
    n = rows.shape[1]
    if rows.numel() == 0:
        return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    n_top = min(n, round_half_up(beta * n))
    n_keep = min(keep_count(density, n), n - n_top)
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand_as(order).contiguous())
    return ((rank >= n_top) & (rank < n_top + n_keep)).reshape(a.shape)


# --------------------------------------------------------------------------------------------
# TALL masks and consensus
# --------------------------------------------------------------------------------------------
def tall_masks(vectors: Sequence[torch.Tensor], lam: float = 0.6) -> list[torch.Tensor]:
    """m_t = 1[|tau_t| >= lam * |tau_MTL - tau_t|] with tau_MTL = sum_t tau_t."""
    taus = [v.to(COMPUTE) for v in vectors]
    total = torch.stack(taus).sum(0)
    return [t.abs() >= lam * (total - t).abs() for t in taus]


def consensus_mask(masks: Sequence[torch.Tensor], min_agree: int = 2) -> torch.Tensor:
    """1[sum_t m_t >= min_agree]."""
    count = torch.stack([m.to(torch.int64) for m in masks]).sum(0)
    return count >= min_agree


def consensus_merge(vectors: Sequence[torch.Tensor], lam: float = 0.6, min_agree: int = 2) -> torch.Tensor:
    """consensus_mask(tall_masks(tau, lam), min_agree) * sum_t tau_t."""
    total = torch.stack([v.to(COMPUTE) for v in vectors]).sum(0)
    keep = consensus_mask(tall_masks(vectors, lam), min_agree)
    return torch.where(keep, total, torch.zeros((), dtype=COMPUTE, device=total.device))


# --------------------------------------------------------------------------------------------
# TIES: elect + disjoint mean
# --------------------------------------------------------------------------------------------
def ties_merge(
    trimmed: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    weighted_election: bool = False,
    divisor: str = "count",
) -> torch.Tensor:
    """TIES sign election and disjoint mean over already trimmed vectors t_i with weights w_i.

    gamma = sign(sum_i e_i t_i), zero -> +1, with e_i = w_i (weighted election) or 1 (default);
    a_i = 1[sign(t_i) == gamma]; merged = sum_i a_i w_i t_i / D with D = max(1, sum_i a_i)
    (divisor "count", default) or D = sum_i a_i w_i, 1 where that is 0 ("weight-sum").
    """
    if len(trimmed) != len(weights):
        raise ValueError("one weight per vector")
    if divisor not in DIVISORS:
        raise UsageError(f"divisor must be one of {', '.join(DIVISORS)}, not {divisor!r}")
    taus = [t.to(COMPUTE) for t in trimmed]
    elect = torch.zeros(taus[0].shape, dtype=COMPUTE, device=taus[0].device)
    for t, w in zip(taus, weights, strict=True):
        elect.add_(t, alpha=float(w) if weighted_election else 1.0)
    gamma = torch.where(elect >= 0, 1.0, -1.0)
    numerator = torch.zeros_like(elect)
    count = torch.zeros_like(elect)
    weight_sum = torch.zeros_like(elect)
    for t, w in zip(taus, weights, strict=True):
        agree = (torch.sign(t) == gamma).to(COMPUTE)
        numerator.add_(agree * t, alpha=float(w))
        count.add_(agree)
        weight_sum.add_(agree, alpha=float(w))
    if divisor == "count":
        return numerator / count.clamp_min(1.0)
    return numerator / torch.where(weight_sum == 0, torch.ones_like(weight_sum), weight_sum)


def masked(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """tau * m in float32 (exact zeros outside the mask)."""
    return torch.where(keep, tau.to(COMPUTE), torch.zeros((), dtype=COMPUTE, device=tau.device))
