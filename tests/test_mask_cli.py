"""`tvedit mask` and tvedit.masking: results against dense references, files, seeds, errors.

Most checks call the library (fast); a few go through the CLI in a subprocess (pipes, exit codes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit import masking
from tvedit.arith import extract
from tvedit.engine import ArithOptions
from tvedit.errors import InputError, MismatchError, UsageError
from tvedit.manifest import Manifest
from tvedit.pipeline import OutputTarget
from tvedit.reader import open_checkpoint
from tvedit.writer import save_tensors

from .conftest import make_state, perturb
from .test_sparsify import ref_breadcrumbs, ref_keep, ref_topk


@pytest.fixture
def vectors(ckpts: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Three task vectors tv1..tv3 (float32) extracted from the conftest checkpoints."""
    ft3 = tmp_path / "ft3.safetensors"
    save_file(perturb(make_state(0), 3), str(ft3))
    out = {}
    for name, ft in (("tv1", ckpts["ft1"]), ("tv2", ckpts["ft2"]), ("tv3", ft3)):
        (art,) = extract([ft], ckpts["base"], tmp_path / f"{name}.safetensors")
        out[name] = art.path
    return out


def dense(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# library: each method against its reference
# --------------------------------------------------------------------------------------------
def test_topk_per_tensor_and_saved_mask_round_trip(vectors: dict[str, Path], tmp_path: Path) -> None:
    res = masking.mask("topk", [vectors["tv1"]], tmp_path / "t.safetensors", options={"density": 0.1}, save_mask=tmp_path / "m.safetensors")
    tau = dense(vectors["tv1"])
    got = dense(res.outputs[0].path)
    for k, t in tau.items():
        ref = ref_topk(t, 0.1)
        assert torch.equal(got[k], torch.where(ref, t, 0.0)), k
    # the mask: kind mask, bit-packed, loadable with plain safetensors and decodable with numpy
    (m,) = res.masks
    assert m.manifest.kind == "mask" and m.manifest.provenance[-1]["params"]["density"] == 0.1
    plain = load_file(str(m.path))
    assert set(plain) == {f"{k}::bitmap" for k in tau} and all(v.dtype == torch.uint8 for v in plain.values())
    for k, t in tau.items():
        bits = np.unpackbits(plain[f"{k}::bitmap"].numpy())[: t.numel()].reshape(t.shape).astype(bool)
        assert np.array_equal(bits, ref_topk(t, 0.1).numpy()), k
    back = dense(m.path)
    assert all(back[k].dtype == torch.bool and torch.equal(back[k], ref_topk(t, 0.1)) for k, t in tau.items())


def test_topk_global_scope_and_key_filters(vectors: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "g.safetensors"
    res = masking.mask("topk", [vectors["tv1"]], out, options={"density": 0.05, "scope": "global"}, keys_filter=masking.KeyFilter(exclude=("*.bias",)))
    tau = dense(vectors["tv1"])
    keys = sorted(k for k in tau if not k.endswith(".bias"))
    flat = torch.cat([tau[k].reshape(-1) for k in keys])
    ref = dict(zip(keys, ref_topk(flat, 0.05).split([tau[k].numel() for k in keys]), strict=True))
    got = dense(out)
    for k in keys:
        assert torch.equal(got[k], torch.where(ref[k].reshape(tau[k].shape), tau[k], 0.0)), k
    assert torch.equal(got["layer.0.bias"], tau["layer.0.bias"])  # unselected: passed through
    step = res.outputs[0].manifest.provenance[-1]
    assert step["params"]["exclude"] == ["*.bias"] and step["params"]["scope"] == "global"
    masking.mask("topk", [vectors["tv1"]], tmp_path / "z.safetensors", options={"density": 0.05}, keys_filter=masking.KeyFilter(include=("layer.1.*",), zero_unselected=True))
    z = dense(tmp_path / "z.safetensors")
    assert not z["layer.0.weight"].any() and int((z["layer.1.weight"] != 0).sum()) == ref_keep(0.05, 64)


def test_dare_same_seed_same_bytes_and_seed_in_manifest(vectors: dict[str, Path], tmp_path: Path) -> None:
    def run(name: str, seed: int) -> Path:
        res = masking.mask("dare", [vectors["tv1"]], tmp_path / f"{name}.safetensors", options={"density": 0.3, "seed": seed}, save_mask=tmp_path / f"{name}.mask.safetensors")
        assert res.outputs[0].manifest.provenance[-1]["params"]["seed"] == seed
        return res.outputs[0].path

    a, b, _ = run("a", 5), run("b", 5), run("c", 6)
    assert a.read_bytes() == b.read_bytes()
    ma, mc = dense(tmp_path / "a.mask.safetensors"), dense(tmp_path / "c.mask.safetensors")
    assert any(not torch.equal(ma[k], mc[k]) for k in ma)
    # the output is exactly tau * m / density with the saved mask
    tau, got = dense(vectors["tv1"]), dense(a)
    for k, t in tau.items():
        torch.testing.assert_close(got[k], torch.where(ma[k], t, 0.0) / 0.3, rtol=0, atol=0)


def test_breadcrumbs_and_bf16_inputs(ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tv,) = extract([ckpts["ft1"]], ckpts["base"], tmp_path / "tv16.safetensors", ArithOptions(dtype=torch.bfloat16))
    masking.mask("breadcrumbs", [tv.path], tmp_path / "b.safetensors", options={"density": 0.5, "beta": 0.1})
    tau, got = dense(tv.path), dense(tmp_path / "b.safetensors")
    for k, t in tau.items():
        assert t.dtype == torch.bfloat16 and got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], torch.where(ref_breadcrumbs(t.float(), 0.5, 0.1), t, 0)), k


