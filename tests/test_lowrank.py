"""The low-rank layout (KEY::U, KEY::S, KEY::V): compress, transparent reads, tsv lowrank, sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit.arith import add, extract, scale
from tvedit.compress import check_rank_options, compress
from tvedit.engine import ArithOptions
from tvedit.errors import UsageError
from tvedit.keys import KeyFilter
from tvedit.reader import open_checkpoint

from .conftest import make_state, perturb

SHAPES = {"a.weight": (24, 16), "a.bias": (24,), "b.weight": (16, 40), "conv": (4, 2, 3)}


@pytest.fixture
def tv(tmp_path: Path) -> Path:
    base = make_state(0, SHAPES)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(perturb(base, 1), str(tmp_path / "ft.safetensors"))
    save_file(perturb(base, 2), str(tmp_path / "ft2.safetensors"))
    extract([tmp_path / "ft2.safetensors"], tmp_path / "base.safetensors", tmp_path / "tv2.safetensors")
    return extract([tmp_path / "ft.safetensors"], tmp_path / "base.safetensors", tmp_path / "tv.safetensors")[0].path


def dense(path: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(path)
    return {k: c.get(k) for k in c.keys()}


def ref_truncated(t: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart-Young: the top k singular triplets, U_k diag(S_k) V_k^T (float64)."""
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def energy_rank(t: torch.Tensor, e: float) -> int:
    sq = torch.linalg.svdvals(t.double()) ** 2
    return next(k for k in range(1, sq.numel() + 1) if sq[:k].sum() >= e * sq.sum() * (1 - 1e-12))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("criterion", "ranks"),
    [({"rank": 3}, {"a.weight": 3, "b.weight": 3}), ({"rank_fraction": 0.25}, {"a.weight": 4, "b.weight": 4}), ({"energy": 0.6}, None)],
)
def test_round_trip_equals_the_truncated_svd(tv: Path, tmp_path: Path, criterion: dict, ranks: dict | None) -> None:
    (art,) = compress([tv], tmp_path / "lr.safetensors", **criterion)
    tau, got = dense(tv), dense(art.path)
    ranks = ranks or {k: energy_rank(tau[k], 0.6) for k in ("a.weight", "b.weight")}
    stored = load_file(str(art.path))
    for k, r in ranks.items():
        m, n = tau[k].shape
        assert stored[f"{k}::U"].shape == (m, r) and stored[f"{k}::S"].shape == (r,) and stored[f"{k}::V"].shape == (n, r)
        assert art.manifest.sparse[k] == {"shape": [m, n], "encoding": "lowrank", "rank": r}
        close(got[k], ref_truncated(tau[k], r))
    for k in ("a.bias", "conv"):  # not 2-D: copied
        assert torch.equal(got[k], tau[k])
    assert art.manifest.layout == "lowrank"
    assert art.manifest.provenance[-1]["op"] == "compress"


def test_factors_not_smaller_are_stored_as_the_dense_truncation(tv: Path, tmp_path: Path) -> None:
    (art,) = compress([tv], tmp_path / "lr.safetensors", rank_fraction=0.9, keys_filter=KeyFilter(exclude=("b.*",)))
    tau, got = dense(tv), dense(art.path)
    assert "a.weight" not in art.manifest.sparse  # 14 (24 + 16 + 1) >= 24 * 16
    close(got["a.weight"], ref_truncated(tau["a.weight"], 14))
    assert torch.equal(got["b.weight"], tau["b.weight"])  # excluded


