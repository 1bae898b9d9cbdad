"""Run a command in a child process and report its wall time and peak RSS (shared by benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds and peak resident set size (MiB) of ``cmd``, run in a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'rc': rc, 'wall_s': wall, 'peak_rss_mib': rss}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result['rc']}: {out.stderr[-2000:]}")
    return result


if __name__ == "__main__":  # pragma: no cover
    print(measure(sys.argv[1:]))
