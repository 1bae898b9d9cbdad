"""What every command shares: error handling, output mode, progress, reporting."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

from tvedit.checks import number_problem
from tvedit.errors import TveditError, UsageError
from tvedit.safeio import Interrupted

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)

JSON_HELP = "Print one JSON line per artifact (the default when standard output is not a terminal)."
FORCE_HELP = "Overwrite an existing output file (never an input)."
OUT_HELP = "Output file (one output only); its directory must exist."
OUT_DIR_HELP = "Directory for the outputs, named INPUT.SUFFIX.safetensors (created if missing; its parent must exist)."

MISMATCH_HELP = (
    "Let inputs disagree on these checks, comma-separated: base (theta0 hashes), regime (linearized"
    " vs non-linear), family (model families). Recorded in the output's manifest. --force does not do this."
)


_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")  # ANSI CSI sequences and two-byte escapes


def one_line(message: str) -> str:
    """``message`` as one printable line: escape sequences dropped (e.g. the bold in torch's pickle
    refusal), line breaks and runs of blanks made one space."""
    text = _ESCAPES.sub("", message)
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def print_error(message: str) -> None:
    """``error: MESSAGE`` as exactly one line on stderr; colour only when stderr is a terminal."""
    line = one_line(message)
    if sys.stderr.isatty():
        from rich.text import Text

        err_console.print(Text.assemble(("error:", "bold red"), " ", line), highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(f"error: {line}\n")
        sys.stderr.flush()


# The argument parser's errors: typer's own copy of click's exceptions (typer >= 0.2x) or click's.
PARSER_ERRORS: tuple[type[Exception], ...] = (getattr(typer, "TyperException", typer.BadParameter.__mro__[2]),)


def usage_error_line(exc: Exception) -> str:
    """The one line for an error the argument parser found (a bad value, a missing option or
    argument, an unknown option or command), pointing at the command's --help."""
    param = getattr(exc, "param", None)
    if isinstance(exc, typer.BadParameter) and type(exc).__name__ != "MissingParameter" and param is not None:
        name = max(param.opts, key=len) if param.opts else (param.human_readable_name or "")
        message = f"{name}: {exc.message}"
    else:
        message = exc.format_message()  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    return f"{one_line(message)} ({ctx.command_path} --help)" if ctx is not None else one_line(message)


def FINITE(value: Any) -> float:  # noqa: N802 - used as a type: typer.Option(..., parser=FINITE)
    """The parser of every float option: NaN and infinities are refused while the command line is
    parsed (exit 2 before any file is read)."""
    problem = number_problem(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return float(value)


def guard(fn: F) -> F:
    """Turn TveditError into a one-line message on stderr and its documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)  # its value is dropped: main() reads an int result as the exit code
        except TveditError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except (KeyboardInterrupt, Interrupted) as exc:
            from tvedit.safeio import report_interrupt

            raise typer.Exit(report_interrupt(exc)) from None
        except BrokenPipeError:
            raise typer.Exit(pipe_closed()) from None
        finally:
            release_intermediates()

    return wrapper  # type: ignore[return-value]


def release_intermediates() -> None:
    """Every exit path of a command: remove the intermediates it holds and did not hand on (the
    ephemeral inputs it read, the ones it wrote whose JSON lines did not reach the next command)."""
    from tvedit.safeio import deferred_signals, release

    with deferred_signals():
        release()


def pipe_closed() -> int:
    """Standard output was closed by the next command (it failed, or exited without reading): the
    intermediates written for it are removed; one line on stderr; exit PIPE_CLOSED (141)."""
    import os

    from tvedit.errors import PIPE_CLOSED
    from tvedit.safeio import held

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    n = len(held())
    what = f"; removed {n} intermediate{'s' if n != 1 else ''} written for it" if n else ""
    sys.stderr.write(f"error: standard output was closed by the next command{what}\n")
    sys.stderr.flush()
    return PIPE_CLOSED


def lazy_help(factory: Callable[[], str]) -> Any:
    """A command class whose long help is built only when shown (it may import torch-heavy tables)."""
    from typer.core import TyperCommand

    class LazyHelpCommand(TyperCommand):
        _text: str | None = None

        @property  # type: ignore[override]
        def help(self) -> str | None:
            if self._text is None:
                self._text = factory()
            return self._text

        @help.setter
        def help(self, value: str | None) -> None:
            self._text = value

    return LazyHelpCommand


def piped() -> bool:
    return not sys.stdout.isatty()


def json_mode(flag: bool) -> bool:
    return flag or piped()


def parse_dtype_option(value: str | None):  # -> torch.dtype | None
    if value is None:
        return None
    from tvedit.encodings import parse_dtype

    try:
        return parse_dtype(value)
    except ValueError as exc:
        raise UsageError(f"--dtype: {exc}") from None


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int, str], None] | None]:
    """A rich progress bar on stderr (only when stderr is a terminal)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[key]}", style="dim"), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(description, total=None, key="")

        def update(done: int, total: int, key: str) -> None:
            bar.update(task, completed=done, total=total, key=key[-48:])

        yield update


def report(artifacts: Sequence[Any], as_json: bool, title: str = "wrote") -> None:
    """JSON lines for scripts, a short table for people."""
    if as_json:
        from tvedit.safeio import deferred_signals, hand_on

        with deferred_signals():  # a line that was printed is always handed on
            for a in artifacts:
                sys.stdout.write(a.to_json() + "\n")
            sys.stdout.flush()  # a closed pipe raises here (guard: exit 141, the intermediates removed)
            hand_on(a.path for a in artifacts if a.ephemeral)  # the next command holds them now
        return
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for col in ("path", "kind", "regime", "density", "sha256"):
        table.add_column(col)
    for a in artifacts:
        m = a.manifest
        density = "" if m.density is None else f"{m.density:.4g}"
        table.add_row(str(a.path), m.kind, m.regime, density, a.sha256[:12])
    Console().print(table)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()  # a closed pipe fails inside the command (guard), not at exit
