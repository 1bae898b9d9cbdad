"""The pure masking / merging functions against straightforward dense references (ALGORITHMS.md section 4).

Every reference here is written independently of the implementation: whole-tensor torch or plain
Python sorting, following the formulas in docs/methods.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from tvedit.errors import UsageError
from tvedit.ops import sparsify


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def ref_keep(density: float, n: int) -> int:
    if density == 0 or n == 0:
        return 0
    return min(n, max(1, math.floor(density * n + 0.5)))


def ref_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Rank by (|tau| descending, flat index ascending) with a Python sort; keep the first n_keep."""
    a = tau.float().abs().reshape(-1).tolist()
    order = sorted(range(len(a)), key=lambda i: (-a[i], i))
    keep = torch.zeros(len(a), dtype=torch.bool)
    keep[order[: ref_keep(density, len(a))]] = True
    return keep.reshape(tau.shape)


def ref_breadcrumbs(tau: torch.Tensor, density: float, beta: float) -> torch.Tensor:
    rows = tau.float().abs().reshape(-1, tau.shape[-1])
    n = rows.shape[1]
    n_top = math.floor(beta * n + 0.5)
    n_keep = min(ref_keep(density, n), n - n_top)
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for r, row in enumerate(rows.tolist()):
        order = sorted(range(n), key=lambda i, row=row: (-row[i], i))
        out[r, order[n_top : n_top + n_keep]] = True
    return out.reshape(tau.shape)


def ref_ties(trimmed: list[torch.Tensor], weights: list[float], weighted: bool = False, divisor: str = "count") -> torch.Tensor:
    T = torch.stack([t.float() for t in trimmed])
    W = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * (T.dim() - 1)))
    elect = (T * W).sum(0) if weighted else T.sum(0)
    gamma = torch.where(elect >= 0, 1.0, -1.0)
    agree = (torch.sign(T) == gamma).float()
    num = (agree * W * T).sum(0)
    den = agree.sum(0).clamp(min=1) if divisor == "count" else (agree * W).sum(0)
    if divisor != "count":
        den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.25, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("shape", [(1,), (3,), (7, 5), (16, 33)])
def test_topk_matches_sorted_reference(density: float, shape: tuple[int, ...]) -> None:
    tau = rand(*shape, seed=len(shape))
    m = sparsify.topk_mask(tau, density)
    assert m.dtype == torch.bool and m.shape == tau.shape
    assert torch.equal(m, ref_topk(tau, density))
    assert int(m.sum()) == ref_keep(density, tau.numel())


def test_topk_guards_tiny_tensors_and_density_zero() -> None:
    tau = torch.tensor([0.1, -3.0, 2.0])
    assert sparsify.topk_mask(tau, 0.01).tolist() == [False, True, False]  # k*n < 1: one kept
    assert not sparsify.topk_mask(tau, 0.0).any()  # density 0: all dropped, explicitly
    assert sparsify.topk_mask(tau, 1.0).all()


def test_topk_ties_at_threshold_go_to_the_lower_index() -> None:
    tau = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 3.0])
    m = sparsify.topk_mask(tau, 0.375)  # 3 of 8: 3.0 then the first two |2.0| (indices 1, 2)
    assert m.tolist() == [False, True, True, False, False, False, False, True]
    ints = torch.randint(-3, 4, (50, 20), generator=torch.Generator().manual_seed(3)).float()  # many ties
    for d in (0.05, 0.3, 0.77):
        assert torch.equal(sparsify.topk_mask(ints, d), ref_topk(ints, d))


def test_topk_all_zero_and_bf16() -> None:
    z = torch.zeros(4, 5)
    m = sparsify.topk_mask(z, 0.2)
    assert int(m.sum()) == 4 and torch.equal(m, ref_topk(z, 0.2))  # a mask of positions; values stay 0
    assert not sparsify.masked(z, m).any()
    b = rand(9, 11, seed=5).to(torch.bfloat16)
    assert torch.equal(sparsify.topk_mask(b, 0.3), ref_topk(b.float(), 0.3))
    assert sparsify.masked(b, sparsify.topk_mask(b, 0.3)).dtype == torch.float32


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x"])
def test_density_outside_unit_interval_is_a_usage_error(bad: object) -> None:
    with pytest.raises(UsageError):
        sparsify.check_fraction(bad)


