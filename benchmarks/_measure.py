"""Run a command in a child process and report its wall time and peak RSS (shared by benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys

# The I/O floor, run as `python -c FLOOR INPUT... OUT SIZE MODE`: read every input once (16 MiB
# positional reads into one reused buffer; a directory stands for its *.safetensors files) and
# write an output of SIZE bytes; MODE "fsync" also fsyncs the output and its directory, "hash"
# also computes the sha256 of the bytes written, "-" neither. The least any implementation must do.
FLOOR = r"""
import glob, hashlib, os, sys
paths, out, size, mode = sys.argv[1:-3], sys.argv[-3], int(sys.argv[-2]), sys.argv[-1]
files = [f for p in paths for f in (sorted(glob.glob(os.path.join(p, "*.safetensors"))) if os.path.isdir(p) else [p])]
buf = bytearray(16 << 20)
view = memoryview(buf)
h = hashlib.sha256()
for p in files:
    fd = os.open(p, os.O_RDONLY)
    off = 0
    while True:
        n = os.preadv(fd, [view], off)
        if n <= 0:
            break
        off += n
    os.close(fd)
with open(out, "wb") as f:
    left = size
    while left > 0:
        n = min(left, len(buf))
        f.write(view[:n])
        if mode == "hash":
            h.update(view[:n])
        left -= n
    if mode == "fsync":
        f.flush()
        os.fsync(f.fileno())
if mode == "fsync":
    fd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system: less sensitive than wall time to other load on a shared
    machine) and peak resident set size (MiB) of ``cmd``, run in a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "wall = time.perf_counter() - t\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': rc, 'wall_s': wall, 'cpu_s': ru.ru_utime + ru.ru_stime, 'peak_rss_mib': ru.ru_maxrss / 1024}))\n"
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
