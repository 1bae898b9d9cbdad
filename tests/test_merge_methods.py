"""`add --method ties | dare-ties | consensus` against dense references (ALGORITHMS.md section 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit.arith import add, extract
from tvedit.engine import ArithOptions
from tvedit.errors import UsageError
from tvedit.merging import METHODS
from tvedit.ops import sparsify
from tvedit.reader import open_checkpoint

from .conftest import make_state, perturb
from .test_sparsify import ref_ties, ref_topk


@pytest.fixture
def tvs(ckpts: dict[str, Path], tmp_path: Path) -> list[Path]:
    ft3 = tmp_path / "ft3.safetensors"
    save_file(perturb(make_state(0), 3, scale=0.2), str(ft3))
    return [extract([ft], ckpts["base"], tmp_path / f"tv{i}.safetensors")[0].path for i, ft in enumerate((ckpts["ft1"], ckpts["ft2"], ft3))]


def dense(path: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(path)
    return {k: c.get(k) for k in c.keys()}


def merged_vector(tvs: list[Path], out: Path, method: str, options: dict, weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    add(tvs, out, method=method, method_options=options, weights=weights, emit="vector", opts=ArithOptions(layout="dense"))
    return dense(out)


def test_methods_declare_their_options() -> None:
    assert set(METHODS["ties"].options) == {"density", "scope", "weighted_election", "divisor"}
    assert {"seed", "rescale"} <= set(METHODS["dare-ties"].options)
    assert set(METHODS["consensus"].options) == {"lambda", "min_agree"}


@pytest.mark.parametrize(("weighted", "divisor"), [(False, "count"), (True, "weight-sum")])
def test_ties_per_tensor_matches_reference(tvs: list[Path], tmp_path: Path, weighted: bool, divisor: str) -> None:
    w = [1.0, 0.5, 2.0]
    got = merged_vector(tvs, tmp_path / "m.safetensors", "ties", {"density": 0.3, "weighted_election": weighted, "divisor": divisor}, w)
    taus = [dense(p) for p in tvs]
    for k in taus[0]:
        trimmed = [torch.where(ref_topk(t[k], 0.3), t[k], 0.0) for t in taus]
        torch.testing.assert_close(got[k], ref_ties(trimmed, w, weighted, divisor), rtol=1e-6, atol=1e-7)


def test_ties_single_input_density_edges_and_bf16(ckpts: dict[str, Path], tvs: list[Path], tmp_path: Path) -> None:
    tau = dense(tvs[0])
    one = merged_vector(tvs[:1], tmp_path / "one.safetensors", "ties", {"density": 0.2})
    assert all(torch.equal(one[k], torch.where(ref_topk(t, 0.2), t, 0.0)) for k, t in tau.items())
    full = merged_vector(tvs[:1], tmp_path / "full.safetensors", "ties", {"density": 1.0})
    assert all(torch.equal(full[k], t) for k, t in tau.items())
    zero = merged_vector(tvs, tmp_path / "zero.safetensors", "ties", {"density": 0.0})
    assert all(not v.any() for v in zero.values())
    (b16,) = extract([ckpts["ft1"]], ckpts["base"], tmp_path / "b16.safetensors", ArithOptions(dtype=torch.bfloat16))
    (b16b,) = extract([ckpts["ft2"]], ckpts["base"], tmp_path / "b16b.safetensors", ArithOptions(dtype=torch.bfloat16))
    got = merged_vector([b16.path, b16b.path], tmp_path / "mb.safetensors", "ties", {"density": 0.5})
    taus = [{k: v.float() for k, v in dense(p).items()} for p in (b16.path, b16b.path)]
    for k in taus[0]:
        ref = ref_ties([torch.where(ref_topk(t[k], 0.5), t[k], 0.0) for t in taus], [1.0, 1.0])
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k], ref.to(torch.bfloat16))


def test_dare_ties_matches_reference_and_records_the_seed(tvs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "dt.safetensors"
    got = merged_vector(tvs, out, "dare-ties", {"density": 0.4, "seed": 7})
    taus = [dense(p) for p in tvs]
    for k in taus[0]:
        dropped = []
        for i, t in enumerate(taus):
            u = torch.rand(t[k].shape, generator=torch.Generator().manual_seed(sparsify.derived_seed(7, i, k)))
            dropped.append(torch.where(u < 0.4, t[k], 0.0) / 0.4)
        torch.testing.assert_close(got[k], ref_ties(dropped, [1.0, 1.0, 1.0]), rtol=1e-6, atol=1e-7)
    params = open_checkpoint(out).manifest.provenance[-1]["params"]
    assert params["method_options"] == {"density": 0.4, "seed": 7, "rescale": "inverse", "weighted_election": False, "divisor": "count"}


def test_consensus_merge_matches_reference(tvs: list[Path], tmp_path: Path) -> None:
    got = merged_vector(tvs, tmp_path / "c.safetensors", "consensus", {"lambda": 0.4, "min_agree": 2})
    taus = [dense(p) for p in tvs]
    for k in taus[0]:
        total = sum(t[k] for t in taus)
        agree = sum((t[k].abs() >= 0.4 * (total - t[k]).abs()).int() for t in taus) >= 2
        torch.testing.assert_close(got[k], torch.where(agree, total, 0.0))


@pytest.mark.parametrize("options", [{"density": 1.5}, {"scope": "layer"}, {"divisor": "max"}, {"seed": 1}, {"weighted_election": "yes"}])
def test_bad_options_fail_before_output(tvs: list[Path], tmp_path: Path, options: dict) -> None:
    out = tmp_path / "bad.safetensors"
    with pytest.raises(UsageError):
        add(tvs, out, method="ties", method_options=options, emit="vector")
    assert not out.exists()


def test_global_ties_via_cli_equals_dense_reference(cli, ckpts: dict[str, Path], tvs: list[Path], tmp_path: Path) -> None:
    proc = cli("add", *(p.name for p in tvs), "--method", "ties", "--option", "density=0.1", "--option", "scope=global", "--alpha", "0.5", "-o", "merged.safetensors")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["manifest"]["provenance"][-1]["params"]["method_options"]["scope"] == "global"
    base, merged = load_file(str(ckpts["base"])), load_file(str(tmp_path / "merged.safetensors"))
    taus = [dense(p) for p in tvs]
    keys = sorted(taus[0])
    trimmed = []
    for t in taus:  # one threshold per input vector over all its tensors (sorted key order)
        flat = torch.cat([t[k].reshape(-1) for k in keys])
        keep = ref_topk(flat, 0.1).split([t[k].numel() for k in keys])
        trimmed.append({k: torch.where(m.reshape(t[k].shape), t[k], 0.0) for k, m in zip(keys, keep, strict=True)})
    for k in keys:
        ref = base[k] + 0.5 * ref_ties([t[k] for t in trimmed], [1.0, 1.0, 1.0])
        torch.testing.assert_close(merged[k], ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["position_ids"], base["position_ids"])