# --------------------------------------------------------------------------------------------
# radix select and the global plan
# --------------------------------------------------------------------------------------------
def _stream(parts: dict[int, dict[str, torch.Tensor]]) -> sparsify.Stream:
    return lambda: [(i, key, t) for i, tensors in parts.items() for key, t in tensors.items()]


@pytest.mark.parametrize("seed", [0, 1])
def test_radix_select_equals_topk(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5000, generator=g)
    x[::3] = torch.round(x[::3] * 4) / 4  # many duplicates
    x[::11] = 0.0
    x[7] = -x[8]  # equal magnitudes of opposite sign
    parts = {0: {"a": x[:1234], "b": x[1234:].reshape(-1, 2)}, 1: {"a": -x[:100].to(torch.bfloat16)}}
    y = parts[1]["a"].float().abs()
    for k in (1, 17, 2500, 5000):
        k1 = min(k, 100)
        r0, r1 = sparsify.kth_largest_abs(_stream(parts), [k, k1])
        assert r0 is not None and r1 is not None
        v0 = float(torch.topk(x.abs(), k).values[-1])
        assert r0.value == v0 == float(torch.kthvalue(x.abs(), x.numel() - k + 1).values)
        assert (r0.greater, r0.equal) == (int((x.abs() > v0).sum()), int((x.abs() == v0).sum()))
        assert r1.value == float(torch.topk(y, k1).values[-1])
    assert sparsify.kth_largest_abs(_stream(parts), [0, 0]) == [None, None]


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 1.0])
def test_global_plan_equals_dense_topk_over_the_concatenation(density: float) -> None:
    g = torch.Generator().manual_seed(4)
    tensors = {"b.w": torch.randint(-4, 5, (30, 7), generator=g).float(), "a.w": torch.randn(50, generator=g), "c": torch.zeros(3)}
    tensors["a.w"][:10] = 2.0  # ties that straddle the cut in several keys
    plan = sparsify.global_topk_plan(_stream({0: tensors}), 1, density)[0]
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].reshape(-1) for k in keys])
    ref = ref_topk(flat, density).split([tensors[k].numel() for k in keys])
    for key, r in zip(keys, ref, strict=True):
        assert torch.equal(plan.mask(key, tensors[key]), r.reshape(tensors[key].shape)), key
    assert sum(int(plan.mask(k, tensors[k]).sum()) for k in keys) == ref_keep(density, flat.numel())


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------
def test_dare_reference_inverse_and_l1() -> None:
    tau = rand(40, 25, seed=7)
    for density in (0.0, 0.1, 0.5, 1.0):
        out, keep = sparsify.dare(tau, density, torch.Generator().manual_seed(11))
        u = torch.rand(tau.shape, generator=torch.Generator().manual_seed(11))
        assert torch.equal(keep, u < density)
        ref = torch.zeros_like(tau) if density == 0 else torch.where(u < density, tau, 0.0) / density
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out, keep = sparsify.dare(tau, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, tau) and keep.all()
    out, keep = sparsify.dare(tau, 0.3, torch.Generator().manual_seed(2), rescale="l1")
    kept = torch.where(keep, tau, 0.0)
    torch.testing.assert_close(out, kept * tau.abs().sum() / kept.abs().sum())
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
    assert not sparsify.dare(tau, 0.0, torch.Generator().manual_seed(2), rescale="l1")[0].any()


def test_dare_seeds_are_per_input_and_key() -> None:
    s = sparsify.derived_seed
    assert s(0, 0, "a") == s(0, 0, "a") and len({s(0, 0, "a"), s(1, 0, "a"), s(0, 1, "a"), s(0, 0, "b")}) == 4


