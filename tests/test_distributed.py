"""torchrun on CPU (gloo): two processes sharing a global batch train the same weights as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_clip import make_image_folder, write_config
from tvedit.finetune import run
from tvedit.reader import load_tensors

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("mode", "sharding"), [("full", "ddp"), ("sparse", "ddp"), ("full", "fsdp")])
def test_two_ranks_equal_one_process(tmp_path: Path, mode: str, sharding: str) -> None:
    """fsdp on CLIP: the residual blocks and the root sharded, encode_image registered as a forward."""
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not built into this torch")
    cfg = write_config(tmp_path)
    data = make_image_folder(tmp_path / "colours", classes=3, per_class=10)
    theta0 = run.init(str(cfg), "none", tmp_path / "theta0.safetensors", seed=0).path
    # Adam divides by sqrt(v) + eps: with the default eps 1e-8 an entry whose true gradient is ~0 (the key
    # bias: softmax is shift-invariant) takes steps of size ~lr driven by rounding noise, whose sign depends
    # on the all-reduce order — a property of Adam, not of DDP. With eps 1e-4 Adam's step is Lipschitz in
    # the gradient with constant lr/eps (100 for sparse, 10 for full), so rounding-level gradient
    # differences stay rounding-level in the weights (measured: <= 1.4e-7 over 3 steps) while a DDP bug
    # (gradients not averaged, a rank's batch dropped, a different data order) moves weights by ~lr.
    (tmp_path / "adam.yaml").write_text("eps: 1.0e-4\n")
    args = ["finetune", "--pretrained", str(theta0), "--train", str(data), "--mode", mode, "--steps", "3",
            "--batch-size", "8", "--warmup", "1", "--seed", "0", "--json", "--config", str(tmp_path / "adam.yaml")]  # fmt: skip
    args += ["--lr", "1e-2", "--density", "0.2", "--calib-batches", "2"] if mode == "sparse" else ["--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "tvedit", *args, "-o", str(tmp_path / "one.safetensors")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run([*torchrun, "-m", "tvedit", *args, "--sharding", sharding, "-o", str(tmp_path / "two.safetensors")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert multi.returncode == 0, multi.stderr
    def kinds(proc: subprocess.CompletedProcess) -> list[str]:
        return [json.loads(line)["kind"] for line in proc.stdout.splitlines() if line.startswith("{")]

    assert kinds(multi) == kinds(single)  # only rank 0 writes and reports (sparse: the mask too)
    one, m1 = load_tensors(tmp_path / "one.safetensors")
    two, m2 = load_tensors(tmp_path / "two.safetensors")
    base, _ = load_tensors(theta0)
    assert one.keys() == two.keys()
    if mode == "sparse":  # the TaLoS mask is calibrated once and must be the same bits
        mask1, _ = load_tensors(tmp_path / "one.mask.safetensors")
        mask2, _ = load_tensors(tmp_path / "two.mask.safetensors")
        assert mask1.keys() == mask2.keys()
        for k in mask1:
            assert torch.equal(mask1[k], mask2[k]), f"mask {k} differs between 1 and 2 ranks"
    lr = 1e-2 if mode == "sparse" else 1e-3
    moved = 0.0
    for k in one:
        # 1e-6 = 7x the largest difference measured; a DDP error is of the order of lr (1e-3, 1e-2).
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs between 1 and 2 ranks")
        moved = max(moved, (one[k].float() - base[k].float()).abs().max().item())
    assert moved > lr  # the runs trained something: by more than lr, 1,000x the tolerance
    log = [json.loads(x) for x in (tmp_path / "two.train.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one.train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in ref]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
