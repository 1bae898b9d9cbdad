"""tvedit evaluate: accuracy, the addition / negation / disentanglement protocols, gates, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from tvedit.checks import number_problem
from tvedit.cli.common import FINITE, FORCE_HELP, JSON_HELP, guard, json_mode, progress_bar
from tvedit.errors import OutputError, UsageError
from tvedit.evaluate import XI_GRID_SIZE, XI_POINTS
from tvedit.safeio import check_output_parent

PROTOCOLS = ("none", "addition", "negation", "disentanglement")


def _grid(spec: str, what: str) -> tuple[float, float, float]:
    if any(number_problem(x) is not None for x in spec.split(":")):
        raise UsageError(f"{what} expects START:STOP[:STEP] finite numbers, not {spec!r}")
    parts = [float(x) for x in spec.split(":")]
    if len(parts) == 2:
        parts.append(0.05)
    if len(parts) != 3:
        raise UsageError(f"{what} expects START:STOP[:STEP], not {spec!r}")
    return parts[0], parts[1], parts[2]


def _thresholds(min_accuracy: list[str], gate: Path | None) -> dict[str, float]:
    from tvedit.evaluate.protocols import parse_thresholds

    items = list(min_accuracy)
    if gate is not None:
        import yaml

        try:
            data = yaml.safe_load(gate.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--gate {gate}: not a readable YAML mapping: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("min_accuracy"), dict):
            data = data["min_accuracy"]
        if not isinstance(data, dict):
            raise UsageError(f"--gate {gate}: expected a mapping NAME: MIN_ACCURACY")
        items = [f"{k}={v}" for k, v in data.items()] + items  # command-line values win
    return parse_thresholds(items)


def _ceilings(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            out[name] = float("nan")
        if not sep or not name or not out[name] >= 1:
            raise UsageError(f"--max-perplexity expects NAME=VALUE with VALUE >= 1, not {item!r}")
    return out


def _write_report(path: Path | None, data: dict[str, Any], force: bool) -> None:
    if path is None:
        return
    if path.exists() and not force:
        raise OutputError(f"{path}: exists (use --force)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _lines(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")
    sys.stdout.flush()


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c, justify="left" if c in ("task", "target") else "right")
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)


def _protocol_rows(
    report: dict[str, Any],
) -> tuple[str, list[str], list[list[Any]], list[dict[str, Any]]]:
    """(title, columns, table rows, JSON-line records) for a protocol report."""
    p = report["protocol"]
    if p == "addition":
        cols = ["task", "zero-shot", "fine-tuned", "merged", "normalised", "gain"]
        recs = [
            {"protocol": p, "task": t, "alpha": report["alpha"], "zero_shot": report["zero_shot"][t], "single": report["single"][t],
             "accuracy": report["merged"][t], "normalized": report["normalized"][t]}
            for t in report["tasks"]
        ]  # fmt: skip
        rows = [
            [
                r["task"],
                r["zero_shot"],
                r["single"],
                r["accuracy"],
                r["normalized"],
                r["accuracy"] - r["zero_shot"],
            ]
            for r in recs
        ]
        m = report["mean"]
        rows.append(["mean", m["zero_shot"], m["single"], m["merged"], m["normalized"], m["gain"]])
        title = f"task addition: alpha = {report['alpha']:g} (chosen on validation){' under f_lin' if report['linear'] else ''}"
        return title, cols, rows, recs
    if p == "negation":
        cols = [
            "target",
            "alpha",
            "zero-shot",
            "fine-tuned",
            "target after",
            f"control ({report['control']})",
        ]
        recs = [{"protocol": p, "task": r["target"], **r} for r in report["targets"]]
        rows = [
            [
                r["target"],
                f"{r['alpha']:g}" + ("" if r["feasible"] else "*"),
                r["target_zero_shot"],
                r["target_finetuned"],
                r["target_test"],
                r["control_test"],
            ]
            for r in report["targets"]
        ]
        m = report["mean"]
        rows.append(["mean", "", m["target_zero_shot"], "", m["target_test"], m["control_test"]])
        title = f"task negation: control {report['control']} zero-shot {report['control_zero_shot']:.4f}, kept >= {report['threshold']:g}x{' under f_lin' if report['linear'] else ''}"
        return title, cols, rows, recs
    raise AssertionError(p)


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def evaluate(
        inputs: list[str] = typer.Argument(
            None,
            help="A checkpoint, or task vectors / fine-tuned checkpoints applied to theta0 (--base).",
        ),
        task: list[str] = typer.Option(
            [],
            "--task",
            "-t",
            help="NAME=DIR: a task's data (DIR/train + DIR/test image folders, or a text task). Repeatable.",
        ),
        base: Path | None = typer.Option(
            None, "--base", "-b", help="theta0 (default: the base recorded in the vectors)."
        ),
        alpha: list[float] = typer.Option(
            [], "--alpha", "-a", help="Coefficient of the summed vectors; repeatable (default 1).", parser=FINITE
        ),
        protocol: str = typer.Option(
            "none", "--protocol", "-p", help="none | addition | negation | disentanglement."
        ),
        control: str | None = typer.Option(
            None, "--control", help="Negation: NAME=DIR of the control task."
        ),
        threshold: float = typer.Option(
            0.95, "--threshold", help="Negation: keep control accuracy >= this x theta0's.", parser=FINITE
        ),
        grid: str = typer.Option(
            "0:1:0.05",
            "--grid",
            help="Addition/negation alpha grid START:STOP:STEP (x 1/density for sparse vectors).",
        ),
        merged: Path | None = typer.Option(
            None,
            "--merged",
            help="Addition: a merged vector (tvedit add --method M --emit vector) to scale by alpha instead of the plain sum; the inputs (one vector per task) give the single-task accuracies.",
        ),
        no_widen: bool = typer.Option(
            False, "--no-widen", help="Do not widen the alpha grid by 1/density for sparse vectors."
        ),
        grid_range: str = typer.Option(
            "-3:3", "--grid-range", help="Disentanglement: LO:HI of both axes."
        ),
        grid_size: int = typer.Option(XI_GRID_SIZE, "--grid-size", help="Disentanglement: points per axis."),
        points: int = typer.Option(XI_POINTS, "--points", help="Disentanglement: test points per task."),
        linearize: bool = typer.Option(
            False,
            "--linearize",
            help="Evaluate non-linear vectors under f_lin around theta0 (post-hoc linearization).",
        ),
        max_examples: int | None = typer.Option(
            None, "--max-examples", help="Cap each split at N examples (seeded subset)."
        ),
        batch_size: int = typer.Option(512, "--batch-size", help="Evaluation batch size."),
        device: str = typer.Option(
            "auto", "--device", help="auto (CUDA when present, with bf16 autocast), cpu, cuda, cuda:N."
        ),
        bf16: bool = typer.Option(
            True,
            "--bf16/--no-bf16",
            help="On CUDA, run the forward passes under bf16 autocast (default; the jvps of f_lin stay float32). --no-bf16: float32 throughout.",
        ),
        min_accuracy: list[str] = typer.Option(
            [],
            "--min-accuracy",
            help="NAME=FRACTION: fail (exit 7) when a task's accuracy is lower. Repeatable.",
        ),
        gate: Path | None = typer.Option(
            None, "--gate", help="YAML mapping NAME: FRACTION of --min-accuracy thresholds."
        ),
        metric: str = typer.Option(
            "acc",
            "--metric",
            help="acc | acc_norm (causal LMs: log-likelihood per character of the choice) | perplexity (causal LMs: plain-text tasks).",
        ),
        max_perplexity: list[str] = typer.Option(
            [],
            "--max-perplexity",
            help="NAME=VALUE: fail (exit 7) when a task's perplexity is higher (--metric perplexity). Repeatable.",
        ),
        mask_plot: Path | None = typer.Option(
            None,
            "--mask-plot",
            help="Plot where a mask's kept entries sit, layer by layer (to -o); no evaluation.",
        ),
        output: Path | None = typer.Option(
            None,
            "--output",
            "-o",
            help="Figure file (PNG): the disentanglement heatmap or the mask plot.",
        ),
        report_path: Path | None = typer.Option(
            None, "--report", help="Write the full results as JSON."
        ),
        allow_mismatch: str | None = typer.Option(
            None,
            "--allow-mismatch",
            help="base: accept task vectors extracted from another base than the one evaluated; regime: evaluate"
            " linearized vectors trained under another definition of f_lin (with a warning). Recorded in --report."
            " --force does not do this.",
        ),
        force: bool = typer.Option(False, "--force", "-f", help=FORCE_HELP),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        """Accuracy of a checkpoint or of theta0 + alpha * sum(vectors) on each task's test split, and the
        task-addition, task-negation and weight-disentanglement protocols (docs/evaluate.md)."""
        from tvedit.engine import parse_mismatch

        allowed = parse_mismatch(allow_mismatch)
        if allowed - {"base", "regime"}:
            raise UsageError(f"--allow-mismatch: evaluate checks only base and regime, not {sorted(allowed - {'base', 'regime'})[0]!r}")
        recorded = {"allow_mismatch": sorted(allowed)} if allowed else {}
        for path in (output, report_path):  # a missing parent directory is a typo: exit 6 before any work
            if path is not None:
                check_output_parent(path)
        if mask_plot is not None:
            return _mask_plot(mask_plot, output, report_path, force, json_mode(as_json))
        if protocol not in PROTOCOLS:
            raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        if protocol != "none" and alpha:
            raise UsageError(
                "--alpha is for plain evaluation; the protocols search a grid (--grid)"
            )
        if protocol == "negation" and control is None:
            raise UsageError("--protocol negation needs --control NAME=DIR")
        if control is not None and protocol != "negation":
            raise UsageError("--control is only for --protocol negation")
        if not 0 < threshold <= 1:
            raise UsageError(f"--threshold must be in (0, 1], not {threshold}")
        if merged is not None and protocol != "addition":
            raise UsageError("--merged is for --protocol addition")
        thresholds = _thresholds(min_accuracy, gate)
        ceilings = _ceilings(max_perplexity)
        if metric == "perplexity" and (protocol != "none" or thresholds):
            raise UsageError("--metric perplexity is for plain evaluation, gated by --max-perplexity (not --min-accuracy or a protocol)")
        if ceilings and metric != "perplexity":
            raise UsageError("--max-perplexity needs --metric perplexity")
        if thresholds and protocol in ("negation", "disentanglement"):
            raise UsageError(
                "--min-accuracy / --gate apply to plain evaluation and --protocol addition"
            )
        if output is not None and protocol != "disentanglement":
            raise UsageError(
                "-o/--output is the figure of --protocol disentanglement or --mask-plot"
            )
        for path in (output, report_path):
            if path is not None and path.exists() and not force:
                raise OutputError(f"{path}: exists (use --force)")

        from tvedit.evaluate import open_session, studies
        from tvedit.evaluate import protocols as P
        from tvedit.evaluate.data import parse_task_args
        from tvedit.models.base import pick_device

        pick_device(device)  # a usage error before anything is read

        tasks = parse_task_args(task)
        control_name = None
        if control is not None:
            ((control_name, control_dir),) = parse_task_args([control]).items()
            if control_name in tasks:
                raise UsageError(f"--control {control_name!r} is also a --task")
            tasks[control_name] = control_dir
        if protocol == "disentanglement":
            lo, hi, _ = _grid(grid_range + ":1", "--grid-range")
        elif protocol != "none":
            start, stop, step = _grid(grid, "--grid")
        with progress_bar(f"evaluate ({protocol})" if protocol != "none" else "evaluate") as bar:
            if bar is not None:
                bar(0, None, "loading theta0, vectors and tasks")  # type: ignore[arg-type]
            session = open_session(
                [*(inputs or []), *([merged] if merged is not None else [])],
                tasks,
                base,
                linearize=linearize,
                max_examples=max_examples,
                batch_size=batch_size,
                allow_base_mismatch="base" in allowed,
                allow_flin_mismatch="regime" in allowed,
                device=device,
                bf16=bf16,
                metric=metric,
            )
            session.ev.progress = bar  # type: ignore[assignment]
            if metric == "perplexity":
                rows = studies.perplexity(session, alpha or [1.0])
            elif protocol == "none":
                rows = studies.plain(session, alpha or [1.0])
            elif protocol == "disentanglement":
                report = studies.disentanglement(session, P.square_grid(lo, hi, grid_size), points)
            else:
                widen = 1.0 if no_widen or merged is not None else studies.widen(session)
                alphas = P.alpha_grid(start, stop, step, density=1.0 / widen if widen != 1.0 else None)
                if protocol == "addition":
                    report = studies.addition(session, alphas, merged=None if merged is None else len(session.vectors) - 1)
                else:
                    assert control_name is not None
                    report = studies.negation(session, control_name, alphas, threshold)
                report["widen"] = widen
                report["bf16"] = session.ev.autocast
            session.ev.progress = None
        as_json = json_mode(as_json)
        if metric == "perplexity":
            if as_json:
                _lines(rows)
            else:
                _table("perplexity (test)", ["task", "alpha", "perplexity", "tokens"], [[r["task"], f"{r['alpha']:g}", r["perplexity"], r["tokens"]] for r in rows])
            _write_report(report_path, {"protocol": "none", "metric": "perplexity", "results": rows}, force)
            worst: dict[str, float] = {}
            for r in rows:  # a task passes only if it passes at every alpha
                worst[r["task"]] = max(worst.get(r["task"], 0.0), r["perplexity"])
            P.check_ceilings(worst, ceilings)
            return
        if protocol == "none":
            report = {"protocol": "none", "linear": session.linear, "bf16": session.ev.autocast, "results": rows}
            if as_json:
                _lines(rows)
            else:
                _table(
                    "accuracy (test)" + (" under f_lin" if session.linear else ""),
                    ["task", "alpha", "accuracy", "n"],
                    [[r["task"], f"{r['alpha']:g}", r["accuracy"], r["n"]] for r in rows],
                )
            _write_report(report_path, {**report, **recorded}, force)
            worst: dict[str, float] = {}
            for r in rows:  # a task passes only if it passes at every alpha
                worst[r["task"]] = min(worst.get(r["task"], 1.0), r["accuracy"])
            P.check_gates(worst, thresholds)
            return
        if protocol == "disentanglement":
            xi = report["xi"]
            summary = {
                "protocol": "disentanglement",
                "tasks": report["tasks"],
                "grid_size": grid_size,
                "range": [lo, hi],
                "xi_mean": sum(map(sum, xi)) / grid_size**2,
                "xi_max": max(map(max, xi)),
                "linear": session.linear, "bf16": session.ev.autocast,
            }
            if output is not None:
                from tvedit.evaluate.plots import heatmap

                heatmap(
                    xi,
                    report["grid"],
                    report["tasks"],
                    output,
                    title=f"weight disentanglement{' (f_lin)' if session.linear else ''}",
                )
                summary["figure"] = str(output)
            if as_json:
                _lines([summary])
            else:
                _table(
                    "weight disentanglement error",
                    ["tasks", "mean ξ", "max ξ", "figure"],
                    [
                        [
                            " + ".join(report["tasks"]),
                            summary["xi_mean"],
                            summary["xi_max"],
                            str(output or "-"),
                        ]
                    ],
                )
            _write_report(report_path, {**report, **recorded}, force)
            return
        title, cols, rows, recs = _protocol_rows(report)
        if as_json:
            _lines(recs)
        else:
            _table(title, cols, rows)
        _write_report(report_path, {**report, **recorded}, force)
        if protocol == "addition":
            P.check_gates(report["merged"], thresholds)


def _mask_plot(
    mask: Path, output: Path | None, report_path: Path | None, force: bool, as_json: bool
) -> None:
    import torch

    from tvedit.evaluate.plots import mask_figure, mask_layer_stats
    from tvedit.reader import open_checkpoint

    if output is None:
        raise UsageError("--mask-plot needs -o FIGURE.png")
    if output.exists() and not force:
        raise OutputError(f"{output}: exists (use --force)")
    ckpt = open_checkpoint(mask)
    items = ((k, t != 0) for k, t in ckpt.items() if t.dtype == torch.bool or t.is_floating_point())
    stats = mask_layer_stats(items)
    mask_figure(stats, output, title=f"{mask.name}: kept entries by layer")
    _write_report(report_path, {"mask": str(mask), "layers": stats}, force)
    kept = sum(s["kept"] for s in stats)
    total = sum(s["total"] for s in stats)
    summary = {
        "mask": str(mask),
        "figure": str(output),
        "kept": kept,
        "total": total,
        "density": kept / total if total else 0.0,
    }
    if as_json:
        _lines([summary])
    else:
        _table(
            "mask", ["mask", "density", "figure"], [[str(mask), summary["density"], str(output)]]
        )