# --------------------------------------------------------------------------------------------
# Breadcrumbs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("density", "beta"), [(0.1, 0.01), (0.3, 0.1), (0.5, 0.0), (1.0, 0.2), (0.0, 0.1), (0.01, 0.01)])
def test_breadcrumbs_matches_reference(density: float, beta: float) -> None:
    tau = rand(6, 40, seed=9)
    tau[0, :5] = 1.5  # ties
    assert torch.equal(sparsify.breadcrumbs_mask(tau, density, beta), ref_breadcrumbs(tau, density, beta))


def test_breadcrumbs_n_top_zero_keeps_the_top_instead_of_zeroing() -> None:
    tau = torch.tensor([[0.5, -4.0, 1.0, 2.0]])  # beta * 4 = 0.04 -> n_top = 0
    m = sparsify.breadcrumbs_mask(tau, 0.5, 0.01)
    assert m.tolist() == [[False, True, False, True]]
    b = sparsify.breadcrumbs_mask(rand(8, seed=1), 0.25, 0.01)  # 1-D: the whole vector is one row
    assert torch.equal(b, ref_breadcrumbs(rand(8, seed=1).reshape(1, -1), 0.25, 0.01).reshape(-1))
    whole = rand(5, 6, seed=2)
    assert torch.equal(sparsify.breadcrumbs_mask(whole, 0.2, 0.1, per_row=False), ref_breadcrumbs(whole.reshape(1, -1), 0.2, 0.1).reshape(5, 6))


# --------------------------------------------------------------------------------------------
# TALL and consensus
# --------------------------------------------------------------------------------------------
def test_tall_and_consensus_match_formulas() -> None:
    taus = [rand(12, 9, seed=s) for s in (1, 2, 3)]
    taus[2][0] = 0.0
    total = taus[0] + taus[1] + taus[2]
    for lam in (0.0, 0.2, 0.6, 2.0):
        masks = sparsify.tall_masks(taus, lam)
        for t, m in zip(taus, masks, strict=True):
            assert torch.equal(m, t.abs() >= lam * (total - t).abs())
        for c in (0, 1, 2, 3):
            agree = sum(m.int() for m in masks) >= c
            assert torch.equal(sparsify.consensus_mask(masks, c), agree)
            torch.testing.assert_close(sparsify.consensus_merge(taus, lam, c), torch.where(agree, total, 0.0))


# --------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("divisor", ["count", "weight-sum"])
def test_ties_merge_matches_reference(weighted: bool, divisor: str) -> None:
    taus = [rand(10, 8, seed=s) for s in (1, 2, 3)]
    trimmed = [sparsify.masked(t, ref_topk(t, 0.3)) for t in taus]
    w = [0.5, 1.0, 2.0]
    got = sparsify.ties_merge(trimmed, w, weighted_election=weighted, divisor=divisor)
    torch.testing.assert_close(got, ref_ties(trimmed, w, weighted, divisor))


def test_ties_edge_cases() -> None:
    x = rand(20, seed=1)
    # opposite signs cancel in the election: zero -> +1, so the positive entries win
    torch.testing.assert_close(sparsify.ties_merge([x, -x], [1.0, 1.0]), x.abs())
    # a single input is its own disjoint mean
    torch.testing.assert_close(sparsify.ties_merge([x], [1.0]), x)
    # all-zero inputs stay zero (count clamped at 1, no division by zero)
    z = torch.zeros(3, 4)
    assert torch.equal(sparsify.ties_merge([z, z], [1.0, 1.0]), z)
    assert torch.equal(sparsify.ties_merge([z, z], [1.0, 1.0], divisor="weight-sum"), z)
    # bf16 inputs are computed in float32
    b = [rand(6, 5, seed=s).to(torch.bfloat16) for s in (4, 5)]
    got = sparsify.ties_merge(b, [1.0, 1.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref_ties([t.float() for t in b], [1.0, 1.0]))
