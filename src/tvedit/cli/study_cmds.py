"""tvedit study: the regime comparison (fine-tune every regime, add, negate, merge, evaluate) from a YAML plan."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from tvedit.checks import number_problem
from tvedit.cli.common import JSON_HELP, err_console, guard, json_mode
from tvedit.errors import UsageError
from tvedit.safeio import check_output_parent


def _seeds(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        seeds = [int(s) for s in spec.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--seeds expects integers like 0,1,2, not {spec!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds expects integers >= 0, not {spec!r}")
    return seeds


def _lrs(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        regime, sep, value = item.partition("=")
        if not sep or number_problem(value) is not None or float(value) <= 0:
            raise UsageError(f"--lr expects REGIME=LR with a positive finite LR, not {item!r}")
        out[regime] = float(value)
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def study(
        plan_path: Path = typer.Argument(..., metavar="PLAN", help="The study plan (YAML): theta0, tasks, seeds, regimes with lr grids, negation, disentanglement, merges; or a scale sweep (docs/study.md)."),
        output: Path = typer.Option(..., "--output", "-o", help="Output directory: study.json, results.md, study.png, runs/, reports/ (existing runs are reused)."),
        seeds: str | None = typer.Option(None, "--seeds", help="Fine-tuning seeds, e.g. 0,1,2 (overrides the plan's)."),
        lr: list[str] = typer.Option([], "--lr", help="REGIME=LR: fix a regime's learning rate (skips its grid search). Repeatable."),
        jobs: int | None = typer.Option(None, "--jobs", "-j", help="Commands run side by side (default: the plan's, 2)."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N, auto (default: the plan's)."),
        axis: list[str] = typer.Option([], "--axis", help="A sweep plan's axis to run (by name); repeatable; default: every axis. sweep.json gathers every finished point."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check the plan and print the commands; run nothing."),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """The papers' comparison on your theta0 and tasks: every fine-tuning regime (lr chosen on validation), task addition, negation, disentanglement and post-hoc merges, with a table, JSON and a figure."""
        check_output_parent(output)
        import json
        import sys

        from tvedit.study import Study, load_plan

        if jobs is not None and jobs < 1:
            raise UsageError(f"--jobs must be >= 1, not {jobs}")
        plan = load_plan(plan_path, seeds=_seeds(seeds), lrs=_lrs(lr), jobs=jobs, device=device)
        if device is not None:
            from tvedit.models.base import pick_device

            pick_device(device)
        quiet = json_mode(as_json)
        say = lambda msg: err_console.print(msg, highlight=False)  # noqa: E731 - stderr: never mixed with JSON
        if axis and not plan.sweep:
            raise UsageError(f"--axis {axis[0]}: {plan_path} has no sweep section")
        if plan.sweep:
            from tvedit.study import Sweep, point_label, point_plan

            sweep = Sweep(plan, output, progress=say, run_command=functools.partial(run_in_process, app), only=axis)
            if dry_run:
                for ax in sweep.axes:
                    for value in ax.values:
                        point, done = point_plan(plan, ax, value), sweep.source(ax, value)
                        state = f"; done: {done / 'study.json'}" if done else ""
                        sys.stdout.write(f"# {ax.name}: {ax.vary}={point_label(ax, value)} -> {sweep.point_dir(ax, value)} (regimes {', '.join(point.regimes)}{state})\n")
                return
            result = sweep.run()
            if quiet:
                sys.stdout.write(json.dumps({"sweep": str(output / "sweep.json"), "axes": [a["name"] for a in result["axes"]]}) + "\n")
            else:
                err_console.print(f"sweep written to {output}/ (sweep.json, sweep.png; one study per point under sweep/)")
            return
        s = Study(plan, output, progress=say, run_command=functools.partial(run_in_process, app))
        if dry_run:
            first = plan.seeds[0]
            steps = [s.init_step()] + [s.finetune_step(r, x, first, t) for r in plan.regimes for x in plan.lrs(r) for t in plan.tasks]
            for step in steps:
                sys.stdout.write("tvedit " + " ".join(step.args) + "\n")
            sys.stdout.write(f"# then: addition per lr, lr choice, seeds {plan.seeds[1:]}, negation, disentanglement, merges\n")
            return
        result = s.run()
        if quiet:
            summary = {name: {"addition": r["addition"], **({"negation": r["negation"]} if "negation" in r else {})} for name, r in result["rows"].items()}
            sys.stdout.write(json.dumps({"study": str(output / "study.json"), "rows": summary}, sort_keys=True) + "\n")
        else:
            from rich.console import Console
            from rich.markdown import Markdown

            Console().print(Markdown((output / "results.md").read_text()))
            err_console.print(f"study written to {output}/ (study.json, results.md, study.png)")


def run_in_process(app: typer.Typer, args: Sequence[str], log: Any) -> int:
    """Run one tvedit command in this process (a study with jobs = 1: no interpreter start, no torch
    import per command), its output to ``log``; returns its exit code (study.RunCommand)."""
    import contextlib

    from tvedit.cli.common import PARSER_ERRORS, print_error, usage_error_line

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rc = app(list(args), standalone_mode=False)
        except PARSER_ERRORS as exc:  # bad command line: the one line main() prints, exit 2
            print_error(usage_error_line(exc))
            rc = getattr(exc, "exit_code", 2)
        except SystemExit as exc:  # pragma: no cover - typer may still exit
            rc = exc.code
    return int(rc or 0)
