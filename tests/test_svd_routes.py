"""The SVD routes of tvedit.ops.svd (``auto``: refined, Gram) against LAPACK's full SVD in float64.

Tolerances. The Gram route works in float64 on float32-valued data and rounds U, S, V to float32, so
against the float64 SVD of the same values its error is the float32 rounding of the factors and of
the float32 product (a few eps32 = 1.2e-7 per entry, times sqrt(k) in the Frobenius norm of a rank-k
product: below 2e-6 here) plus the float64 eigensolver's L eps64 sigma_1^2 / gap (below 1e-9 for the
spectra below, whose relative gaps at k are >= 1e-3 and sigma_1 / sigma_k <= 1e3). TOL = 1e-5 leaves
that margin five-fold. The merges compose the factors with Procrustes, whose float32 rounding error
is amplified by at most cond([U_1k .. U_Nk]) (< 20 for these inputs): MERGE_TOL = 1e-4, the bound
the project asks of the fast paths. The float32 full SVD (route ``exact``, what ``auto`` replaces)
has errors of eps32 sigma_1 / gap: above TOL on the flat-ish spectrum's small gaps, where the Gram
route stays within it. The refined route (top k < r triplets: float32 eigensolve, one float64
Rayleigh-Ritz step) rounds to float32 too and returns only what its own error estimate puts within
REFINE_TOL = 5e-5 of the exact product: TOL holds for it on these spectra, and every estimate it
returns is checked to be at least the error actually made.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvedit.arith import add, extract
from tvedit.engine import ArithOptions
from tvedit.errors import UsageError
from tvedit.merging import svd_route
from tvedit.ops import svd

from .conftest import make_state, perturb

TOL = 1e-5
MERGE_TOL = 1e-4


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 m x n matrix with singular values s (descending) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.T).float()


def spectra(r: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, r + 1, dtype=torch.float64)
    return {"power-law": i**-1.0, "geometric": torch.logspace(0, -3, r, dtype=torch.float64), "flat-ish": 1 + 1 / i}


def gaussian(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def boom(*args, **kwargs):
    raise AssertionError("torch.linalg.svd was called")


@pytest.fixture
def no_lapack_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the full SVD runs: proves the Gram route served the call."""
    monkeypatch.setattr(torch.linalg, "svd", boom)