def test_every_command_reads_the_low_rank_layout(cli, tv: Path, tmp_path: Path) -> None:
    (lr,) = compress([tv], tmp_path / "lr.safetensors", rank=2)
    trunc = dense(lr.path)
    base = load_file(str(tmp_path / "base.safetensors"))
    # add: theta0 + alpha * (tau_lr + tau2)
    proc = cli("add", "lr.safetensors", "tv2.safetensors", "--alpha", "0.5", "-o", "m.safetensors")
    assert proc.returncode == 0, proc.stderr
    got, tau2 = load_file(str(tmp_path / "m.safetensors")), dense(tmp_path / "tv2.safetensors")
    for k in SHAPES:
        close(got[k], base[k] + 0.5 * (trunc[k] + tau2[k]))
    # evaluate's reader, scale, mask, info (all read through the same Checkpoint.get)
    from tvedit.evaluate.runner import load_vector

    loaded = load_vector(lr.path, None).tensors
    assert loaded.keys() == trunc.keys() and all(torch.equal(loaded[k], trunc[k]) for k in trunc)
    (sc,) = scale([lr.path], 2.0, tmp_path / "s.safetensors", ArithOptions())
    assert all(torch.allclose(v, 2 * trunc[k]) for k, v in dense(sc.path).items() if v.is_floating_point())
    proc = cli("mask", "topk", "lr.safetensors", "--density", "1", "-o", "k.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert all(torch.equal(v, trunc[k]) for k, v in dense(tmp_path / "k.safetensors").items())
    proc = cli("info", "lr.safetensors", "--tensors", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["layouts"] == {"dense": 2, "lowrank": 2} and data["manifest"]["layout"] == "lowrank"
    stored = sum(v.numel() * v.element_size() for v in load_file(str(lr.path)).values())
    logical = sum(v.numel() * v.element_size() for v in trunc.values())
    assert data["storage_ratio"] == pytest.approx(stored / logical)
    assert {r["key"]: r["encoding"] for r in data["tensor_table"]}["a.weight"] == "lowrank"


def vit_like(tmp_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A scaled ViT block set: the matrices of ViT-B at 1/12 width (64 = 768/12) and its 1-D tensors."""
    shapes = {"attn.in_proj": (192, 64), "attn.out_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256), "ln.w": (64,), "mlp.b": (256,)}
    g = torch.Generator().manual_seed(0)
    tau = {f"blocks.{i}.{k}": torch.randn(s, generator=g).to(dtype) for i in range(2) for k, s in shapes.items()}
    path = tmp_path / f"vit-{dtype}.safetensors".replace("torch.", "")
    from tvedit.manifest import Manifest
    from tvedit.writer import save_tensors

    save_tensors(path, tau, Manifest(kind="task-vector"), layout="dense")
    return path


def test_file_sizes_at_rank_fraction_0_1(tmp_path: Path) -> None:
    """Low-rank factors of an (m, n) matrix at rank k take k (m + n + 1) entries: at k = 0.1 min(m, n)
    that is 0.1 (1 + min/max) of the dense matrix, so >= 10% and 20% for square matrices. The file
    sizes follow that formula; bfloat16 factors of a float32 vector halve it."""
    dense_path = vit_like(tmp_path)
    tau = dense(dense_path)
    (lr,) = compress([dense_path], tmp_path / "lr.safetensors", rank_fraction=0.1)
    (half,) = compress([dense_path], tmp_path / "lr16.safetensors", rank_fraction=0.1, factor_dtype=torch.bfloat16)
    expect = 0
    for t in tau.values():
        if t.dim() == 2:
            m, n = t.shape
            expect += math.floor(0.1 * min(m, n)) * (m + n + 1) * 4
        else:
            expect += t.numel() * 4
    dense_bytes = dense_path.stat().st_size
    header = 8 + int.from_bytes(lr.path.read_bytes()[:8], "little")
    assert lr.path.stat().st_size - header == expect
    ratio, ratio16 = lr.path.stat().st_size / dense_bytes, half.path.stat().st_size / dense_bytes
    assert 0.12 < ratio < 0.15  # float32 factors of these shapes: about 13%
    assert ratio16 <= 0.12  # bfloat16 factors: within the 12% target
    assert dense(half.path)["blocks.0.mlp.c_fc"].dtype == torch.bfloat16  # read back in the factors' dtype


def test_tsv_can_emit_low_rank_factors(tv: Path, tmp_path: Path) -> None:
    vecs = [tv, tmp_path / "tv2.safetensors"]
    options = {"rank_fraction": 0.125}  # k = 2 per input: rank 4 factors, smaller than the matrices
    add(vecs, tmp_path / "d.safetensors", method="tsv", method_options=dict(options), alpha=0.3, emit="vector", opts=ArithOptions(layout="dense"))
    out = add(vecs, tmp_path / "f.safetensors", method="tsv", method_options={**options, "lowrank": True}, alpha=0.3, emit="vector")
    assert {k: v["rank"] for k, v in out.manifest.sparse.items()} == {"a.weight": 4, "b.weight": 4}
    ref, got = dense(tmp_path / "d.safetensors"), dense(out.path)
    for k in ref:
        close(got[k], ref[k])
    with_ckpt = add(vecs, tmp_path / "c.safetensors", method="tsv", method_options={**options, "lowrank": True}, alpha=0.3)
    assert with_ckpt.manifest.layout == "dense"  # a checkpoint is always dense


@pytest.mark.parametrize(
    "kwargs", [{}, {"rank": 2, "energy": 0.5}, {"rank": 0}, {"rank_fraction": 0.0}, {"rank_fraction": 1.2}, {"energy": 1.5}]
)
def test_bad_compress_options(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        check_rank_options(kwargs.get("rank"), kwargs.get("rank_fraction"), kwargs.get("energy"))


def test_compress_cli_exit_2_before_reading(cli) -> None:
    proc = cli("compress", "missing.safetensors", "--rank-fraction", "0", "-o", "x.safetensors")
    assert proc.returncode == 2 and "--rank-fraction" in proc.stderr
