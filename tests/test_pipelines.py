"""Pipelines leave nothing behind, and concurrent pipelines do not disturb each other.

Real `bash -c 'tvedit … | tvedit … | tvedit …'` pipelines (small tensors, TVEDIT_SCRATCH set by
conftest): every failure of a stage, SIGTERM and SIGKILL of each stage, a next stage that closes
the pipe, and several identical and different pipelines at once. Afterwards the scratch directory
is empty (after a SIGKILL: once `tvedit clean` has run). Stages are paused at their final step with
the TVEDIT_TEST_HOLD_COMMIT hook and synchronised on files, never on sleeps.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit import headers, safeio

from .conftest import make_state

TIMEOUT = 900  # seconds for one pipeline: generous, the box may be loaded
HOLD = safeio.HOLD_ENV
EXTRACT = "tvedit extract ft1.safetensors ft2.safetensors --base base.safetensors"


def _scratch() -> Path:
    path = Path(os.environ["TVEDIT_SCRATCH"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _stage(command: str, name: str, hold: Path | None = None) -> str:
    """A pipeline stage that records its PID in NAME.pid (exec keeps the PID) and, with ``hold``,
    waits before its final step until that file exists."""
    gate = f"env {HOLD}={shlex.quote(str(hold))} " if hold is not None else ""
    return f"(echo $BASHPID > {name}.pid; exec {gate}{command})"


def _start(script: str, cwd: Path) -> subprocess.Popen:
    """``script`` under bash; the exit status of every stage goes to ``codes``."""
    full = f'{script}; echo "${{PIPESTATUS[*]}}" > codes'
    return subprocess.Popen(["bash", "-c", full], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, cwd: Path) -> tuple[list[int], str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return [int(c) for c in (cwd / "codes").read_text().split()], out, err


def _run(script: str, cwd: Path) -> tuple[list[int], str, str]:
    return _finish(_start(script, cwd), cwd)


def _wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"pipeline ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pid(cwd: Path, name: str, proc: subprocess.Popen) -> int:
    f = cwd / f"{name}.pid"
    _wait_for(lambda: f.exists() and f.read_text().endswith("\n"), proc, f"{name}.pid")
    return int(f.read_text())


def _complete_temps(directory: Path, n: int = 1, pid: int | None = None):
    """True once ``n`` complete temporaries (of process ``pid``, if given) are there (tiny outputs
    are flushed just before the hold)."""
    mark = safeio.TMP_MARK + (str(pid) if pid is not None else "")

    def done() -> bool:
        found = []
        for p in directory.iterdir():
            try:
                if mark in p.name and (pid is None or p.name.endswith(mark)) and p.stat().st_size > 0:
                    found.append(p)
            except FileNotFoundError:  # committed meanwhile
                pass
        return len(found) >= n

    return done


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].startswith("Z")  # a zombie is dead
    except FileNotFoundError:
        return True


def _leftovers(*dirs: Path) -> list[Path]:
    """Intermediates and temporaries (not the test's own files)."""
    found = []
    for d in dirs:
        found += [p for p in d.iterdir() if safeio.TMP_MARK in p.name or safeio.INTERMEDIATE_RE.match(p.name)]
    return sorted(found)


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err and "\x1b" not in err, err
    return [line for line in err.splitlines() if line.strip()]


def _expected(ckpts: dict[str, Path], by: float, alpha: float, order=("ft1", "ft2")) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """theta0 + alpha * sum_i by * (theta_i - theta0) in float64, and a tolerance per key derived
    from the float32 computation: each of the ~6 roundings is within eps32 of the magnitudes involved."""
    base = load_file(str(ckpts["base"]))
    fts = [load_file(str(ckpts[k])) for k in order]
    eps = torch.finfo(torch.float32).eps
    want, tol = {}, {}
    for k, b in base.items():
        if not b.is_floating_point():
            want[k], tol[k] = b, torch.zeros(())
            continue
        taus = [f[k].double() - b.double() for f in fts]
        want[k] = b.double() + alpha * sum(by * t for t in taus)
        scale = b.double().abs() + sum(f[k].double().abs() for f in fts) + abs(alpha * by) * sum(t.abs() for t in taus)
        tol[k] = 8 * eps * scale
    return want, tol


def _check_merged(path: Path, want: dict[str, torch.Tensor], tol: dict[str, torch.Tensor]) -> None:
    got = load_file(str(path))
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        if not w.is_floating_point():
            assert torch.equal(got[k], w), k
        else:
            assert bool(((got[k].double() - w).abs() <= tol[k]).all()), k


PIPE = f"{EXTRACT} | tvedit scale - --by 0.5 | tvedit add - --alpha 0.3 -o merged.safetensors"


# ------------------------------------------------------------------------------------------------
# Failures of a stage
# ------------------------------------------------------------------------------------------------
def _failing_inputs(tmp_path: Path) -> None:
    base = load_file(str(tmp_path / "base.safetensors"))
    bad = {k: v.clone() for k, v in base.items()}
    bad["layer.1.weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "ftnan.safetensors"))
    save_file(make_state(7), str(tmp_path / "other_base.safetensors"))
    (tmp_path / "exists.safetensors").write_bytes(b"not mine to replace")


FAILURES = {
    # name: (pipeline, exit codes of the stages)
    "bad --method": (f"{EXTRACT} | tvedit scale - --by 0.5 | tvedit add - --method bogus -o merged.safetensors", [0, 0, 2]),
    "bad --alpha": (f"{EXTRACT} | tvedit scale - --by 0.5 | tvedit add - --alpha abc -o merged.safetensors", [0, 0, 2]),
    "output exists": (f"{EXTRACT} | tvedit scale - --by 0.5 | tvedit add - -o exists.safetensors", [0, 0, 6]),
    "NaN in the last stage": (f"{EXTRACT} | tvedit scale - --by 0.5 | tvedit add - --alpha 1e40 -o merged.safetensors", [0, 0, 5]),
    # the first output of extract is committed before the second fails: it is removed too
    "NaN in the first stage": ("tvedit extract ft1.safetensors ftnan.safetensors --base base.safetensors | tvedit scale - --by 0.5 | tvedit add - -o merged.safetensors", [5, 3, 3]),
    "mismatched bases": (f"{EXTRACT} | tvedit scale - --by 0.5 | tvedit add - --base other_base.safetensors -o merged.safetensors", [0, 0, 4]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failing_stage_leaves_nothing_behind(ckpts, tmp_path, case):
    _failing_inputs(tmp_path)
    script, codes = FAILURES[case]
    got, _, err = _run(script, tmp_path)
    assert got == codes, err
    _error_lines(err)
    assert _leftovers(_scratch(), tmp_path) == []
    assert not (tmp_path / "merged.safetensors").exists()
    assert (tmp_path / "exists.safetensors").read_bytes() == b"not mine to replace"


def test_pipeline_succeeds_with_correct_values_and_an_empty_scratch(ckpts, tmp_path):
    got, out, err = _run(PIPE, tmp_path)
    assert got == [0, 0, 0], err
    want, tol = _expected(ckpts, 0.5, 0.3)
    _check_merged(tmp_path / "merged.safetensors", want, tol)
    assert _leftovers(_scratch(), tmp_path) == []


# ------------------------------------------------------------------------------------------------
# A next stage that closes the pipe
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_producer_whose_reader_closed_the_pipe_removes_what_it_wrote(ckpts, tmp_path):
    """The middle stage commits only after the next one has closed its standard input: its JSON
    lines cannot be delivered, so it removes its outputs (and its consumed inputs) and exits 141."""
    gate = tmp_path / "closed"
    script = f"{EXTRACT} | {_stage('tvedit scale - --by 0.5', 'scale', gate)} | (exec 0<&-; touch closed)"
    got, _, err = _run(script, tmp_path)
    assert got == [0, 141, 0], err
    assert _error_lines(err) == ["error: standard output was closed by the next command; removed 2 intermediates written for it"]
    assert _leftovers(_scratch(), tmp_path) == []


@pytest.mark.slow
def test_a_killed_reader_makes_the_producer_remove_its_outputs(ckpts, tmp_path):
    """SIGKILL of the last stage before the middle one prints: the middle one cleans up (141)."""
    gate = tmp_path / "go"
    script = f"{EXTRACT} | {_stage('tvedit scale - --by 0.5', 'scale', gate)} | {_stage('tvedit add - -o merged.safetensors', 'add')}"
    proc = _start(script, tmp_path)
    pid = _pid(tmp_path, "add", proc)
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: _gone(pid), proc, "the last stage to die")
    gate.touch()
    got, _, err = _finish(proc, tmp_path)
    assert got == [0, 141, 137], err
    assert _leftovers(_scratch(), tmp_path) == []


# ------------------------------------------------------------------------------------------------
# SIGTERM and SIGKILL of each stage
# ------------------------------------------------------------------------------------------------
KILL_CODES = {  # stage -> exit codes of (extract, scale, add) with the stage's own code as None
    "extract": [None, 3, 3],  # the later stages receive no inputs
    "scale": [0, None, 3],
    "add": [0, 0, None],
}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("stage", list(KILL_CODES))
def test_a_killed_stage_leaves_nothing_behind(ckpts, tmp_path, stage, sig, cli):
    """The stage is stopped at its final step (its output complete in a temporary, its inputs
    held). SIGTERM: it removes its inputs, its temporary and its outputs itself. SIGKILL: what is
    left is held by no live process, and `tvedit clean` lists it (--dry-run) and removes it."""
    never = tmp_path / "never"
    commands = {"extract": EXTRACT, "scale": "tvedit scale - --by 0.5", "add": "tvedit add - --alpha 0.3 -o merged.safetensors"}
    script = " | ".join(_stage(cmd, name, never if name == stage else None) for name, cmd in commands.items())
    proc = _start(script, tmp_path)
    where = tmp_path if stage == "add" else _scratch()
    pid = _pid(tmp_path, stage, proc)
    _wait_for(_complete_temps(where, pid=pid), proc, f"{stage}'s temporary")  # its inputs were read
    os.kill(pid, sig)
    got, _, err = _finish(proc, tmp_path)
    want = [128 + sig if c is None else c for c in KILL_CODES[stage]]
    assert got == want, err
    lines = _error_lines(err)
    if sig == signal.SIGTERM:
        assert "interrupted (SIGTERM): unfinished output removed" in lines
        assert _leftovers(_scratch(), tmp_path) == []
    else:
        left = _leftovers(_scratch(), tmp_path)
        assert left  # a temporary at least
        listed = cli("clean", "--dry-run", str(tmp_path / "merged.safetensors"), check=True)
        assert sorted(json.loads(line)["path"] for line in listed.stdout.splitlines()) == sorted(map(str, left))
        assert _leftovers(_scratch(), tmp_path) == left
        cli("clean", str(tmp_path / "merged.safetensors"), check=True)
        assert _leftovers(_scratch(), tmp_path) == []
    assert not (tmp_path / "merged.safetensors").exists()


def test_an_interrupted_consumer_removes_what_already_arrived_without_waiting(tmp_path, monkeypatch):
    """After a signal, drain_stdin(wait=False) takes the lines already in the pipe (the writer is
    still open: a blocking read would never end) and removes the intermediates they list; a line
    naming a file outside the scratch directory removes nothing."""
    from tvedit import pipeline

    scratch = _scratch()
    mine = scratch / "ft1.tv.1-00000000.safetensors"
    outside = tmp_path / "ft2.tv.1-00000000.safetensors"
    for p in (mine, outside):
        p.write_bytes(b"x")
    r, w = os.pipe()
    os.write(w, "".join(json.dumps({"path": str(p), "ephemeral": True}) + "\n" for p in (mine, outside)).encode())
    with os.fdopen(r) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(pipeline, "_stdin_done", False)
        pipeline.drain_stdin(wait=False)
    os.close(w)
    assert not mine.exists() and outside.exists()


# ------------------------------------------------------------------------------------------------
# tvedit clean and the scratch pruning respect held intermediates
# ------------------------------------------------------------------------------------------------
def test_clean_removes_only_unheld_intermediates(tmp_path, cli):
    scratch = _scratch()
    held, unheld = scratch / "ft1.tv.123-0a1b2c3d.safetensors", scratch / "ft2.tv.456-0a1b2c3d.safetensors"
    mine = scratch / "my_model.safetensors"  # not an intermediate's name: never touched
    for p in (held, unheld, mine):
        p.write_bytes(b"12345678")
    fd = safeio.lock_shared(held)  # this (live) test process holds it, as a pipeline stage would
    try:
        listed = cli("clean", "--dry-run", check=True)
        assert [json.loads(line) for line in listed.stdout.splitlines()] == [{"path": str(unheld), "bytes": 8, "removed": False}]
        assert unheld.exists()
        cli("clean", str(scratch), check=True)  # the scratch directory as PATH: the same
        assert not unheld.exists() and held.exists() and mine.exists()
    finally:
        os.close(fd)
    cli("clean", check=True)
    assert not held.exists() and mine.exists()


def test_scratch_pruning_removes_day_old_unheld_intermediates_only(tmp_path):
    from tvedit.pipeline import prune_scratch

    scratch = _scratch()
    old, fresh, old_held = (scratch / f"{n}.tv.1-0000000{i}.safetensors" for i, n in enumerate(("a", "b", "c")))
    for p in (old, fresh, old_held):
        p.write_bytes(b"x")
    day_ago = time.time() - 2 * 24 * 3600
    for p in (old, old_held):
        os.utime(p, (day_ago, day_ago))
    fd = safeio.lock_shared(old_held)
    try:
        prune_scratch()
        assert not old.exists() and fresh.exists() and old_held.exists()
    finally:
        os.close(fd)


def test_an_intermediate_is_held_from_its_commit_and_removed_unless_handed_on(tmp_path):
    """The writer side of the registry, in process: commit -> held (clean would skip it) ->
    release removes it; hand_on keeps it for the next command."""
    from tvedit.manifest import Manifest
    from tvedit.writer import CheckpointWriter

    scratch = _scratch()

    def write(stem: str) -> Path:
        w = CheckpointWriter(scratch / f"{stem}.tv.safetensors", Manifest(kind="task-vector"), ["w"], ephemeral=True)
        w.write("w", torch.ones(4))
        return w.commit().path

    a, b = write("a"), write("a")
    assert a != b and a.name.startswith("a.tv.") and safeio.INTERMEDIATE_RE.match(a.name)  # private names
    assert safeio.unheld_intermediates(scratch, dry_run=True) == []  # held by this process
    safeio.hand_on([b])
    safeio.release()
    assert not a.exists() and b.exists()
    size = b.stat().st_size
    assert safeio.unheld_intermediates(scratch) == [(b, size)] and not b.exists()


# ------------------------------------------------------------------------------------------------
# Concurrent pipelines
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_pipelines_same_and_different_inputs(ckpts, tmp_path):
    """Six pipelines at once sharing one scratch directory and a cold hash cache: four identical
    ones and two with other inputs. Every extract is held at its first commit until all six have
    a complete temporary, so they all write, hand on and remove intermediates at the same time."""
    gate = tmp_path / "go"
    jobs = {f"same{i}": ("ft1.safetensors ft2.safetensors", 0.5, ("ft1", "ft2")) for i in range(4)}
    jobs["swapped"] = ("ft2.safetensors ft1.safetensors", 0.5, ("ft2", "ft1"))
    jobs["quarter"] = ("ft1.safetensors ft2.safetensors", 0.25, ("ft1", "ft2"))
    procs = {}
    for name, (fts, by, _) in jobs.items():
        d = tmp_path / name
        d.mkdir()
        for k in ("base", "ft1", "ft2"):
            (d / f"{k}.safetensors").symlink_to(ckpts[k])  # the same files (the cache keys by real path)
        extract = f"env {HOLD}={shlex.quote(str(gate))} tvedit extract {fts} --base base.safetensors"
        procs[name] = _start(f"{extract} | tvedit scale - --by {by} | tvedit add - --alpha 0.3 -o merged.safetensors", d)
    first = next(iter(procs.values()))
    _wait_for(_complete_temps(_scratch(), len(jobs)), first, "every extract's first temporary")
    gate.touch()
    for name, proc in procs.items():
        got, _, err = _finish(proc, tmp_path / name)
        assert got == [0, 0, 0], f"{name}: {err}"
        assert _error_lines(err) == []
    # identical pipelines give identical tensors (the manifests differ only in the absolute path of the
    # base each recorded: every job runs in its own directory)
    from tvedit.reader import content_hash, open_checkpoint

    same = {content_hash(open_checkpoint(tmp_path / n / "merged.safetensors")) for n in jobs if n.startswith("same")}
    assert len(same) == 1
    manifests = {open_checkpoint(tmp_path / n / "merged.safetensors").manifest.to_json().replace(str(tmp_path / n), "JOB")
                 for n in jobs if n.startswith("same")}  # fmt: skip
    assert len(manifests) == 1
    for name, (_, by, order) in jobs.items():
        want, tol = _expected(ckpts, by, 0.3, order)
        _check_merged(tmp_path / name / "merged.safetensors", want, tol)
    assert _leftovers(_scratch()) == [] and list(_scratch().iterdir()) == []
    # the hash cache, filled by six processes at once: one correct entry per plain input, no temporaries
    cache = Path(os.environ["TVEDIT_CACHE"]) / "hashes"
    assert not [p for p in cache.iterdir() if safeio.TMP_MARK in p.name]
    for k in ("base", "ft1", "ft2"):
        files = headers.resolve_files(ckpts[k])
        assert headers.cached_hash(headers.file_stamp(files)) == headers.file_content_hash(files), k


@pytest.mark.slow
def test_example_pipeline_runs_twice_in_one_directory(ckpts, tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "pipeline.sh"
    for _ in range(2):
        proc = subprocess.run(["bash", str(script), "base.safetensors", "ft1.safetensors", "ft2.safetensors"], cwd=tmp_path,
                              env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert _leftovers(_scratch(), tmp_path) == []
    want, tol = _expected(ckpts, 0.5, 0.3)
    _check_merged(tmp_path / "merged.safetensors", want, tol)
