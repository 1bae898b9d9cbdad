"""`add --method tsv | iso-c | iso-cts` against formulas written here (docs/methods.md, "Singular-value merges")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit.arith import add, extract
from tvedit.cli.arith_cmds import _check_method_options, parse_options
from tvedit.engine import ArithOptions
from tvedit.errors import UsageError
from tvedit.ops import svd
from tvedit.reader import open_checkpoint

from .conftest import make_state, perturb

SHAPES = {"blk.0.attn.weight": (12, 10), "blk.0.bias": (12,), "blk.1.mlp.weight": (6, 12), "conv.weight": (3, 2, 2), "proj": (10, 4)}
MATRICES = ("blk.0.attn.weight", "blk.1.mlp.weight", "proj")


@pytest.fixture
def tvs(tmp_path: Path) -> list[Path]:
    """Three task vectors over SHAPES (plus an integer key), extracted from generated checkpoints."""
    base = make_state(0, SHAPES)
    save_file(base, str(tmp_path / "base.safetensors"))
    out = []
    for i in (1, 2, 3):
        save_file(perturb(base, i, scale=0.1 * i), str(tmp_path / f"ft{i}.safetensors"))
        out.append(extract([tmp_path / f"ft{i}.safetensors"], tmp_path / "base.safetensors", tmp_path / f"tv{i}.safetensors")[0].path)
    return out


def dense(path: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(path)
    return {k: c.get(k) for k in c.keys()}


def merged(tvs: list[Path], out: Path, method: str, options: dict, weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    add(tvs, out, method=method, method_options=options, weights=weights, emit="vector", opts=ArithOptions(layout="dense"))
    return dense(out)


# -- reference formulas (float64, independent of tvedit.ops.svd) ---------------------------------
def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u, s, vh.T


def polar(m: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def ref_tsv(mats: list[torch.Tensor], w: list[float], fraction: float) -> torch.Tensor:
    us, ss, vs = [], [], []
    for m, wi in zip(mats, w, strict=True):
        u, s, v = thin_svd(wi * m.double())
        k = max(1, math.floor(fraction * s.numel() + 1e-9))
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(v[:, :k])
    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T


def ref_iso_c(mats: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    u, s, v = thin_svd(sum(wi * m.double() for m, wi in zip(mats, w, strict=True)))
    return s.mean() * u @ v.T


def ref_iso_cts(mats: list[torch.Tensor], w: list[float], f: float) -> torch.Tensor:
    """The reference code's sizing: k0 = floor(f r), N s = round((r - k0)/N) N, k = r - N s."""
    weighted = [wi * m.double() for m, wi in zip(mats, w, strict=True)]
    u, s, v = thin_svd(sum(weighted))
    r, n = s.numel(), len(mats)
    per = round((r - math.floor(f * r)) / n)
    k = r - per * n
    us, vs, ss = [u[:, :k]], [v[:, :k]], [s[:k]]
    for m in weighted:
        ut, st, vt = thin_svd(m - u[:, :k] @ u[:, :k].T @ m)
        us.append(ut[:, :per]), vs.append(vt[:, :per]), ss.append(st[:per])
    return torch.cat(ss).mean() * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


# -- properties ------------------------------------------------------------------------------
def test_iso_c_has_a_flat_spectrum_equal_to_the_mean(tvs: list[Path], tmp_path: Path) -> None:
    w = [1.0, 0.5, 2.0]
    got = merged(tvs, tmp_path / "m.safetensors", "iso-c", {}, w)
    taus = [dense(p) for p in tvs]
    for k in MATRICES:
        sv = torch.linalg.svdvals(got[k].double())
        mean = torch.linalg.svdvals(sum(wi * t[k].double() for t, wi in zip(taus, w, strict=True))).mean()
        close(sv, torch.full_like(sv, float(mean)))
        close(got[k], ref_iso_c([t[k] for t in taus], w))


def test_tsv_one_input_full_rank_returns_tau(tvs: list[Path], tmp_path: Path) -> None:
    got = merged(tvs[:1], tmp_path / "m.safetensors", "tsv", {"rank_fraction": 1.0})
    for k, t in dense(tvs[0]).items():
        close(got[k], t)


def test_tsv_matches_the_formula_with_weights_and_orthonormal_factors(tvs: list[Path], tmp_path: Path) -> None:
    w = [2.0, 0.5, -1.0]  # the weights scale tau_i before its SVD (a negative one flips U_i)
    out = tmp_path / "m.safetensors"
    got = merged(tvs, out, "tsv", {}, w)
    assert open_checkpoint(out).manifest.provenance[-1]["params"]["method_options"]["rank_fraction"] == pytest.approx(1 / 3)
    taus = [dense(p) for p in tvs]
    for k in MATRICES:
        mats = [t[k] for t in taus]
        close(got[k], ref_tsv(mats, w, 1 / 3))
        f = svd.tsv_merge(mats, w, 1 / 3)
        for q in (f.U, f.V):  # N k <= min(m, n): orthonormal columns
            close(q.T @ q, torch.eye(q.shape[1]))


def test_iso_cts_matches_the_formula_and_is_flat(tvs: list[Path], tmp_path: Path) -> None:
    got = merged(tvs, tmp_path / "m.safetensors", "iso-cts", {"common_fraction": 0.5})
    taus = [dense(p) for p in tvs]
    for k in MATRICES:
        close(got[k], ref_iso_cts([t[k] for t in taus], [1.0, 1.0, 1.0], 0.5))
        sv = torch.linalg.svdvals(got[k].double())
        close(sv, torch.full_like(sv, float(sv.mean())))


