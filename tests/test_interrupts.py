"""Interrupted runs leave nothing behind; outputs are exclusive and durable (real signals, real processes)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tvedit import safeio
from tvedit.errors import OutputError
from tvedit.manifest import Manifest
from tvedit.reader import content_hash, open_checkpoint
from tvedit.writer import save_tensors


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _start(args: list[str], cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tvedit", *args], cwd=cwd, env=_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _temps(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if safeio.TMP_MARK in p.name)


def _held(directory: Path, n: int = 1):
    """True once ``n`` temporaries are complete (tiny outputs are flushed only at commit, just before the hold)."""
    return lambda: len([p for p in _temps(directory) if p.stat().st_size > 0]) == n


def _wait_for(cond, proc: subprocess.Popen | None = None, timeout: float = 600.0) -> None:
    """Poll ``cond`` until true; the timeout only bounds a hang (a loaded 2-core CI box can take a
    minute to import torch and reach the first step), it is never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _add_held(ckpts: dict[str, Path], out: str, gate: Path) -> subprocess.Popen:
    """`tvedit add` that holds just before its final step until ``gate`` exists (its temporary is complete)."""
    args = ["add", str(ckpts["ft1"]), str(ckpts["ft2"]), "--base", str(ckpts["base"]), "-o", out]
    return _start(args, ckpts["base"].parent, **{safeio.HOLD_ENV: str(gate)})


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_removes_the_temporary_and_exits_conventionally(ckpts, tmp_path, sig, code, name):
    proc = _add_held(ckpts, "out.safetensors", tmp_path / "never")
    _wait_for(_held(tmp_path), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == code
    assert err.strip().splitlines() == [f"interrupted ({name}): unfinished output removed"]
    assert not (tmp_path / "out.safetensors").exists()
    assert _temps(tmp_path) == []


def test_sigkill_leftover_is_removed_by_the_next_write_and_by_clean(ckpts, tmp_path, cli):
    def killed() -> Path:
        proc = _add_held(ckpts, "out.safetensors", tmp_path / "never")
        _wait_for(_held(tmp_path), proc)
        proc.kill()
        proc.wait(timeout=600)
        (left,) = _temps(tmp_path)
        assert left.stat().st_size > 0 and safeio.is_stale(left)
        return left

    left = killed()
    listed = cli("clean", "--dry-run", str(tmp_path / "out.safetensors"), check=True)
    assert [json.loads(line) for line in listed.stdout.splitlines()] == [{"path": str(left), "bytes": left.stat().st_size, "removed": False}]
    assert left.exists()
    cli("clean", str(tmp_path), check=True)
    assert not left.exists()

    left = killed()
    cli("add", str(ckpts["ft1"]), "--base", str(ckpts["base"]), "-o", "other.safetensors", check=True)  # same directory
    assert not left.exists() and _temps(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_finds_cache_and_resume_state_temporaries(tmp_path, cli, monkeypatch):
    """Small files written under safeio.replacing (hash and head caches, fine-tuning resume state)
    leave recognisable temporaries when killed: clean lists them beside an output (its OUT.resume
    directory) and in the caches."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TVEDIT_CACHE", str(cache))
    pid = _dead_pid()
    left = [
        tmp_path / "run" / "ft.resume" / f".state.safetensors{safeio.TMP_MARK}{pid}",
        cache / "hashes" / f".abc{safeio.TMP_MARK}{pid}",
        cache / "heads" / f".def.safetensors{safeio.TMP_MARK}{pid}",
    ]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"12345")
    listed = cli("clean", "--dry-run", str(tmp_path / "run" / "ft.safetensors"), check=True)
    assert sorted(json.loads(line)["path"] for line in listed.stdout.splitlines()) == sorted(map(str, left))
    cli("clean", str(tmp_path / "run"), check=True)
    assert not any(p.exists() for p in left)


def test_replacing_removes_its_temporary_when_the_block_fails(tmp_path):
    final = tmp_path / "state.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), safeio.replacing(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert final.read_text() == "old" and _temps(tmp_path) == []
    with safeio.replacing(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and _temps(tmp_path) == []


def test_live_and_own_temporaries_are_not_stale(tmp_path):
    live = tmp_path / f".x.safetensors{safeio.TMP_MARK}{os.getppid()}"
    mine = safeio.temp_path(tmp_path / "y.safetensors")
    mine_final = mine.with_name(mine.name + "-final")
    for p in (live, mine, mine_final):
        p.write_bytes(b"x")
    safeio.register(mine)
    try:
        assert safeio.stale_temporaries(tmp_path) == []
    finally:
        safeio.unregister(mine)
    assert safeio.stale_temporaries(tmp_path) == sorted([mine, mine_final])  # our PID, but no writer of ours


def test_two_writers_of_one_output_exactly_one_wins(ckpts, tmp_path):
    gate = tmp_path / "gate"
    procs = [_add_held(ckpts, "same.safetensors", gate) for _ in range(2)]
    _wait_for(_held(tmp_path, 2))  # both passed the up-front exists check
    gate.touch()
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 6], results
    loser = next(err for rc, err in results if rc == 6)
    assert loser.strip().splitlines() == [f"error: {Path('same.safetensors')}: already exists (use --force to overwrite)"]
    ckpt = open_checkpoint(tmp_path / "same.safetensors")
    assert ckpt.manifest is not None and content_hash(ckpt) == ckpt.manifest.sha256
    assert _temps(tmp_path) == []


def _write(path: Path, value: float, force: bool = False):
    return save_tensors(path, {"w": torch.full((4,), value)}, Manifest(kind="checkpoint"), force=force)


def test_commit_is_exclusive_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "o.safetensors"
    tmp = tmp_path / ".o.safetensors.tvedit-tmp-1"
    tmp.write_bytes(b"new")
    safeio.commit_file(tmp, out, force=False)
    assert out.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"newer")
    with pytest.raises(OutputError, match="already exists"):
        safeio.commit_file(tmp, out, force=False)
    assert out.read_bytes() == b"new"
    safeio.commit_file(tmp, out, force=True)
    assert out.read_bytes() == b"newer"


def test_output_appearing_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "o.safetensors"
    real_commit = safeio.commit_file

    def racing(tmp, final, force):
        final.write_bytes(b"someone else's")
        return real_commit(tmp, final, force)

    monkeypatch.setattr(safeio, "commit_file", racing)
    with pytest.raises(OutputError, match="already exists"):
        _write(out, 1.0)
    assert out.read_bytes() == b"someone else's" and _temps(tmp_path) == []
    _write(out, 2.0, force=True)
    assert torch.equal(open_checkpoint(out).get("w"), torch.full((4,), 2.0))


def test_file_and_directory_are_fsynced_before_success(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    art = _write(tmp_path / "d.safetensors", 1.0)
    assert any(safeio.TMP_MARK in s for s in synced)  # the file's bytes, before it takes the name
    assert synced[-1] == str(tmp_path) and art.path.exists()


def test_deferred_signal_is_raised_at_the_end_of_the_section():
    safeio.install_signal_handlers()
    try:
        with pytest.raises(safeio.Interrupted) as info, safeio.deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            reached = True
        assert reached and info.value.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.slow
def test_finetune_sigterm_saves_resume_state_first(tmp_path, cli):
    from safetensors.torch import load_file

    from tests.tiny_clip import make_image_folder, write_config
    from tvedit.finetune import run

    theta0 = run.init(str(write_config(tmp_path)), "none", tmp_path / "theta0.safetensors", seed=0).path
    data = make_image_folder(tmp_path / "colours", classes=3, per_class=6)
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")  # no fallback warning: stderr is the one line
    common = ["finetune", "--pretrained", str(theta0), "--train", str(data), "--mode", "full", "--steps", "500",
              "--batch-size", "4", "--warmup", "1", "--lr", "1e-3", "--checkpoint-every", "1000",
              "--templates", str(tmp_path / "templates.txt")]  # fmt: skip
    proc = _start([*common, "-o", "ft.safetensors"], tmp_path)
    log = tmp_path / "ft.train.jsonl"
    _wait_for(lambda: log.exists() and log.stat().st_size > 0, proc)  # the first step is done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    meta = json.loads((tmp_path / "ft.resume" / "state.json").read_text())
    step = meta["step"]
    assert 1 <= step < 500  # saved by the signal, not by --checkpoint-every
    assert err.strip().splitlines() == [f"interrupted (SIGTERM): resume state saved at step {step} in {Path('ft.resume')}; continue with --resume"]
    assert not (tmp_path / "ft.safetensors").exists() and _temps(tmp_path) == []
    # the saved state is the real one: one more step from it equals a run that went straight there
    cli(*common, "-o", "ft.safetensors", "--resume", "--stop-after", "1", check=True)
    cli(*common, "-o", "ref.safetensors", "--stop-after", str(step + 1), check=True)
    resumed, ref = load_file(str(tmp_path / "ft.resume" / "state.safetensors")), load_file(str(tmp_path / "ref.resume" / "state.safetensors"))
    params = [k for k in ref if k.startswith("param/")]
    assert params and all(torch.equal(resumed[k], ref[k]) for k in params)
    assert json.loads((tmp_path / "ft.resume" / "state.json").read_text())["step"] == step + 1


def test_stale_directory_temporaries_are_removed_but_live_ones_kept(tmp_path):
    """Hugging Face directory outputs are written to a temporary directory of the same name pattern."""
    dead = tmp_path / f".model{safeio.TMP_MARK}999999999"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "w.safetensors").write_bytes(b"x" * 10)
    live = safeio.temp_path(tmp_path / "other")
    live.mkdir()
    safeio.register(live)
    try:
        assert safeio.remove_stale(tmp_path, dry_run=True) == [(dead, 10)] and dead.exists()
        assert safeio.remove_stale(tmp_path) == [(dead, 10)]
        assert not dead.exists() and live.exists()
    finally:
        safeio.unregister(live)


def _hf_writer(out: Path, force: bool = False):
    from tvedit.hfdir import HFDirWriter, HFOutput

    w = HFDirWriter(out, Manifest(kind="task-vector"), {"w": 16}, options=HFOutput(), force=force)
    w.write("w", torch.ones(4))
    return w


def test_directory_output_appearing_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "model"
    w = _hf_writer(out)
    out.mkdir()
    (out / "theirs.txt").write_text("someone else's")
    with pytest.raises(OutputError, match="exists and is not empty"):
        w.commit()
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and _temps(tmp_path) == []
    w = _hf_writer(tmp_path / "empty")
    (tmp_path / "empty").mkdir()  # an empty directory may be filled (as the up-front check allows)
    art = w.commit()
    assert (art.path / "model.safetensors").exists() and _temps(tmp_path) == []
    art = _hf_writer(out, force=True).commit()  # --force replaces
    assert not (out / "theirs.txt").exists() and (out / "model.safetensors").exists()
