"""torchrun --sharding fsdp on CPU (gloo): two ranks, each holding half of every parameter, gradient
and optimizer moment (torch's fully_shard), train the same weights as one process; the TaLoS mask is
the same bits; an interrupted sharded run resumes (one state file per rank) to the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvedit.reader import load_tensors

from .test_causal import examples, write_task
from .tiny_hf import write_tiny_llama

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _gloo() -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not built into this torch")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama theta0 (tvedit checkpoint) and a two-choice text task."""
    root = tmp_path_factory.mktemp("fsdp")
    model = write_tiny_llama(root / "llama", dtype="float32")
    theta0 = root / "theta0.safetensors"
    init = subprocess.run([sys.executable, "-m", "tvedit", "init", "--model", str(model), "-o", str(theta0)], capture_output=True, text=True, env=ENV)
    assert init.returncode == 0, init.stderr
    # Adam eps 1e-4 (tests/test_distributed.py has the derivation): Adam's step is then Lipschitz in the
    # gradient, so a reduction-order difference stays at rounding level while a sharding bug moves ~lr
    (root / "adam.yaml").write_text("eps: 1.0e-4\n")
    return theta0, write_task(root, "first", examples(40, 1))


def _finetune(theta0: Path, task: Path, out: Path, mode: str, *extra: str, ranks: int = 1, sharding: str = "fsdp") -> subprocess.CompletedProcess:
    args = ["finetune", "--pretrained", str(theta0), "--train", str(task), "--mode", mode, "--steps", "3", "--batch-size", "8",
            "--warmup", "1", "--seed", "0", "--lr", "1e-2", "--device", "cpu", "--json", "--config", str(theta0.parent / "adam.yaml"),
            "--density", "0.2", "--calib-batches", "1", "--rounds", "1", "-o", str(out), *extra]  # fmt: skip
    cmd = [*TORCHRUN, "-m", "tvedit", *args, "--sharding", sharding] if ranks == 2 else [sys.executable, "-m", "tvedit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=out.parent)


def _same_weights(one: Path, two: Path, base: Path, lr: float, sharding: str) -> None:
    a, _ = load_tensors(one)
    b, manifest = load_tensors(two)
    theta0, _ = load_tensors(base)
    assert a.keys() == b.keys() == theta0.keys()
    moved = 0.0
    for k in a:
        # 1e-6: rounding of a different reduction order through 3 Adam steps at eps 1e-4 (lr/eps = 100
        # times a ~1e-9 gradient difference); a sharding error (a shard not updated, gradients summed
        # instead of averaged, a mask applied to the wrong rows) is of the order of lr = 1e-2
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs between 1 process and 2 FSDP ranks")
        moved = max(moved, (a[k].float() - theta0[k].float()).abs().max().item())
    assert moved > lr  # something trained, by 10,000x the tolerance
    assert manifest.provenance[-1]["params"]["sharding"] == sharding


# ddp on a causal LM too: its loss all-reduce once assumed tensor inputs (text batches are not)
@pytest.mark.parametrize(("mode", "sharding"), [("full", "fsdp"), ("sparse", "fsdp"), ("full", "ddp")])
def test_two_ranks_equal_one_process(llama: tuple[Path, Path], tmp_path: Path, mode: str, sharding: str) -> None:
    _gloo()
    theta0, task = llama
    single = _finetune(theta0, task, tmp_path / "one.safetensors", mode)
    assert single.returncode == 0, single.stderr
    # sparse: each rank's 4 examples in 2 micro-batches, so FSDP accumulates 2 reduce-scattered gradients
    micro = ["--micro-batch", "2"] if mode == "sparse" else []
    multi = _finetune(theta0, task, tmp_path / "two.safetensors", mode, *micro, ranks=2, sharding=sharding)
    assert multi.returncode == 0, multi.stderr
    kinds = [json.loads(x)["kind"] for x in multi.stdout.splitlines() if x.startswith("{")]
    assert kinds == [json.loads(x)["kind"] for x in single.stdout.splitlines() if x.startswith("{")]  # rank 0 reports
    _same_weights(tmp_path / "one.safetensors", tmp_path / "two.safetensors", theta0, 1e-2, sharding)
    if mode == "sparse":
        m1, _ = load_tensors(tmp_path / "one.mask.safetensors")
        m2, _ = load_tensors(tmp_path / "two.mask.safetensors")
        assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
        # outside the mask nothing moved, on either rank's half of any tensor
        two, _ = load_tensors(tmp_path / "two.safetensors")
        base, _ = load_tensors(theta0)
        for k, m in m1.items():
            assert torch.equal(two[k][~m.bool()], base[k][~m.bool()]), k
    def losses(path: Path) -> list[float]:  # (the text recipe also logs validation lines)
        return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "two.train.jsonl") == pytest.approx(losses(tmp_path / "one.train.jsonl"), rel=1e-4)
    assert losses(tmp_path / "one.train.jsonl")


def test_fsdp_resume_from_per_rank_shards(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """--stop-after 2 leaves one state file per rank; --resume finishes to the uninterrupted weights."""
    _gloo()
    theta0, task = llama
    whole = _finetune(theta0, task, tmp_path / "whole.safetensors", "sparse", ranks=2)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "split.safetensors"
    first = _finetune(theta0, task, out, "sparse", "--stop-after", "2", ranks=2)
    assert first.returncode == 0, first.stderr
    assert not out.exists()
    state = sorted(p.name for p in (tmp_path / "split.resume").iterdir())
    assert state == ["state.json", "state.rank0.safetensors", "state.rank1.safetensors"]
    shards = [load_tensors_plain(tmp_path / "split.resume" / f"state.rank{r}.safetensors")[0] for r in (0, 1)]
    assert [int(s["meta/step"]) for s in shards] == [2, 2]
    base, _ = load_tensors(theta0)
    params = [k[len("param/") :] for k in shards[0] if k.startswith("param/")]
    assert params
    for k in params:  # each rank holds its half of the rows of every trained tensor, not a replica
        rows = [s[f"param/{k}"].shape[0] for s in shards]
        assert sum(rows) == base[k].shape[0] and max(rows) == -(-base[k].shape[0] // 2), (k, rows)
    second = _finetune(theta0, task, out, "sparse", "--resume", ranks=2)
    assert second.returncode == 0, second.stderr
    a, _ = load_tensors(tmp_path / "whole.safetensors")
    b, _ = load_tensors(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same ranks, same order of every reduction: bit-identical
    assert not (tmp_path / "split.resume").exists()


def load_tensors_plain(path: Path) -> tuple[dict[str, torch.Tensor], None]:
    from safetensors.torch import load_file

    return load_file(str(path)), None


def test_fsdp_refuses_linearized(llama: tuple[Path, Path], tmp_path: Path) -> None:
    theta0, task = llama
    proc = _finetune(theta0, task, tmp_path / "lin.safetensors", "linearized", "--sharding", "fsdp")
    assert proc.returncode == 2
    assert "--sharding fsdp" in proc.stderr and "jvp" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lin.safetensors").exists()
    bogus = _finetune(theta0, task, tmp_path / "bogus.safetensors", "full", "--sharding", "zero3")
    assert bogus.returncode == 2 and "--sharding must be one of ddp, fsdp" in bogus.stderr
    assert len(bogus.stderr.strip().splitlines()) == 1 and not (tmp_path / "bogus.safetensors").exists()