def test_iso_cts_variants(tvs: list[Path], tmp_path: Path) -> None:
    taus = [dense(p)["blk.0.attn.weight"] for p in tvs]  # r = 10, N = 3, f = 0.5
    assert svd.iso_cts_sizes(10, 3, 0.5, "fill") == (4, 2) and svd.iso_cts_sizes(10, 3, 0.5, "floor") == (5, 1)
    got = merged(tvs, tmp_path / "m.safetensors", "iso-cts", {"common_fraction": 0.5, "spectrum": "sum"})["blk.0.attn.weight"]
    sv = torch.linalg.svdvals(got.double())
    close(sv, torch.full_like(sv, float(torch.linalg.svdvals(sum(t.double() for t in taus)).mean())))


def test_non_matrices_follow_other_and_exclusions_skip_the_svd_path(tvs: list[Path], tmp_path: Path) -> None:
    w = [1.0, 3.0, 0.5]
    taus = [dense(p) for p in tvs]

    def wsum(k: str) -> torch.Tensor:
        return sum(wi * t[k] for t, wi in zip(taus, w, strict=True))

    for method in ("tsv", "iso-c", "iso-cts"):
        mean = merged(tvs, tmp_path / f"{method}-mean.safetensors", method, {"exclude": ["proj", "blk.1.*"]}, w)
        plain = merged(tvs, tmp_path / f"{method}-sum.safetensors", method, {"other": "sum", "include": "blk.0.*"}, w)
        for k in ("blk.0.bias", "conv.weight", "proj", "blk.1.mlp.weight"):  # 1-D, 3-D, excluded 2-D
            close(mean[k], wsum(k) / sum(w))
            close(plain[k], wsum(k))
        for got in (mean, plain):  # the selected matrix did take the SVD path
            assert not torch.allclose(got["blk.0.attn.weight"], wsum("blk.0.attn.weight") / sum(w), atol=1e-3)


def test_bf16_inputs_use_float32_svds(tmp_path: Path) -> None:
    base = make_state(0, SHAPES, dtype=torch.bfloat16)
    save_file(base, str(tmp_path / "b.safetensors"))
    vecs = []
    for i in (1, 2):
        save_file(perturb(base, i), str(tmp_path / f"f{i}.safetensors"))
        vecs.append(extract([tmp_path / f"f{i}.safetensors"], tmp_path / "b.safetensors", tmp_path / f"t{i}.safetensors")[0].path)
    got = merged(vecs, tmp_path / "m.safetensors", "iso-c", {})
    taus = [dense(p) for p in vecs]
    for k in MATRICES:
        assert got[k].dtype == torch.bfloat16
        close(got[k].float(), ref_iso_c([t[k].float() for t in taus], [1.0, 1.0]).to(torch.bfloat16).float())


BAD = [
    ("tsv", "rank_fraction=0"), ("tsv", "rank_fraction=1.5"), ("tsv", "rank_fraction=-0.2"), ("tsv", "lowrank=maybe"),
    ("iso-cts", "common_fraction=0"), ("iso-cts", "common_fraction=1"), ("iso-cts", "common_fraction=1.3"),
    ("iso-cts", "sizing=round"), ("iso-c", "other=median"), ("iso-c", "rank_fraction=0.5"),
]  # fmt: skip
if not torch.cuda.is_available():
    BAD.append(("tsv", "device=cuda"))


@pytest.mark.parametrize(("method", "option"), BAD)
def test_bad_options_fail_before_any_file_is_opened(tvs: list[Path], tmp_path: Path, method: str, option: str) -> None:
    name, value = option.split("=")
    with pytest.raises(UsageError, match=name):
        _check_method_options(method, parse_options([option]))  # the CLI's check, before inputs are resolved
    missing = [tmp_path / "missing.safetensors"]  # opening it would be an InputError
    with pytest.raises(UsageError, match=name):
        add(missing, tmp_path / "o.safetensors", method=method, method_options=parse_options([option]), emit="vector")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(("inputs", "option"), [(["missing.safetensors"], "rank_fraction=0"), (["-"], "rank_fraction=1.5")])
def test_bad_options_exit_2_before_stdin_or_files_are_read(cli, inputs: list[str], option: str) -> None:
    proc = cli("add", *inputs, "--method", "tsv", "--option", option, "-o", "out.safetensors", input="")  # reading: exit 3
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "rank_fraction" in proc.stderr


def test_include_exclude_flags_only_for_svd_methods(cli, tvs: list[Path]) -> None:
    proc = cli("add", *(p.name for p in tvs), "--method", "ties", "--exclude", "proj", "-o", "o.safetensors")
    assert proc.returncode == 2 and "--exclude" in proc.stderr


def test_cli_add_method_tsv_builds_the_checkpoint(cli, tvs: list[Path], tmp_path: Path) -> None:
    proc = cli("add", *(p.name for p in tvs), "--method", "tsv", "--option", "rank_fraction=0.2", "--exclude", "proj", "--alpha", "0.7", "-o", "merged.safetensors")
    assert proc.returncode == 0, proc.stderr
    params = json.loads(proc.stdout)["manifest"]["provenance"][-1]["params"]
    assert params["method"] == "tsv"
    assert params["method_options"] == {"rank_fraction": 0.2, "lowrank": False, "other": "mean", "include": [], "exclude": ["proj"], "device": "inputs"}
    base, got = load_file(str(tmp_path / "base.safetensors")), load_file(str(tmp_path / "merged.safetensors"))
    taus = [dense(p) for p in tvs]
    for k in SHAPES:
        mats = [t[k] for t in taus]
        ref = ref_tsv(mats, [1.0] * 3, 0.2) if k in MATRICES and k != "proj" else sum(mats) / 3
        close(got[k], base[k].double() + 0.7 * ref)
    assert torch.equal(got["position_ids"], base["position_ids"])
