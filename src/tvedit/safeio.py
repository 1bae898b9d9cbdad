"""Interrupt-safe, exclusive and durable outputs (no torch: imported by every command).

* Temporaries: every output is written to ``.NAME.tvedit-tmp-PID`` beside it. The writer registers
  it here while it is open. ``stale_temporaries(dir)`` finds the ones whose process is gone (SIGKILL,
  power loss, a crash); the next write to a directory removes them, and ``tvedit clean`` lists or
  removes them in the scratch directory and beside given outputs.
* Signals: the CLI calls ``install_signal_handlers()``; SIGINT and SIGTERM then raise
  ``Interrupted`` (a BaseException, like KeyboardInterrupt), so every ``with`` block and ``finally`` unwinds and the
  writers delete their temporaries; the CLI prints one line and exits 128 + signal (130 / 143).
  ``deferred_signals()`` postpones them over a critical section (the final rename, a training
  step that ends in a resume checkpoint); a second signal inside it is not postponed.
* Intermediates: a scratch file handed from one command of a pipeline to the next is *held* by
  each process that has it: ``hold(path)`` opens it with a shared ``flock`` and registers it;
  ``release()`` (every CLI command runs it when it finishes, whatever the exit path) removes the
  held files not ``hand_on``-ed and drops the locks. The lock dies with its process, so
  ``unheld_intermediates(dir)`` (``tvedit clean``, the scratch pruning) takes an exclusive lock
  without waiting to tell a file no live process holds.
* Commit: ``commit_file(tmp, final, force)`` fsyncs the file, puts it in place (without ``force``
  by ``link`` + ``unlink``, which fails if the output appeared meanwhile; where the filesystem has
  no hard links, by claiming the name with O_EXCL first), and fsyncs the directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tvedit.errors import OutputError

if TYPE_CHECKING:  # (typing.Self is Python 3.11+)
    from typing_extensions import Self

TMP_MARK = ".tvedit-tmp-"
_TMP_RE = re.compile(r"^\..+\.tvedit-tmp-(\d+)(?:-final)?$")
# Test hook: before the final step of a commit, wait (up to a minute) until this path exists.
HOLD_ENV = "TVEDIT_TEST_HOLD_COMMIT"

_active: set[str] = set()  # temporaries this process is writing right now


def temp_path(final: Path) -> Path:
    """The temporary beside ``final`` for this process."""
    return final.parent / f".{final.name}{TMP_MARK}{os.getpid()}"


@contextmanager
def replacing(final: Path) -> Iterator[Path]:
    """Write a small file (a cache entry, resume state) under a temporary name that a later
    ``remove_stale`` / ``tvedit clean`` recognises, then rename it over ``final`` (replacing it);
    the temporary is removed if the block fails or is interrupted."""
    tmp = temp_path(final)
    register(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        unregister(tmp)
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def register(path: Path) -> None:
    _active.add(os.path.abspath(path))


def unregister(path: Path) -> None:
    _active.discard(os.path.abspath(path))


# ------------------------------------------------------------------------------------------------
# Stale temporaries
# ------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def is_stale(path: Path) -> bool:
    """A tvedit temporary whose writer is gone: its PID is dead, or is ours but not in use by us
    (PIDs repeat across container runs)."""
    m = _TMP_RE.match(path.name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        base = os.path.abspath(path)
        return base.removesuffix("-final") not in _active
    return not _pid_alive(pid)


def stale_temporaries(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(directory / n for n in names if TMP_MARK in n and is_stale(directory / n))


def remove_stale(directory: Path, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove (or only list, with ``dry_run``) stale temporaries in ``directory``; returns (path, bytes)."""
    found = []
    for p in stale_temporaries(directory):
        try:
            if p.is_dir() and not p.is_symlink():  # a Hugging Face directory being written
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                if not dry_run:
                    shutil.rmtree(p)
            else:
                size = p.stat().st_size
                if not dry_run:
                    p.unlink()
        except OSError:
            continue
        found.append((p, size))
    return found


# ------------------------------------------------------------------------------------------------
# Intermediates held by this process
# ------------------------------------------------------------------------------------------------
# A pipeline's intermediate: STEM.PID-RANDOM.safetensors (unique per writer); the older
# content-named STEM.HASH16.safetensors is recognised too.
INTERMEDIATE_RE = re.compile(r"^[^.].*\.(?:\d+-[0-9a-f]{8}|[0-9a-f]{16})\.safetensors$")
_held: dict[str, tuple[int, bool]] = {}  # path -> (descriptor holding a shared flock, remove on release)