def test_tall_consensus_apply_and_mask_algebra(vectors: dict[str, Path], tmp_path: Path) -> None:
    tvs = [vectors[n] for n in ("tv1", "tv2", "tv3")]
    taus = [dense(p) for p in tvs]
    res = masking.mask("consensus", tvs, OutputTarget(out_dir=tmp_path / "cons"), options={"min_agree": 2}, save_mask=tmp_path / "c.mask.safetensors")
    res_tall = masking.mask("tall", tvs, OutputTarget(out_dir=tmp_path / "tall"), options={"lambda": 0.6}, save_mask=tmp_path / "tall-masks")
    assert len(res.outputs) == 3 and len(res.masks) == 1 and len(res_tall.masks) == 3
    cmask = dense(res.masks[0].path)
    for k in taus[0]:
        total = sum(t[k] for t in taus)
        tall = [t[k].abs() >= 0.6 * (total - t[k]).abs() for t in taus]
        assert torch.equal(cmask[k], sum(m.int() for m in tall) >= 2)
        for i, art in enumerate(res.outputs):
            assert torch.equal(dense(art.path)[k], torch.where(cmask[k], taus[i][k], 0.0))
        for i, art in enumerate(res_tall.masks):
            assert torch.equal(dense(art.path)[k], tall[i])
    # apply the consensus mask to tv1: same as the consensus output for tv1
    masking.mask("apply", [tvs[0]], tmp_path / "ap.safetensors", mask_file=res.masks[0].path)
    assert dense(tmp_path / "ap.safetensors").keys() == taus[0].keys()
    assert all(torch.equal(v, dense(res.outputs[0].path)[k]) for k, v in dense(tmp_path / "ap.safetensors").items())
    # invert / intersect / union
    inv = masking.mask("invert", [res.masks[0].path], tmp_path / "inv.safetensors").outputs[0]
    both = masking.mask("intersect", [res.masks[0].path, inv.path], tmp_path / "and.safetensors").outputs[0]
    either = masking.mask("union", [res.masks[0].path, inv.path], tmp_path / "or.safetensors").outputs[0]
    assert inv.kind == both.kind == either.kind == "mask"
    assert all(not v.any() for v in dense(both.path).values()) and all(v.all() for v in dense(either.path).values())
    assert all(torch.equal(v, ~cmask[k]) for k, v in dense(inv.path).items())


