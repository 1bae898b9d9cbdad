"""Shared fixtures: tiny generated checkpoints and a CLI runner (a child process per run, forked from
tests/forkserver.py's server so that torch is imported once per worker, not once per run)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Two pytest workers on a small machine, each running tvedit processes: OpenMP's default wait policy
# has every idle torch thread spin for its next task and take the cores from the other worker.
# Passive waiting changes no result, only who gets the CPU: measured on the 2-core VM beside a
# study, tests/test_finetune.py + test_evaluate.py took 184 s wall / 141 s CPU by default and 136 s /
# 98 s passive. Set before torch is first imported (libgomp reads it then), for the workers, their
# subprocesses and the fork server; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from safetensors.torch import save_file

from tests.forkserver import ForkServer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's scratch and hash cache out of the user's home."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TVEDIT_SCRATCH", str(root / "scratch"))
    monkeypatch.setenv("TVEDIT_CACHE", str(root / "cache"))


def make_state(seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layer.0.weight": (16, 8), "layer.0.bias": (16,), "layer.1.weight": (4, 16)}
    state = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    state["position_ids"] = torch.arange(6)
    return state


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture
def ckpts(tmp_path: Path) -> dict[str, Path]:
    """base.safetensors plus two fine-tuned checkpoints (plain safetensors, no manifest)."""
    base = make_state(0)
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i in (1, 2):
        paths[f"ft{i}"] = tmp_path / f"ft{i}.safetensors"
        save_file(perturb(base, i), str(paths[f"ft{i}"]))
    return paths


CliRunner = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def forkserver() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def cli(tmp_path: Path, forkserver: ForkServer) -> CliRunner:
    """Run `python -m tvedit ARGS` in a child process (stdout is not a terminal, so commands print JSON
    lines); `shell=` runs a bash command line instead, with this venv's `tvedit` first on PATH."""

    def run(*args: str, input: str | None = None, cwd: Path | None = None, check: bool = False, shell: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        if shell is not None:
            proc = subprocess.run(shell, shell=True, input=input, capture_output=True, text=True, cwd=cwd or tmp_path, env=env, executable="/bin/bash")
        else:
            proc = forkserver.run(list(args), cwd or tmp_path, env, input)
        if check and proc.returncode != 0:
            raise AssertionError(f"tvedit {' '.join(args) or shell} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run
