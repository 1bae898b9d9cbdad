"""The tests' fork server (tests/forkserver.py) answers as `python -m tvedit` in a subprocess does:
the same exit code, stdout and stderr, in the request's working directory, environment and stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.forkserver import ForkServer


def _both(forkserver: ForkServer, args: list[str], cwd: Path, env: dict[str, str], stdin: str | None, outputs: list[str]) -> list[tuple[int, str, str]]:
    """Each way once, from the same files: what the first run wrote is removed before the second."""
    runs = []
    for forked in (True, False):
        for name in outputs:
            (cwd / name).unlink(missing_ok=True)
        if forked:
            proc = forkserver.run(args, cwd, env, stdin)
        else:
            proc = subprocess.run([sys.executable, "-m", "tvedit", *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env)
        runs.append((proc.returncode, proc.stdout, proc.stderr))
    return runs


def test_forked_runs_equal_subprocess_runs(forkserver: ForkServer, ckpts: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "TVEDIT_CHUNK_MIB": "0.0001"}  # the child reads the request's environment
    fork, plain = _both(forkserver, ["extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "tau.safetensors"], tmp_path, env, None, ["tau.safetensors"])
    assert fork == plain and fork[0] == 0 and fork[1]
    cases = [
        (["--version"], None, []),
        (["info", "tau.safetensors"], None, []),
        (["add", "-", "--alpha", "0.5", "-o", "merged.safetensors"], fork[1], ["merged.safetensors"]),  # stdin
        (["add", "missing.safetensors", "-o", "x.safetensors"], None, []),  # exit 3, one line
        (["scale", "tau.safetensors", "--by", "2", "-o", "y.safetensors", "--chunk-mib", "x"], None, []),  # usage
    ]
    codes = []
    for args, stdin, outputs in cases:
        fork, plain = _both(forkserver, args, tmp_path, env, stdin, outputs)
        assert fork == plain, args
        codes.append(fork[0])
    assert codes == [0, 0, 0, 3, 2]
    bad = forkserver.run(["add", "tau.safetensors", "-o", "z.safetensors"], tmp_path, {**env, "TVEDIT_CHUNK_MIB": "-1"})
    assert bad.returncode == 2 and "TVEDIT_CHUNK_MIB" in bad.stderr  # not the server's environment
