"""Where `tvedit add` holds memory: sample the resident set size while it runs, with the code and key.

Runs `tvedit ARGS...` in this process (after `import torch, tvedit.arith`), reads VmRSS from
/proc/self/status every --interval seconds on a thread, together with the main thread's innermost
tvedit function and the key `arith.add` is on, and prints: a timeline of RSS steps (>= --step MiB) with what ran, the RSS after the imports (the torch
runtime), the peak and where it happened (stack and key), and the highest RSS seen per tvedit
function and per key. torch's allocations are native, so tracemalloc cannot see them; RSS can.

Usage: python benchmarks/profile_add_rss.py [--interval 0.001] -- add RECIPE.yml -o OUT/ --force
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def where(frame) -> tuple[str, str | None, list[str]]:  # noqa: ANN001
    """(innermost tvedit function, arith.add's current key, the tvedit part of the stack)."""
    stack, key = [], None
    while frame is not None:
        code = frame.f_code
        if "tvedit" in code.co_filename:
            stack.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
            if code.co_name == "add" and code.co_filename.endswith("arith.py"):
                key = frame.f_locals.get("key")
        frame = frame.f_back
    return (stack[0] if stack else "-"), key, stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.001)
    ap.add_argument("--step", type=float, default=8.0, help="timeline resolution (MiB)")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="tvedit arguments (after --)")
    args = ap.parse_args()
    targv = args.args[1:] if args.args[:1] == ["--"] else args.args
    t0 = time.perf_counter()
    start = rss_mib()
    import torch  # noqa: F401

    after_torch = rss_mib()
    import tvedit.arith  # noqa: F401
    from tvedit.cli.app import main as tvedit_main

    after_imports = rss_mib()
    imports_s = time.perf_counter() - t0
    main_id = threading.get_ident()
    peak = {"rss": 0.0}
    per_fn: dict[str, float] = defaultdict(float)
    per_key: dict[str, float] = defaultdict(float)
    stop = threading.Event()
    timeline: list[tuple[float, float, str, str | None]] = []  # (t, rss, function, key) when RSS moved by >= --step MiB

    def sample() -> None:
        while not stop.is_set():
            r = rss_mib()
            frame = sys._current_frames().get(main_id)
            fn, key, stack = where(frame)
            per_fn[fn] = max(per_fn[fn], r)
            if key is not None:
                per_key[key] = max(per_key[key], r)
            if not timeline or abs(r - timeline[-1][1]) >= args.step:
                timeline.append((round(time.perf_counter() - t0, 3), round(r, 1), fn, key))
            if r > peak["rss"]:
                peak.update(rss=r, fn=fn, key=key, stack=stack, t=time.perf_counter() - t0)
            time.sleep(args.interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    sys.argv = ["tvedit", *targv]
    rc = 0
    try:
        tvedit_main()
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    stop.set()
    th.join()
    modules = sorted(m for m in ("transformers", "transformers.modeling_utils", "yaml", "numpy", "safetensors") if m in sys.modules)
    summary = {
        "rc": rc, "rss_start_mib": start, "rss_after_import_torch_mib": after_torch, "rss_after_tvedit_api_cli_mib": after_imports,
        "imports_s": imports_s, "total_s": time.perf_counter() - t0, "peak": peak,
        "top_functions": sorted(per_fn.items(), key=lambda kv: -kv[1])[:12],
        "top_keys": sorted(per_key.items(), key=lambda kv: -kv[1])[:6], "modules_loaded": modules,
        "timeline": timeline,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "timeline"}, indent=1), file=sys.stderr)
    for t, r, fn, key in timeline:
        print(f"{t:8.3f} s {r:8.1f} MiB  {fn}  {key or ''}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
