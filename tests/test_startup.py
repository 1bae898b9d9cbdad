"""Start-up: commands that need no tensors do not import torch; arithmetic imports no model libraries.

Each check runs the command in-process inside a fresh interpreter and then looks at sys.modules
(no timing: benchmarks/bench_startup.py measures the seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvedit.manifest import Manifest
from tvedit.writer import save_tensors

PROBE = r"""
import json, os, sys
from tvedit.cli.app import main
args, watch = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["tvedit", *args]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
result = {"code": code, "loaded": [m for m in watch if m in sys.modules]}
if "OMP_WAIT_POLICY" in watch:
    result["omp"] = os.environ.get("OMP_WAIT_POLICY")
print(json.dumps(result), file=sys.stderr)
"""
MODEL_LIBS = ["open_clip", "transformers", "torchvision", "timm", "PIL", "sklearn", "matplotlib"]


def _probe(args: list[str], watch: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(watch)], cwd=cwd,
                          capture_output=True, text=True, env=env or dict(os.environ))  # fmt: skip
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.fixture
def vector(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tau = {"a": torch.randn(64, 8, generator=g) * (torch.rand(64, 8, generator=g) < 0.1), "b": torch.randn(16, generator=g),
           "ids": torch.arange(4)}  # fmt: skip
    return save_tensors(tmp_path / "tv.safetensors", tau, Manifest(kind="task-vector"), layout="auto").path


@pytest.mark.parametrize("args", [["--help"], ["completions", "bash"], ["methods"], ["methods", "--json"], ["clean", "--dry-run"],
                                  ["info", "tv.safetensors"], ["info", "plain.safetensors", "--verify"]])  # fmt: skip
def test_commands_without_tensors_do_not_import_torch(args, vector, ckpts, tmp_path):
    (tmp_path / "plain.safetensors").write_bytes(ckpts["base"].read_bytes())
    result = _probe(args, ["torch"], tmp_path)
    assert result == {"code": 0, "loaded": []}


def test_arithmetic_imports_no_model_library(ckpts, tmp_path):
    args = ["add", "ft1.safetensors", "ft2.safetensors", "--base", "base.safetensors", "--method", "ties", "-o", "m.safetensors"]
    result = _probe(args, ["torch", *MODEL_LIBS], tmp_path)
    assert result == {"code": 0, "loaded": ["torch"]}


def test_header_summary_matches_the_tensor_view(vector, tmp_path, cli):
    from tvedit.cli.info_cmds import summarize
    from tvedit.reader import open_checkpoint

    light, full = summarize(vector, tensors=False, verify=True), summarize(vector, tensors=True, verify=False)
    for field in ("kind", "sha256", "tensors", "parameters", "bytes", "dtypes", "manifest"):
        assert light[field] == full[field], field
    ckpt = open_checkpoint(vector)
    assert ckpt.is_sparse("a") and light["tensors"] == len(ckpt.keys()) == 3
    assert light["dtypes"] == {"float32": 2, "int64": 1} and light["parameters"] == 64 * 8 + 16 + 4
    assert light["verified"] and light["density"] == pytest.approx(full["density"]) and light["norm"] is None


def test_streaming_commands_load_torch_with_a_passive_openmp_wait(ckpts, tmp_path):
    """Streaming commands load torch under OMP_WAIT_POLICY=PASSIVE (its threads sleep between the
    per-chunk passes instead of spinning: app.STREAMING_COMMANDS has the measurement) unless the
    user chose a policy; other commands leave it alone."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    add = ["add", "ft1.safetensors", "ft2.safetensors", "--base", "base.safetensors", "-o", "m.safetensors"]
    assert _probe(add, ["torch", "OMP_WAIT_POLICY"], tmp_path, env) == {"code": 0, "loaded": ["torch"], "omp": "PASSIVE"}
    (tmp_path / "m.safetensors").unlink()
    assert _probe(add, ["OMP_WAIT_POLICY"], tmp_path, {**env, "OMP_WAIT_POLICY": "ACTIVE"})["omp"] == "ACTIVE"
    assert _probe(["finetune", "--help"], ["OMP_WAIT_POLICY"], tmp_path, env)["omp"] is None


def test_hf_directory_outputs_import_no_model_library(tmp_path):
    """A Hugging Face directory output with the default shard size: the default is read from
    transformers' source, not by importing it (which costs seconds and ~185 MiB)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_hf import finetuned_copy, write_tiny_llama

    base = write_tiny_llama(tmp_path / "base")
    ft = finetuned_copy(base, tmp_path / "ft", seed=1)
    result = _probe(["add", str(ft), "--base", str(base), "-o", str(tmp_path / "out") + "/"], ["torch", *MODEL_LIBS], tmp_path)
    assert result == {"code": 0, "loaded": ["torch"]}
    assert (tmp_path / "out" / "config.json").exists()


def test_default_shard_size_is_transformers_default():
    import inspect

    from transformers import PreTrainedModel

    from tvedit.hfdir import default_max_shard_size, parse_size

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert default_max_shard_size() == parse_size(default)