def exact64(a: torch.Tensor, k: int | None = None) -> svd.Factors:
    return svd.svd(a.double(), k, route="exact")


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (150, 60)])
@pytest.mark.parametrize("kind", ["power-law", "geometric", "flat-ish", "gaussian"])
def test_gram_route_gives_the_top_k_triplets(shape: tuple[int, int], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m, n = shape
    a = gaussian(m, n, 1) if kind == "gaussian" else spectrum_matrix(m, n, spectra(min(m, n))[kind], 1)
    ks = (1, min(m, n) // 8, min(m, n) // 2, None)
    refs = {k: exact64(a, k) for k in ks}
    f32 = {k: svd.svd(a, k, route="exact") for k in ks}  # today's float32 full SVD, for comparison
    with monkeypatch.context() as mp:
        mp.setattr(torch.linalg, "svd", boom)
        got = {k: svd.svd(a, k) for k in ks}  # auto: the Gram route (aspect >= 2, float32, CPU)
    for k in ks:
        ref, g = refs[k], got[k]
        assert g.U.dtype == torch.float32 and g.rank == (k or min(m, n))
        assert rel(g.S, ref.S) <= TOL
        assert rel(g.dense(), ref.dense()) <= TOL
        assert rel(g.dense(), ref.dense()) <= max(TOL, rel(f32[k].dense(), ref.dense()))  # never worse than float32 LAPACK
        for q in (g.U, g.V):  # orthonormal columns up to float32 rounding
            torch.testing.assert_close(q.double().T @ q.double(), torch.eye(g.rank, dtype=torch.float64), rtol=0, atol=TOL)
    assert rel(got[None].dense(), a) <= TOL  # all r triplets: the product is a itself


def test_rule_chooses_k_from_the_whole_spectrum(monkeypatch: pytest.MonkeyPatch) -> None:
    a = spectrum_matrix(90, 30, spectra(30)["geometric"], 2)
    ref = exact64(a)
    k = svd.choose_rank(ref.S, energy=0.9)
    with monkeypatch.context() as mp:
        mp.setattr(torch.linalg, "svd", boom)
        got = svd.svd(a, lambda s: svd.choose_rank(s, energy=0.9))
    assert got.rank == k and rel(got.dense(), exact64(a, k).dense()) <= TOL


def test_square_float64_and_ill_conditioned_matrices_take_the_full_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    sq = gaussian(40, 40, 3)
    deficient = gaussian(90, 30, 4)
    deficient[:, 3:] = 0  # rank 3: sigma_4.. = 0, below the guard
    flat = spectrum_matrix(40, 40, torch.ones(40), 5)  # no gap after k: the refined route declines
    cases = [(sq, None), (sq.double().repeat(3, 1), 4), (deficient, 5), (deficient, None), (flat, 4)]
    for a, k in cases:
        calls.clear()
        got = svd.svd(a, k)
        assert calls == [a.shape]  # the full SVD ran, and gave exactly what route=exact gives
        want = svd.svd(a, k, route="exact")
        assert torch.equal(got.U, want.U) and torch.equal(got.S, want.S) and torch.equal(got.V, want.V)
    calls.clear()
    assert svd.svd(deficient, 3).rank == 3 and calls == []  # the 3 non-zero triplets pass the guard


def tsv_ref(mats: list[torch.Tensor], w: list[float], f: float) -> torch.Tensor:
    return svd.tsv_merge([m.double() for m in mats], w, f, route="exact").dense()


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
def test_merges_on_the_gram_route_match_the_float64_svd(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    m, n = shape
    r = min(m, n)
    mats = [spectrum_matrix(m, n, spectra(r)[kind] * (i + 1), 10 + i) for i, kind in enumerate(("power-law", "geometric", "flat-ish"))]
    mats.append(gaussian(m, n, 20))
    w = [1.0, -0.5, 2.0, 0.7]
    d64 = [x.double() for x in mats]
    want = {
        "tsv": tsv_ref(mats, w, 1 / 4), "iso-c": svd.iso_c(d64, w, route="exact"),
        **{s: svd.iso_cts(d64, w, 0.5, s, "combined", route="exact") for s in ("fill", "floor")},
    }  # fmt: skip
    shapes = []
    real = torch.linalg.svd
    with monkeypatch.context() as mp:
        mp.setattr(torch.linalg, "svd", lambda a, **kw: shapes.append(tuple(a.shape)) or real(a, **kw))
        got = {
            "tsv": svd.tsv_merge(mats, w, 1 / 4).dense(), "iso-c": svd.iso_c(mats, w),
            **{s: svd.iso_cts(mats, w, 0.5, s, "combined") for s in ("fill", "floor")},
        }  # fmt: skip
    assert shapes == [(r, r)] * 3  # LAPACK only for the square Procrustes of tsv and iso-cts (both sizings)
    for name, value in got.items():
        assert value.dtype == torch.float32 and rel(value, want[name]) <= MERGE_TOL, name


def test_exact_route_on_float32_is_held_to_the_same_bound() -> None:
    mats = [spectrum_matrix(120, 40, spectra(40)["power-law"] * (i + 1), 30 + i) for i in range(3)]
    w = [1.0, 1.0, 1.0]
    assert rel(svd.tsv_merge(mats, w, 1 / 3, route="exact").dense(), tsv_ref(mats, w, 1 / 3)) <= MERGE_TOL


def test_tvedit_svd_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cli) -> None:
    assert svd_route() == "auto"
    monkeypatch.setenv("TVEDIT_SVD", "exact")
    assert svd_route() == "exact"
    shapes = {"w": (24, 8), "b": (24,)}
    base = make_state(0, shapes)
    save_file(base, str(tmp_path / "base.safetensors"))
    tvs = []
    for i in (1, 2):
        save_file(perturb(base, i), str(tmp_path / f"ft{i}.safetensors"))
        tvs.append(extract([tmp_path / f"ft{i}.safetensors"], tmp_path / "base.safetensors", tmp_path / f"tv{i}.safetensors")[0].path)
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    add(tvs, tmp_path / "m.safetensors", method="tsv", emit="vector", opts=ArithOptions(layout="dense"))
    assert len(calls) == 4  # 2 inputs + 2 Procrustes, all on LAPACK although 24 x 8 has aspect 3
    monkeypatch.setenv("TVEDIT_SVD", "fast")
    with pytest.raises(UsageError, match="TVEDIT_SVD='fast'"):
        svd_route()
    proc = cli("compress", str(tvs[0]), "--rank", "2", "-o", str(tmp_path / "lr.safetensors"))
    assert proc.returncode == 2 and "TVEDIT_SVD='fast': choose auto or exact" in proc.stderr
    assert not (tmp_path / "lr.safetensors").exists()


@pytest.mark.parametrize("fail_float32", [1, 2])  # the first orientation only; both float32 orientations
def test_lapack_failure_to_converge_falls_back(monkeypatch: pytest.MonkeyPatch, fail_float32: int) -> None:
    a = gaussian(20, 50, 6)
    real, failed = torch.linalg.svd, []

    def flaky(x: torch.Tensor, **kw):
        if x.dtype == torch.float32 and len(failed) < fail_float32:
            failed.append(tuple(x.shape))
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = svd.svd(a, 5, route="exact")
    assert failed == [(50, 20), (20, 50)][:fail_float32]  # the tall orientation first
    assert got.U.dtype == torch.float32 and rel(got.dense(), exact64(a, 5).dense()) <= TOL
    monkeypatch.setattr(torch.linalg, "svd", lambda x, **kw: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    with pytest.raises(torch.linalg.LinAlgError):
        svd.svd(a, 5, route="exact")


class EighLog:
    """Records (shape, dtype) of every torch.linalg.eigh call: which route served an svd() call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[tuple[int, ...], torch.dtype]] = []
        real = torch.linalg.eigh
        monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kw: self.calls.append((tuple(a.shape), a.dtype)) or real(a, *args, **kw))

    def refined(self, r: int) -> bool:  # a float32 r x r eigensolve, then a float64 one of a smaller basis
        return len(self.calls) == 2 and self.calls[0] == ((r, r), torch.float32) and self.calls[1][1] == torch.float64 and self.calls[1][0][0] < r


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (150, 60)])
@pytest.mark.parametrize("kind", ["power-law", "geometric", "gaussian"])
def test_refined_route_gives_the_top_k_triplets(shape: tuple[int, int], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m, n = shape
    r = min(m, n)
    a = gaussian(m, n, 7) if kind == "gaussian" else spectrum_matrix(m, n, spectra(r)[kind], 7)
    for k in (1, r // 8, r // 4):
        ref = exact64(a, k)
        refined = svd.refine_top(a, k)
        assert refined is not None and refined.factors.rank == k and refined.basis > k
        err = rel(refined.factors.dense(), ref.dense())
        assert err <= refined.error_estimate  # the check never under-states the error made
        if refined.error_estimate > svd.REFINE_TOL:
            continue
        assert err <= TOL and rel(refined.factors.S, ref.S) <= TOL
        for q in (refined.factors.U, refined.factors.V):
            torch.testing.assert_close(q.double().T @ q.double(), torch.eye(k, dtype=torch.float64), rtol=0, atol=TOL)
        with monkeypatch.context() as mp:
            mp.setattr(torch.linalg, "svd", boom)
            log = EighLog(mp)
            got = svd.svd(a, k)  # auto takes it, with no LAPACK SVD
        assert log.refined(r) and torch.equal(got.U, refined.factors.U) and torch.equal(got.S, refined.factors.S)


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (150, 60)])
def test_refined_route_falls_back_when_the_cut_is_not_resolved(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """sigma_k = sigma_{k+1} before rounding to float32: a gap of ~1e-9 sigma_1 at the cut. The
    refined route's estimate exceeds REFINE_TOL (its error may exceed TOL), so auto runs the next
    route: the float64 Gram route for the tall matrices, LAPACK's SVD for the square one."""
    m, n = shape
    r, k = min(m, n), min(m, n) // 8
    s = torch.logspace(0, -2, r, dtype=torch.float64)
    s[k] = s[k - 1]
    a = spectrum_matrix(m, n, s, 5)
    refined = svd.refine_top(a, k)
    assert refined is not None and refined.error_estimate > svd.REFINE_TOL
    assert rel(refined.factors.dense(), exact64(a, k).dense()) <= refined.error_estimate
    svd_calls = []
    real = torch.linalg.svd
    with monkeypatch.context() as mp:
        mp.setattr(torch.linalg, "svd", lambda x, **kw: svd_calls.append(tuple(x.shape)) or real(x, **kw))
        log = EighLog(mp)
        got = svd.svd(a, k)
    square = m == n
    assert svd_calls == ([(m, n)] if square else [])
    assert log.calls[0] == ((r, r), torch.float32)  # the refined route tried first ...
    assert log.calls[2:] == ([] if square else [((r, r), torch.float64)])  # ... then LAPACK, or the float64 Gram route
    want = svd.svd(a, k, route="exact") if square else None
    if want is not None:
        assert torch.equal(got.U, want.U) and torch.equal(got.S, want.S)


def test_refined_route_with_a_rule_for_k(monkeypatch: pytest.MonkeyPatch) -> None:
    a = spectrum_matrix(64, 64, spectra(64)["power-law"], 8)
    ref = exact64(a)
    for criterion in ({"energy": 0.5}, {"fraction": 0.1}, {"rank": 5}):
        k = svd.choose_rank(ref.S, **criterion)
        with monkeypatch.context() as mp:
            mp.setattr(torch.linalg, "svd", boom)
            log = EighLog(mp)
            got = svd.svd(a, lambda s, c=criterion: svd.choose_rank(s, **c))
        assert log.refined(64) and got.rank == k and rel(got.dense(), exact64(a, k).dense()) <= TOL, criterion


def test_refined_route_declines_without_a_gap_after_k() -> None:
    i = torch.arange(1, 65, dtype=torch.float64)
    assert svd.refine_top(spectrum_matrix(64, 64, 1 + 0.01 / i, 9), 4) is None  # no eigenvalue <= 0.9 lambda_k within r / 2
    assert svd.refine_top(gaussian(64, 64, 9).double(), 4) is None  # float64: the full SVD keeps its digits
    assert svd.refine_top(gaussian(64, 64, 9), None) is None and svd.refine_top(gaussian(64, 64, 9), 64) is None  # all r: nothing to refine