def test_library_errors_before_any_output(vectors: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(UsageError, match="density"):
        masking.mask("topk", [vectors["tv1"]], out, options={"density": 1.2})
    with pytest.raises(UsageError, match="does not apply"):
        masking.mask("topk", [vectors["tv1"]], out, options={"density": 0.1, "seed": 3})
    with pytest.raises(UsageError, match="required"):
        masking.mask("dare", [vectors["tv1"]], out)
    with pytest.raises(UsageError, match="unknown mask method"):
        masking.mask("magic", [vectors["tv1"]], out)
    bad = save_tensors(tmp_path / "bad.mask.safetensors", {"layer.0.bias": torch.ones(16, dtype=torch.bool), "layer.0.weight": torch.ones(8, 16, dtype=torch.bool), "layer.1.weight": torch.ones(4, 16, dtype=torch.bool)}, Manifest(kind="mask"))
    with pytest.raises(MismatchError, match=r"shape \[8, 16\] does not match \[16, 8\]"):
        masking.mask("apply", [vectors["tv1"]], out, mask_file=bad.path)
    good = masking.mask("topk", [vectors["tv1"]], tmp_path / "t.safetensors", options={"density": 0.5}, save_mask=tmp_path / "good.mask.safetensors").masks[0]
    with pytest.raises(MismatchError, match="shape"):
        masking.mask("intersect", [good.path, bad.path], out)
    with pytest.raises(InputError, match="is not a mask"):
        masking.mask("invert", [vectors["tv1"]], out)
    assert not out.exists() and not list(tmp_path.glob(".*tvedit-tmp*"))


# --------------------------------------------------------------------------------------------
# sparse file sizes (the benchmark's claim, asserted loosely)
# --------------------------------------------------------------------------------------------
def test_sparse_files_are_small(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tau = {"a.weight": torch.randn(256, 512, generator=g), "b.weight": torch.randn(512, 256, generator=g)}
    tv = save_tensors(tmp_path / "tv.safetensors", tau, Manifest(kind="task-vector"))
    dense_size = tv.path.stat().st_size
    for density, limit in ((0.1, 0.20), (0.01, 0.03)):
        (art,) = masking.mask("topk", [tv.path], tmp_path / f"s{density}.safetensors", options={"density": density}).outputs
        assert art.manifest.layout == "sparse"
        assert art.path.stat().st_size <= limit * dense_size, (density, art.path.stat().st_size / dense_size)
        back = dense(art.path)
        assert all(torch.equal(back[k], torch.where(ref_topk(t, density), t, 0.0)) for k, t in tau.items())


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_piped_json_lines(cli, vectors: dict[str, Path], tmp_path: Path) -> None:
    (art,) = extract([tmp_path / "ft1.safetensors"], tmp_path / "base.safetensors", tmp_path / "piped.tv.safetensors")
    proc = cli("mask", "topk", "-", "--density", "0.1", "--save-mask", "pm.safetensors", input=art.to_json() + "\n")
    assert proc.returncode == 0, proc.stderr
    (record,) = _lines(proc.stdout)  # only the vector: a following `add -` must not get the mask
    assert record["kind"] == "task-vector" and record["ephemeral"] is True
    assert Path(record["path"]).parent == Path(os.environ["TVEDIT_SCRATCH"])
    assert (tmp_path / "pm.safetensors").exists()
    tau, got = dense(art.path), dense(Path(record["path"]))
    assert all(torch.equal(got[k], torch.where(ref_topk(t, 0.1), t, 0.0)) for k, t in tau.items())


def test_cli_errors_leave_no_output(cli, vectors: dict[str, Path], tmp_path: Path) -> None:
    proc = cli("mask", "topk", "tv1.safetensors", "--density", "1.5", "-o", "out.safetensors")
    assert proc.returncode == 2 and "density" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("mask", "sharpen", "tv1.safetensors", "-o", "out.safetensors")
    assert proc.returncode == 2 and "unknown mask method" in proc.stderr
    masking.mask("topk", [vectors["tv2"]], tmp_path / "t2.safetensors", options={"density": 0.5}, save_mask=tmp_path / "partial.mask.safetensors", keys_filter=masking.KeyFilter(exclude=("layer.1.*",)))
    proc = cli("mask", "apply", "tv1.safetensors", "--mask", "partial.mask.safetensors", "-o", "out.safetensors")
    assert proc.returncode == 4 and "layer.1.weight" in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
