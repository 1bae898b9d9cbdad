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
from tvedit.tensorio import load_tensors

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_two_ranks_equal_one_process(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not built into this torch")
    cfg = write_config(tmp_path)
    data = make_image_folder(tmp_path / "colours", classes=3, per_class=10)
    theta0 = run.init(str(cfg), "none", tmp_path / "theta0.safetensors", seed=0).path
    args = ["finetune", "--pretrained", str(theta0), "--train", str(data), "--mode", mode, "--steps", "3",
            "--batch-size", "8", "--warmup", "1", "--seed", "0", "--json"]  # fmt: skip
    args += ["--lr", "1e-2", "--density", "0.2", "--calib-batches", "2"] if mode == "sparse" else ["--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "tvedit", *args, "-o", str(tmp_path / "one.safetensors")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run([*torchrun, "-m", "tvedit", *args, "-o", str(tmp_path / "two.safetensors")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert multi.returncode == 0, multi.stderr
    def kinds(proc: subprocess.CompletedProcess) -> list[str]:
        return [json.loads(line)["kind"] for line in proc.stdout.splitlines() if line.startswith("{")]

    assert kinds(multi) == kinds(single)  # only rank 0 writes and reports (sparse: the mask too)
    one, m1 = load_tensors(tmp_path / "one.safetensors")
    two, m2 = load_tensors(tmp_path / "two.safetensors")
    base, _ = load_tensors(theta0)
    assert one.keys() == two.keys()
    moved = 0
    for k in one:
        a, b = one[k], two[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias's gradient is exactly zero (softmax is shift-invariant); in floating point it
            # is rounding noise, which Adam's normalisation turns into arbitrary tiny steps.
            d = a.numel() // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{k} differs between 1 and 2 ranks")
        moved += int(not torch.equal(one[k], base[k]))
    assert moved > 0  # the runs trained something
    log = [json.loads(x) for x in (tmp_path / "two.train.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one.train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in ref]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
