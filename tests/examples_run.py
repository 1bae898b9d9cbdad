"""Running the examples/ scripts as a user would (tests/test_examples*.py): from the repository's
venv, with TVEDIT_EXAMPLE_SMALL=1 (tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def example_env() -> dict[str, str]:
    env = dict(os.environ, TVEDIT_EXAMPLE_SMALL="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_example(cmd: list[str] | str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` (argv, or a bash line) in ``cwd``; with ``ok``, a non-zero exit fails the test with the output's tail."""
    proc = subprocess.run(cmd, cwd=cwd, env=example_env(), capture_output=True, text=True, shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    if ok:
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc
