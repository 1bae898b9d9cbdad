"""The ``tvedit`` application: registers each command module and maps errors to exit codes."""

from __future__ import annotations

import importlib

import typer

from tvedit.errors import EXIT_CODES
from tvedit.version import __version__

# One line per command module; each module has register(app).
COMMAND_MODULES = (
    "tvedit.cli.arith_cmds",
    "tvedit.cli.info_cmds",
    "tvedit.cli.finetune_cmds",
    "tvedit.cli.text_cmds",
    "tvedit.cli.mask_cmds",
    "tvedit.cli.evaluate_cmds",
    "tvedit.cli.study_cmds",
    "tvedit.cli.compress_cmds",
)

EPILOG = "Exit codes: " + "; ".join(f"{c} {d.split(':')[0].split(' (')[0]}" for c, d in EXIT_CODES.items()) + "."

app = typer.Typer(
    name="tvedit",
    help="Task-vector editing of model checkpoints: fine-tune, extract, add, negate, scale, mask, evaluate.\n\n"
    "Commands chain through pipes: when standard output is not a terminal each command prints one JSON line per "
    "file it wrote, and any input argument '-' reads those lines.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tvedit {__version__}")
        raise typer.Exit()


# The commands that stream tensors through short element-wise passes (one per chunk of a huge
# tensor). Between two passes OpenMP's default wait policy keeps torch's threads spinning, which on a
# busy machine takes the cores from whatever else runs: measured on the 2-core VM beside a study,
# `add` of two 512 MiB vectors in 2 MiB chunks used 9.2-13.0 s of CPU and 11.9-14.9 s of wall time
# by default, 5.1-5.4 s and 6.7-7.7 s with OMP_WAIT_POLICY=PASSIVE (as fast as whole tensors). So these
# run with the passive policy unless the user set one; training and evaluation keep the default.
STREAMING_COMMANDS = frozenset({"extract", "add", "scale", "negate", "mask", "compress", "info", "import", "export-hf", "export-lora"})


@app.callback()
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    """tvedit."""
    import os

    if ctx.invoked_subcommand in STREAMING_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch (libgomp) is loaded: after this


@app.command()
def completions(shell: str = typer.Argument(..., help="bash, zsh or fish")) -> None:
    """Print a static completion script (also shipped in completions/)."""
    from tvedit.cli.completion import GENERATORS

    if shell not in GENERATORS:
        typer.echo(f"error: unknown shell {shell!r}; choose bash, zsh or fish", err=True)
        raise typer.Exit(2)
    typer.echo(GENERATORS[shell](typer.main.get_command(app)), nl=False)  # type: ignore[arg-type]


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Run the CLI. Errors the argument parser finds (a bad or missing value, an unknown option or
    command) are one line on stderr and exit 2, like every other usage error (no boxed panel)."""
    import sys

    from tvedit.cli.common import PARSER_ERRORS, print_error, usage_error_line
    from tvedit.safeio import Interrupted, install_signal_handlers, report_interrupt

    install_signal_handlers()
    try:
        try:
            rv = app(standalone_mode=False)
        except PARSER_ERRORS as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # plain `tvedit` printed its help
                print_error(usage_error_line(exc))
            code = getattr(exc, "exit_code", 2)
            _drain_input(code)
            sys.exit(code)
        except typer.Abort:
            print_error("aborted")
            _drain_input(1)
            sys.exit(1)
        except SystemExit as exc:
            _drain_input(exc.code)
            raise
        code = rv if isinstance(rv, int) else 0
        _drain_input(code)
        sys.exit(code)
    except Interrupted as exc:  # outside a command (while parsing or importing)
        code = report_interrupt(exc)
        _drain_input(code)
        sys.exit(code)


def _drain_input(code: object) -> None:
    """A consumer that failed or was interrupted before it read all of its '-' input removes the
    intermediates listed there: after an error it waits for them, after a signal only what arrived."""
    import sys

    from tvedit.errors import PIPE_CLOSED

    if isinstance(code, int) and code not in (0, PIPE_CLOSED) and "-" in sys.argv[2:]:
        from tvedit.pipeline import drain_stdin

        drain_stdin(wait=code < 128)