def lock_shared(path: Path) -> int:
    """Open ``path`` and take a shared flock on it (waits while ``tvedit clean`` decides about it);
    returns the descriptor. A filesystem without locks still gets the descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
    return fd


def hold(path: Path, remove: bool = True, fd: int | None = None) -> None:
    """Hold the intermediate ``path`` (shared lock, ``fd`` if already locked) until ``release``,
    which removes it when ``remove``. A file that is gone (or was replaced) is not held."""
    key = os.path.abspath(path)
    if key in _held:
        if fd is not None:
            os.close(fd)
        return
    try:
        if fd is None:
            fd = lock_shared(Path(key))
        if not os.path.samestat(os.fstat(fd), os.stat(key)):  # removed while we waited for the lock
            raise FileNotFoundError(key)
    except OSError:
        if fd is not None:
            os.close(fd)
        return
    _held[key] = (fd, remove)


def hand_on(paths: Iterable[Path]) -> None:
    """These held files now belong to the next command (their JSON lines were written): keep
    them on release (the lock stays until this process ends)."""
    for p in paths:
        key = os.path.abspath(p)
        if key in _held:
            _held[key] = (_held[key][0], False)


def release(paths: Iterable[Path] | None = None) -> None:
    """Remove the held files (all, or ``paths``) that were not handed on, and drop their locks."""
    keys = list(_held) if paths is None else [os.path.abspath(p) for p in paths]
    for key in keys:
        entry = _held.pop(key, None)
        if entry is None:
            continue
        fd, remove = entry
        try:
            if remove:
                os.unlink(key)
        except OSError:  # gone already, or not ours to remove: nothing more to do
            pass
        finally:
            os.close(fd)


def held() -> list[Path]:
    """The intermediates this process holds (and will remove unless handed on)."""
    return [Path(k) for k, (_, remove) in _held.items() if remove]


def unheld_intermediates(directory: Path, min_age_s: float = 0.0, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove (or only list, with ``dry_run``) the intermediates in ``directory`` that no live
    process holds and that were last modified at least ``min_age_s`` ago; returns (path, bytes).
    A file is unheld when an exclusive flock on it is granted at once; it is removed while that
    lock is kept, so a process that asks for it meanwhile finds it gone."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    now = time.time()
    found = []
    for name in names:
        if not INTERMEDIATE_RE.match(name):
            continue
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if now - st.st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process (or no locks here: leave it)
                continue
            if not os.path.samestat(st, os.stat(path)):
                continue
            if not dry_run:
                os.unlink(path)
            found.append((path, st.st_size))
        except OSError:
            continue
        finally:
            os.close(fd)
    return found


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------
class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwinds like Ctrl-C (a BaseException, so ``except Exception``
    in a library does not swallow it). ``detail`` says what was kept (if anything)."""

    def __init__(self, signum: int, detail: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_defer_depth = 0
_pending: int | None = None


def _handler(signum: int, frame: object) -> None:
    global _pending
    if _defer_depth > 0 and _pending is None:
        _pending = signum
        return
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT/SIGTERM raise Interrupted in the main thread (CLI only; a library leaves them alone)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def pending_signal() -> int | None:
    """The signal postponed by ``deferred_signals`` (None if none arrived)."""
    return _pending


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Postpone SIGINT/SIGTERM over a critical section; raise Interrupted at its end if one came.
    A second signal inside the section raises at once."""
    global _defer_depth, _pending
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
    if _defer_depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


def take_pending() -> int | None:
    """Clear and return the postponed signal (the caller raises Interrupted itself)."""
    global _pending
    signum, _pending = _pending, None
    return signum


# ------------------------------------------------------------------------------------------------
# Exclusive, durable commit
# ------------------------------------------------------------------------------------------------
def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_hold() -> None:
    """The test hook (HOLD_ENV): called by writers just before ``commit_file``, outside deferral."""
    gate = os.environ.get(HOLD_ENV)
    if not gate:
        return
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EACCES}


def exists_error(path: Path) -> OutputError:
    return OutputError(f"{path}: already exists (use --force to overwrite)")


def commit_file(tmp: Path, final: Path, force: bool) -> None:
    """Put the finished temporary ``tmp`` (already fsynced by its writer) at ``final``.

    Without ``force`` this fails with the "already exists" OutputError if ``final`` appeared while
    we were writing; the temporary is left for the caller to remove."""
    if force:
        os.replace(tmp, final)
    else:
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise exists_error(final) from None
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            # no hard links here: claim the name atomically, then rename over our own claim
            try:
                os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                raise exists_error(final) from None
            os.replace(tmp, final)
        else:
            os.unlink(tmp)
    fsync_dir(final.parent)


# ------------------------------------------------------------------------------------------------
# Where outputs may go, and what a failed write is
# ------------------------------------------------------------------------------------------------
# Errors that only writing produces: a full disk or quota, a file-size limit, a read-only filesystem.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def cannot_write(path: Path, exc: OSError) -> OutputError:
    """The one-line error (exit 6) for an output that could not be written."""
    return OutputError(f"{path}: cannot write: {exc.strerror or exc}")


class Transaction:
    """The context-manager half of an output writer (a checkpoint file, a Hugging Face directory):
    a with-block that fails aborts the writer (its temporaries removed, nothing at ``path``) unless
    it had finished, and a write error (a full disk, a quota) leaves it as one line naming ``path``."""

    path: Path
    _done: bool

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and not self._done:
            self.abort()
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise cannot_write(self.path, exc) from None


def check_output_parent(path: Path) -> None:
    """Refuse an output whose parent directory is missing (exit 6), before any work: a typo in a
    path is reported, never created. ``path`` is an output file (``-o FILE``) or a directory that
    tvedit creates itself (``--out-dir DIR``, a Hugging Face directory, a study directory)."""
    parent = path.parent
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"{path}: directory {parent} {state} (tvedit creates no missing parent directories)")


def make_output_dir(directory: Path) -> None:
    """Create ``directory`` (an --out-dir) if it is missing; never its parents (exit 6 instead)."""
    if directory.is_dir():
        return
    try:
        directory.mkdir()
    except FileExistsError:
        if not directory.is_dir():
            raise OutputError(f"{directory}: is not a directory") from None
    except FileNotFoundError:
        raise OutputError(f"{directory}: directory {directory.parent} does not exist (tvedit creates no missing parent directories)") from None
    except OSError as exc:
        raise OutputError(f"{directory}: cannot create directory: {exc.strerror or exc}") from None


def report_interrupt(exc: BaseException) -> int:
    """The one stderr line for an interrupted command; returns the exit code."""
    if isinstance(exc, Interrupted):
        code, name, detail = exc.exit_code, exc.name, exc.detail
    else:
        code, name, detail = 130, "SIGINT", None
    sys.stderr.write(f"interrupted ({name}): {detail or 'unfinished output removed'}\n")
    sys.stderr.flush()
    return code
