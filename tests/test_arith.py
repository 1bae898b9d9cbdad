"""The arithmetic against plain torch, exactly, in float32 (library level)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tvedit.arith import add, extract, negate, scale
from tvedit.engine import ArithOptions
from tvedit.errors import MismatchError
from tvedit.ops import arith

from .conftest import make_state, perturb


def test_pure_functions_match_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(7, 5, generator=g) for _ in range(3))
    assert torch.equal(arith.task_vector(a, b), a - b)
    assert torch.equal(arith.scaled(a, -0.5), a * -0.5)
    assert torch.equal(arith.weighted_sum([a, b], [0.5, 2.0]), 0.5 * a + 2.0 * b)
    assert torch.equal(arith.apply(c, a, 0.3), c + 0.3 * a)


@settings(max_examples=15, deadline=None)
@given(alpha=st.floats(-2, 2, allow_nan=False), w=st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=3))
def test_weighted_sum_property(alpha: float, w: list[float]) -> None:
    g = torch.Generator().manual_seed(len(w))
    vs = [torch.randn(4, 3, generator=g) for _ in w]
    expected = torch.zeros(4, 3)
    for v, wi in zip(vs, w, strict=True):
        expected = expected + wi * v
    assert torch.allclose(arith.weighted_sum(vs, w), expected, atol=1e-6)


def test_extract_add_exact(ckpts: dict[str, Path], tmp_path: Path) -> None:
    taus = extract([ckpts["ft1"], ckpts["ft2"]], ckpts["base"], _outdir(tmp_path))
    base, f1, f2 = (load_file(str(ckpts[k])) for k in ("base", "ft1", "ft2"))
    t1, t2 = (load_file(str(a.path)) for a in taus)
    assert set(t1) == {k for k, v in base.items() if v.is_floating_point()}  # integer tensors are not in tau
    for k in t1:
        assert torch.equal(t1[k], f1[k] - base[k])
    merged = add([a.path for a in taus], tmp_path / "m.safetensors", alpha=0.3, weights=[1.0, 0.5])
    m = load_file(str(merged.path))
    for k, v in base.items():
        if v.is_floating_point():
            assert torch.equal(m[k], v + 0.3 * (1.0 * (f1[k] - v) + 0.5 * (f2[k] - v)))
        else:
            assert torch.equal(m[k], v)  # copied from theta0
    # base is found through the manifest; both inputs agree on it
    assert merged.manifest.base["sha256"] == taus[0].manifest.base["sha256"]


def test_add_accepts_checkpoints_directly(ckpts: dict[str, Path], tmp_path: Path) -> None:
    merged = add([ckpts["ft1"], ckpts["ft2"]], tmp_path / "m.safetensors", base=ckpts["base"], alpha=0.5)
    base, f1, f2 = (load_file(str(ckpts[k])) for k in ("base", "ft1", "ft2"))
    m = load_file(str(merged.path))
    k = "layer.0.weight"
    assert torch.equal(m[k], base[k] + 0.5 * ((f1[k] - base[k]) + (f2[k] - base[k])))


def test_emit_vector_and_unary_ops(ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tau,) = extract([ckpts["ft1"]], ckpts["base"], tmp_path / "t.safetensors")
    (neg,) = negate([tau.path], tmp_path / "n.safetensors")
    (half,) = scale([tau.path], 0.5, tmp_path / "h.safetensors")
    t, n, h = (load_file(str(p)) for p in (tau.path, neg.path, half.path))
    for k in t:
        assert torch.equal(n[k], -t[k]) and torch.equal(h[k], 0.5 * t[k])
    vec = add([tau.path, neg.path], tmp_path / "v.safetensors", emit="vector", alpha=2.0)
    assert vec.kind == "task-vector"
    from tvedit.reader import load_tensors

    v, _ = load_tensors(vec.path)
    assert all(torch.count_nonzero(x) == 0 for x in v.values())  # tau + (-tau) = 0
    assert vec.manifest.layout == "sparse"  # all-zero vector is stored sparse under layout auto
    assert [s["op"] for s in half.manifest.provenance] == ["extract", "scale"]


def test_bf16_base_accumulates_in_float32(tmp_path: Path) -> None:
    base = {"w": torch.full((64,), 256.0, dtype=torch.bfloat16)}
    ft = {"w": torch.full((64,), 257.0, dtype=torch.bfloat16)}  # bf16 spacing at 256 is 2: 257 rounds
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    out = add([tmp_path / "f.safetensors"] * 4, tmp_path / "m.safetensors", base=tmp_path / "b.safetensors", alpha=0.25, opts=ArithOptions(dtype=torch.float32))
    m = load_file(str(out.path))["w"]
    expected = base["w"].float() + 0.25 * 4 * (ft["w"].float() - base["w"].float())
    assert m.dtype == torch.float32 and torch.equal(m, expected)


def test_allow_missing_treats_missing_as_zero(ckpts: dict[str, Path], tmp_path: Path) -> None:
    f1 = load_file(str(ckpts["ft1"]))
    del f1["layer.1.weight"]
    save_file(f1, str(tmp_path / "partial.safetensors"))
    with pytest.raises(MismatchError, match="layer.1.weight"):
        extract([tmp_path / "partial.safetensors"], ckpts["base"], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    (tau,) = extract([tmp_path / "partial.safetensors"], ckpts["base"], tmp_path / "x.safetensors", ArithOptions(allow_missing=True))
    from tvedit.reader import load_tensors

    tensors, _ = load_tensors(tau.path)  # an all-zero tensor is stored sparse: read the logical view
    assert torch.count_nonzero(tensors["layer.1.weight"]) == 0


def test_sparse_layout_roundtrip(tmp_path: Path) -> None:
    from tvedit.manifest import Manifest
    from tvedit.reader import load_tensors
    from tvedit.writer import save_tensors

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(300, 40, generator=g)
    very_sparse = dense * (torch.rand(300, 40, generator=g) < 0.01)  # block16 (positions in blocks of 2^16)
    sparse = dense * (torch.rand(300, 40, generator=g) < 0.2)  # bitmap encoding
    tensors = {"a": very_sparse, "b": sparse, "c": dense, "tiny": torch.zeros(3)}
    art = save_tensors(tmp_path / "v.safetensors", tensors, Manifest(kind="task-vector"), layout="auto")
    assert art.manifest.sparse["a"]["encoding"] == "block16"
    assert art.manifest.sparse["b"]["encoding"] == "bitmap"
    assert "c" not in art.manifest.sparse and "tiny" not in art.manifest.sparse
    back, manifest = load_tensors(art.path)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    nnz = sum(int(torch.count_nonzero(v)) for v in tensors.values())
    assert manifest.density == pytest.approx(nnz / sum(v.numel() for v in tensors.values()))
    plain = load_file(str(art.path))  # plain safetensors reads the stored parts
    assert set(plain) == {"a::offsets", "a::counts", "a::values", "b::bitmap", "b::values", "c", "tiny"}


def _outdir(tmp_path: Path):
    from tvedit.pipeline import OutputTarget

    return OutputTarget(out_dir=tmp_path / "out")


def test_make_state_helpers_are_deterministic() -> None:
    assert torch.equal(perturb(make_state(0), 1)["layer.0.weight"], perturb(make_state(0), 1)["layer.0.weight"])
