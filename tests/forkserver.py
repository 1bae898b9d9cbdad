"""A fork server for the tests' `tvedit ARGS` runs: most of a CLI run's time in the tests is Python
importing torch (1.7 s here) — this imports torch and tvedit once per pytest worker, in a process that
never runs a torch op (so forking it is safe: no thread pool to lose), and forks a child per run.
The child is a new process in everything a test can observe — its own working directory,
environment, stdin/stdout/stderr files, exit status (a negative one when a signal kills it), signal
dispositions of a fresh interpreter, atexit handlers and non-daemon threads run at its exit, and
`sys.path[0]` / `sys.argv` as `python -m tvedit` sets them — only the imports are shared.

Run as a script it is the server: requests are JSON lines on stdin
({"args", "cwd", "env", "stdin", "stdout", "stderr"}: file paths for the three streams), each
answered with the child's exit code on stdout. TVEDIT_TEST_FORKSERVER=0 makes the tests start a
plain `python -m tvedit` subprocess instead (to rule the server out when a test misbehaves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


def _serve() -> None:
    import gc
    import importlib
    import pkgutil
    import runpy

    import tvedit

    # the imports the children share: every tvedit module (torch, numpy, typer, rich, yaml with them);
    # transformers, open_clip and huggingface_hub stay out (tvedit imports them where used, and
    # huggingface_hub reads HF_HUB_OFFLINE and the like when imported: a child must read its own)
    for module in pkgutil.walk_packages(tvedit.__path__, "tvedit."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    assert not {"transformers", "open_clip", "huggingface_hub"} & set(sys.modules), "the fork server imported a library that reads the environment"
    from typer.main import get_command

    get_command(tvedit.cli.app.app)  # typer's parser imports (pydantic, its adapters) happen here once
    gc.freeze()  # the children's garbage collections (and their exit) skip the server's million objects

    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.dup(1)
    while line := requests.readline():
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: becomes `python -m tvedit ARGS` and never returns to the loop
            requests.close()
            os.close(replies)
            for fd, (path, flags) in enumerate(((req["stdin"], os.O_RDONLY), (req["stdout"], os.O_WRONLY), (req["stderr"], os.O_WRONLY))):
                target = os.open(path, flags)
                os.dup2(target, fd)
                os.close(target)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.path[0] = os.getcwd()  # what `python -m` puts first
            sys.argv = ["tvedit", *req["args"]]
            runpy.run_module("tvedit", run_name="__main__", alter_sys=True)
            sys.exit(0)  # SystemExit (or any exception) unwinds to the interpreter: a normal exit
        _, status = os.waitpid(pid, 0)
        os.write(replies, f"{os.waitstatus_to_exitcode(status)}\n".encode())


class ForkServer:
    """One server per pytest worker, started on first use; a lock keeps one request in flight."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, cwd=tempfile.gettempdir())
        return self._proc

    def run(self, args: list[str], cwd: Path, env: dict[str, str], input: str | None = None) -> subprocess.CompletedProcess:
        """`python -m tvedit ARGS` with text stdout/stderr captured, as subprocess.run would return it."""
        if os.environ.get("TVEDIT_TEST_FORKSERVER", "1") == "0":
            return subprocess.run([sys.executable, "-m", "tvedit", *args], input=input, capture_output=True, text=True, cwd=cwd, env=env)
        with tempfile.TemporaryDirectory(prefix="tvedit-fork-") as tmp, self._lock:
            streams = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
            Path(streams["stdin"]).write_text(input or "")
            Path(streams["stdout"]).touch()
            Path(streams["stderr"]).touch()
            proc = self._server()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write((json.dumps({"args": [str(a) for a in args], "cwd": str(cwd), "env": env, **streams}) + "\n").encode())
            proc.stdin.flush()
            reply = proc.stdout.readline()
            if not reply:
                raise RuntimeError("the tests' fork server died (rerun with TVEDIT_TEST_FORKSERVER=0 to compare)")
            out = Path(streams["stdout"]).read_text()
            err = Path(streams["stderr"]).read_text()
        return subprocess.CompletedProcess([sys.executable, "-m", "tvedit", *args], int(reply), out, err)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=30)


if __name__ == "__main__":
    _serve()
