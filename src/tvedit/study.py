"""The regime study: the papers' comparison as one plan (``tvedit study PLAN.yaml -o OUT``).

One theta0, one set of tasks and seeds; for every fine-tuning regime (full, attn, linearized,
sparse) a learning rate chosen on validation from a small grid, then task vectors for every task
and seed, task addition, task negation and weight disentanglement; post-hoc merges (TIES,
DARE-TIES, TALL consensus, ... any ``tvedit add --method``) of one regime's vectors evaluated the
same way. Every number in the outputs comes from a ``tvedit evaluate --report`` JSON file written by
the run; this module only orchestrates commands and aggregates their reports.

Work is a list of ``tvedit`` commands run as subprocesses (``jobs`` at a time; single-threaded each
on CPU, which is several times faster than threads on a small machine), or one after the other in
this process when ``jobs`` is 1 (no interpreter start per command: the choice on one GPU). A command whose output
already exists is skipped, so an interrupted study resumes where it stopped and a second study can
reuse the first one's runs.

Outputs under OUT: ``study.json`` (plan, choices, per-seed and mean ± sd results, loss curves),
``results.md`` (the tables), ``study.png`` (figure), and ``runs/`` / ``reports/`` (every vector and
every evaluate report, named ``REGIME/lrLR/seedS/...``). Semantics: docs/study.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tvedit.errors import DataError, TveditError, UsageError
from tvedit.evaluate import XI_GRID_SIZE, XI_POINTS
from tvedit.safeio import Interrupted, replacing

REGIMES = ("full", "attn", "linearized", "sparse")
# how each regime's lr is chosen on the first seed's validation splits: the merged model's mean
# accuracy, the single tasks', negation (1 - the targets' mean accuracy after negation at their
# chosen alpha: TaLoS selects by negation), or both (the mean of the merged and negation scores)
SELECT_BY = ("merged", "single", "negation", "both")


class StudyError(TveditError):
    """A step of the study failed; carries the failed command's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    theta0: str  # a tvedit checkpoint, or an open_clip state dict (+ ``model``)
    tasks: dict[str, str]  # name -> data directory (train/ and test/)
    model: str | None = None  # open_clip model name / config JSON (when theta0 is a raw state dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    finetune: dict[str, Any] = field(default_factory=dict)  # options shared by every regime
    regimes: dict[str, dict[str, Any]] = field(default_factory=dict)  # regime -> options (lr: a list = grid)
    select: str = "merged"  # lr chosen by validation: merged | single | negation | both (SELECT_BY)
    label: str = ""  # a name for the plan's recipe, printed above its tables (e.g. "TaLoS recipe")
    sweep: list[dict[str, Any]] = field(default_factory=list)  # scale-sweep axes (tvedit.study.Sweep, docs/study.md)
    negation: dict[str, Any] = field(default_factory=dict)  # targets, control, threshold
    disentanglement: dict[str, Any] = field(default_factory=dict)  # tasks (2), grid_size, range, points
    merges: dict[str, Any] = field(default_factory=dict)  # vectors (a regime), methods {name: options}, grid
    evaluate: dict[str, Any] = field(default_factory=dict)  # grid, widen, max_examples, batch_size, bf16
    jobs: int = 2
    device: str = "cpu"

    def lrs(self, regime: str) -> list[float]:
        lr = self.regimes[regime].get("lr", self.finetune.get("lr", 1e-5))
        return [float(x) for x in (lr if isinstance(lr, list) else [lr])]

    def regime_options(self, regime: str) -> dict[str, Any]:
        """Fine-tuning options of one regime, without its lr."""
        return {k: v for k, v in {**self.finetune, **self.regimes[regime]}.items() if k != "lr"}


PLAN_KEYS = {f for f in Plan.__dataclass_fields__}


def load_plan(path: Path, seeds: Sequence[int] | None = None, lrs: dict[str, float] | None = None,
              jobs: int | None = None, device: str | None = None) -> Plan:
    """Read and check a plan; command-line overrides (seeds, fixed learning rates, jobs, device) win."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not a readable YAML plan: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a plan is a mapping (theta0, tasks, regimes, ...)")
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown plan key {unknown[0]!r} (known: {', '.join(sorted(PLAN_KEYS))})")
    for key in ("theta0", "tasks", "regimes"):
        if key not in data:
            raise UsageError(f"{path}: the plan needs {key!r}")
    try:
        plan = Plan(**data)
    except TypeError as exc:  # pragma: no cover - guarded by the key check
        raise UsageError(f"{path}: {exc}") from None
    if seeds is not None:
        plan.seeds = list(seeds)
    if jobs is not None:
        plan.jobs = jobs
    if device is not None:
        plan.device = device
    for regime, lr in (lrs or {}).items():
        if regime not in plan.regimes:
            raise UsageError(f"--lr {regime}={lr}: the plan has no regime {regime!r}")
        plan.regimes[regime] = {**plan.regimes[regime], "lr": float(lr)}
    check_plan(plan, path)
    if plan.sweep:
        sweep_axes(plan, path)
    return plan


def check_plan(plan: Plan, path: Path | str = "plan") -> Plan:
    if not isinstance(plan.tasks, dict) or len(plan.tasks) < 2:
        raise UsageError(f"{path}: tasks: at least two NAME: DIR entries")
    if not plan.regimes or not isinstance(plan.regimes, dict):
        raise UsageError(f"{path}: regimes: a mapping REGIME: options")
    for regime, options in plan.regimes.items():
        if regime not in REGIMES:
            raise UsageError(f"{path}: regimes: unknown regime {regime!r} (choose from {', '.join(REGIMES)})")
        if not isinstance(options, dict):
            raise UsageError(f"{path}: regimes.{regime}: a mapping of fine-tuning options")
        if "mode" in options:
            raise UsageError(f"{path}: regimes.{regime}: 'mode' is the regime's name")
        lrs = plan.lrs(regime)
        if not lrs or not all(x > 0 for x in lrs):
            raise UsageError(f"{path}: regimes.{regime}.lr: positive learning rates")
        for key, value in options.items():
            if key != "lr" and isinstance(value, list):
                raise UsageError(f"{path}: regimes.{regime}.{key}: only lr may be a grid (a list)")
    from tvedit.finetune.config import FinetuneConfig

    for regime in plan.regimes:  # every option a known fine-tuning option with a valid value
        try:
            FinetuneConfig.load(None, None, **{**plan.regime_options(regime), "mode": regime, "lr": plan.lrs(regime)[0]})
        except UsageError as exc:
            raise UsageError(f"{path}: regimes.{regime}: {exc}") from None
    if not plan.seeds or not all(isinstance(s, int) and s >= 0 for s in plan.seeds):
        raise UsageError(f"{path}: seeds: a list of integers >= 0")
    if plan.select not in SELECT_BY:
        raise UsageError(f"{path}: select: one of {', '.join(SELECT_BY)}, not {plan.select!r}")
    if plan.select in ("negation", "both") and not plan.negation:
        raise UsageError(f"{path}: select: {plan.select} chooses the lr by task negation, which needs a negation section")
    if not isinstance(plan.jobs, int) or plan.jobs < 1:
        raise UsageError(f"{path}: jobs: an integer >= 1")
    neg = plan.negation
    if neg:
        control = neg.get("control")
        if control not in plan.tasks:
            raise UsageError(f"{path}: negation.control: one of the tasks, not {control!r}")
        targets = neg.get("targets") or [t for t in plan.tasks if t != control]
        bad = [t for t in targets if t not in plan.tasks or t == control]
        if bad:
            raise UsageError(f"{path}: negation.targets: {bad[0]!r} is not a task other than the control")
        neg["targets"] = list(targets)
    dis = plan.disentanglement
    if dis:
        pair = dis.get("tasks") or []
        if len(pair) != 2 or not all(t in plan.tasks for t in pair):
            raise UsageError(f"{path}: disentanglement.tasks: two of the tasks")
    merges = plan.merges
    if merges:
        from tvedit.merging import METHODS, resolve_options

        if merges.get("vectors") not in plan.regimes:
            raise UsageError(f"{path}: merges.vectors: the regime whose vectors are merged, one of {', '.join(plan.regimes)}")
        methods = merges.get("methods") or {}
        if not isinstance(methods, dict) or not methods:
            raise UsageError(f"{path}: merges.methods: a mapping METHOD: options")
        for name, options in methods.items():
            if name not in METHODS:
                raise UsageError(f"{path}: merges.methods: unknown method {name!r} (tvedit add --method: {', '.join(sorted(METHODS))})")
            try:
                resolve_options(name, dict(options or {}))
            except UsageError as exc:
                raise UsageError(f"{path}: merges.methods.{name}: {exc}") from None
    return plan


# ------------------------------------------------------------------------------------------------
# running commands
# ------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One tvedit command; ``output`` exists when it is done (then it is skipped)."""

    args: list[str]
    output: Path
    label: str
    files: dict[Path, str] = field(default_factory=dict)  # written just before the command runs

    def done(self) -> bool:
        return self.output.exists()


Runner = Callable[[Sequence[Step]], None]
# Runs one tvedit command (its arguments) with its output to a log; returns its exit code. The CLI
# passes one that runs in this process (cli/study_cmds.run_in_process: no interpreter start and no
# torch import per command); without one, every command is a subprocess (``python -m tvedit``).
RunCommand = Callable[[Sequence[str], Any], int]


# a command's exit status when SIGINT or SIGTERM interrupted it: 128 + N from tvedit's handler, -N
# from a process the signal killed
_SIGNALLED = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM})


def _fmt(x: float) -> str:
    return f"{x:g}"


class Study:
    def __init__(self, plan: Plan, out: Path, progress: Callable[[str], None] | None = None, run_command: RunCommand | None = None):
        self.plan = plan
        self.run_command = run_command
        self.out = Path(out)
        self.say = progress or (lambda msg: None)
        self.theta0 = self.out / "theta0.safetensors"
        self.timings: dict[str, float] = {}

    # -- running --------------------------------------------------------------------------------
    def run_steps(self, steps: Sequence[Step], what: str) -> None:
        todo = [s for s in steps if not s.done()]
        if not todo:
            return
        self.say(f"{what}: {len(todo)} command(s), {self.plan.jobs} at a time")
        t0 = time.time()
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.plan.jobs > 1 and not self.plan.device.startswith("cuda"):
            env["OMP_NUM_THREADS"] = "1"  # threads spin-wait against each other on a small CPU

        in_process = self.plan.jobs == 1 and self.run_command is not None
        running: set[subprocess.Popen[bytes]] = set()
        lock = threading.Lock()
        stopping = threading.Event()

        def one(step: Step) -> tuple[Step, int, Path]:
            step.output.parent.mkdir(parents=True, exist_ok=True)
            for path, text in step.files.items():
                path.write_text(text)
            log = logs / (step.label.replace("/", "_") + ".log")
            with open(log, "w") as fh:
                if in_process:
                    assert self.run_command is not None
                    return step, self.run_command(step.args, fh), log
                with lock:
                    if stopping.is_set():
                        return step, -signal.SIGTERM, log
                    proc = subprocess.Popen([sys.executable, "-m", "tvedit", *step.args], stdout=fh, stderr=subprocess.STDOUT, env=env)
                    running.add(proc)
                try:
                    return step, proc.wait(), log
                finally:
                    with lock:
                        running.discard(proc)

        failed = None
        # in process: in this (the main) thread, so a signal interrupts the command itself
        pool = None if in_process else ThreadPoolExecutor(max_workers=self.plan.jobs)
        try:
            for step, rc, log in map(one, todo) if pool is None else pool.map(one, todo):
                if rc in _SIGNALLED:  # the command was interrupted, so is the study (its outputs are removed)
                    raise Interrupted(abs(rc) % 128)
                if rc != 0 and failed is None:
                    failed = (step, rc, log)
                elif rc == 0:
                    self.say(f"  done {step.label}")
        except BaseException:
            # SIGINT/SIGTERM (raised in this thread) or an error: no command is left running; each
            # one terminated removes its unfinished output, as it does when it is interrupted alone
            with lock:
                stopping.set()
                for proc in running:
                    proc.terminate()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if failed:
            step, rc, log = failed
            last = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
            raise StudyError(f"study step {step.label} failed (exit {rc}): {last[0]} (log: {log})", rc)
        self.timings[what] = self.timings.get(what, 0.0) + time.time() - t0

    # -- paths ----------------------------------------------------------------------------------
    def vector(self, regime: str, lr: float, seed: int, task: str) -> Path:
        return self.out / "runs" / regime / f"lr{_fmt(lr)}" / f"seed{seed}" / f"{task}.safetensors"

    def report(self, regime: str, lr: float | None, seed: int, name: str) -> Path:
        parts = [regime] + ([f"lr{_fmt(lr)}"] if lr is not None else []) + [f"seed{seed}", f"{name}.json"]
        return self.out.joinpath("reports", *parts)

    # -- commands -------------------------------------------------------------------------------
    def _task_args(self, tasks: Sequence[str]) -> list[str]:
        return [a for t in tasks for a in ("--task", f"{t}={self.plan.tasks[t]}")]

    def _eval_common(self) -> list[str]:
        ev = self.plan.evaluate
        args = ["--base", str(self.theta0), "--device", self.plan.device, "--json"]
        if ev.get("max_examples"):
            args += ["--max-examples", str(int(ev["max_examples"]))]
        if ev.get("batch_size"):
            args += ["--batch-size", str(int(ev["batch_size"]))]
        if ev.get("bf16") is False:  # bf16 autocast on CUDA is evaluate's default
            args.append("--no-bf16")
        return args

    def init_step(self) -> Step:
        args = ["init", "--pretrained", self.plan.theta0, "-o", str(self.theta0), "--json"]
        if self.plan.model:
            args[1:1] = ["--model", self.plan.model]
        return Step(args, self.theta0, "init")

    def finetune_step(self, regime: str, lr: float, seed: int, task: str) -> Step:
        out = self.vector(regime, lr, seed, task)
        args = ["finetune", "--pretrained", str(self.theta0), "--train", f"{self.plan.tasks[task]}/train",
                "--task", task, "--mode", regime, "--lr", repr(lr), "--seed", str(seed), "--emit", "vector",
                "--device", self.plan.device, "-o", str(out), "--json"]  # fmt: skip
        options = self.plan.regime_options(regime)
        files = {}
        if options:
            cfg = out.with_name(out.name.removesuffix(".safetensors") + ".config.json")
            files[cfg] = json.dumps(options, sort_keys=True) + "\n"
            args += ["--config", str(cfg)]
        return Step(args, out, f"finetune/{regime}/lr{_fmt(lr)}/seed{seed}/{task}", files)

    def _grid_args(self, regime: str) -> list[str]:
        ev = self.plan.evaluate
        args = ["--grid", str(ev.get("grid", "0:1:0.05"))]
        if regime == "sparse" and not ev.get("widen", True):
            args.append("--no-widen")
        return args

    def addition_step(self, regime: str, lr: float, seed: int) -> Step:
        out = self.report(regime, lr, seed, "addition")
        vectors = [str(self.vector(regime, lr, seed, t)) for t in self.plan.tasks]
        args = ["evaluate", *vectors, *self._task_args(list(self.plan.tasks)), "--protocol", "addition",
                *self._grid_args(regime), *self._eval_common(), "--report", str(out)]  # fmt: skip
        return Step(args, out, f"addition/{regime}/lr{_fmt(lr)}/seed{seed}")

    def negation_step(self, regime: str, lr: float, seed: int) -> Step:
        neg = self.plan.negation
        out = self.report(regime, lr, seed, "negation")
        targets = neg["targets"]
        control = neg["control"]
        vectors = [str(self.vector(regime, lr, seed, t)) for t in targets]
        args = ["evaluate", *vectors, *self._task_args(targets), "--control", f"{control}={self.plan.tasks[control]}",
                "--protocol", "negation", "--threshold", str(neg.get("threshold", 0.95)), *self._grid_args(regime),
                *self._eval_common(), "--report", str(out)]  # fmt: skip
        return Step(args, out, f"negation/{regime}/lr{_fmt(lr)}/seed{seed}")

    def xi_step(self, regime: str, lr: float, seed: int) -> Step:
        dis = self.plan.disentanglement
        out = self.report(regime, lr, seed, "disentanglement")
        pair = dis["tasks"]
        lo, hi = dis.get("range", [-3, 3])
        vectors = [str(self.vector(regime, lr, seed, t)) for t in pair]
        args = ["evaluate", *vectors, *self._task_args(pair), "--protocol", "disentanglement",
                "--grid-range", f"{lo}:{hi}", "--grid-size", str(dis.get("grid_size", XI_GRID_SIZE)),
                "--points", str(dis.get("points", XI_POINTS)), *self._eval_common(), "--report", str(out),
                "-o", str(out.with_suffix(".png"))]  # fmt: skip
        return Step(args, out, f"xi/{regime}/lr{_fmt(lr)}/seed{seed}")

    def merge_steps(self, method: str, lr: float, seed: int) -> tuple[Step, Step]:
        regime = self.plan.merges["vectors"]
        label = f"merge-{method}"
        merged = self.out / "runs" / label / f"seed{seed}" / "merged.safetensors"
        vectors = [str(self.vector(regime, lr, seed, t)) for t in self.plan.tasks]
        options = [a for k, v in (self.plan.merges["methods"][method] or {}).items() for a in ("--option", f"{k}={_option(v)}")]
        add = Step(["add", *vectors, "--method", method, *options, "--emit", "vector", "-o", str(merged), "--json"],
                   merged, f"{label}/seed{seed}/add")  # fmt: skip
        out = self.report(label, None, seed, "addition")
        grid = str(self.plan.merges.get("grid", "0:2:0.05"))
        ev = Step(["evaluate", *vectors, "--merged", str(merged), *self._task_args(list(self.plan.tasks)),
                   "--protocol", "addition", "--grid", grid, *self._eval_common(), "--report", str(out)],
                  out, f"{label}/seed{seed}/addition")  # fmt: skip
        return add, ev

    # -- the study ------------------------------------------------------------------------------
    def select_lr(self, regime: str) -> dict[str, Any]:
        """The lr whose first-seed vectors score best on validation (``plan.select``: the merged
        model's mean accuracy, the single tasks', 1 - the negated targets' mean accuracy, or the
        mean of the merged and negation scores); ties: the smaller lr."""
        seed = self.plan.seeds[0]
        select = self.plan.select
        scores = {}
        for lr in self.plan.lrs(regime):
            val = read_json(self.report(regime, lr, seed, "addition"))["val"]
            add = val["merged_mean"] if select in ("merged", "both") else _mean(list(val["single"].values()))
            if select in ("negation", "both"):
                neg = 1.0 - _mean([r["target_val"] for r in read_json(self.report(regime, lr, seed, "negation"))["targets"]])
                scores[lr] = neg if select == "negation" else (add + neg) / 2
            else:
                scores[lr] = add
        best = max(sorted(scores), key=lambda lr: scores[lr])
        by = {"merged": "mean validation accuracy (merged)", "single": "mean validation accuracy (single)",
              "negation": "negation: 1 - mean target validation accuracy", "both": "mean of merged validation accuracy and the negation score"}[select]  # fmt: skip
        return {"lr": best, "by": by, "select": select, "scores": {_fmt(k): v for k, v in scores.items()}}

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_steps([self.init_step()], "init theta0")
        first = plan.seeds[0]
        tasks = list(plan.tasks)
        # 1. first seed at every learning rate of every regime; addition picks each regime's lr
        self.run_steps([self.finetune_step(r, lr, first, t) for r in plan.regimes for lr in plan.lrs(r) for t in tasks], "fine-tune (first seed, lr grid)")
        first_evals = [self.addition_step(r, lr, first) for r in plan.regimes for lr in plan.lrs(r)]
        if plan.select in ("negation", "both"):  # the lr is chosen by negation too: every lr's first seed
            first_evals += [self.negation_step(r, lr, first) for r in plan.regimes for lr in plan.lrs(r)]
        self.run_steps(first_evals, "task addition (first seed)")
        chosen = {r: self.select_lr(r) for r in plan.regimes}
        lr_of = {r: c["lr"] for r, c in chosen.items()}
        # 2. the other seeds at the chosen learning rates
        rest = plan.seeds[1:]
        self.run_steps([self.finetune_step(r, lr_of[r], s, t) for r in plan.regimes for s in rest for t in tasks], "fine-tune (other seeds)")
        steps = [self.addition_step(r, lr_of[r], s) for r in plan.regimes for s in rest]
        if plan.negation:
            steps += [self.negation_step(r, lr_of[r], s) for r in plan.regimes for s in plan.seeds]
        if plan.disentanglement:
            steps += [self.xi_step(r, lr_of[r], first) for r in plan.regimes]
        self.run_steps(steps, "evaluate (addition, negation, disentanglement)")
        # 3. post-hoc merges of one regime's vectors
        if plan.merges:
            regime = plan.merges["vectors"]
            pairs = [self.merge_steps(m, lr_of[regime], s) for m in plan.merges["methods"] for s in plan.seeds]
            self.run_steps([a for a, _ in pairs], "post-hoc merges")
            self.run_steps([e for _, e in pairs], "evaluate merges")
        result = self.collect(chosen)
        write_outputs(result, self.out)
        return result

    # -- aggregation ----------------------------------------------------------------------------
    def collect(self, chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
        plan = self.plan
        rows: dict[str, Any] = {}
        for regime, choice in chosen.items():
            lr = choice["lr"]
            per_seed = []
            for s in plan.seeds:
                rec: dict[str, Any] = {"seed": s, "addition": _addition_record(read_json(self.report(regime, lr, s, "addition")))}
                if plan.negation:
                    rec["negation"] = _negation_record(read_json(self.report(regime, lr, s, "negation")))
                rec["loss"] = {t: loss_curve(self.vector(regime, lr, s, t)) for t in plan.tasks}
                per_seed.append(rec)
            row = {"kind": "regime", "regime": regime, "lr": lr, "lr_choice": choice, "seeds": per_seed, **_aggregate(per_seed)}
            if plan.disentanglement:
                xi = read_json(self.report(regime, lr, plan.seeds[0], "disentanglement"))
                row["disentanglement"] = _xi_record(xi)
            rows[regime] = row
        if plan.merges:
            regime = plan.merges["vectors"]
            for method in plan.merges["methods"]:
                label = f"merge-{method}"
                per_seed = [{"seed": s, "addition": _addition_record(read_json(self.report(label, None, s, "addition")))} for s in plan.seeds]
                rows[label] = {"kind": "merge", "method": method, "vectors": regime, "lr": chosen[regime]["lr"],
                               "options": plan.merges["methods"][method] or {}, "seeds": per_seed, **_aggregate(per_seed)}  # fmt: skip
        first = rows[next(iter(chosen))]["seeds"][0]["addition"]
        return {
            "plan": asdict(plan),
            "zero_shot": first["zero_shot"],
            "zero_shot_per_task": first["zero_shot_per_task"],
            "rows": rows,
            "seconds": {k: round(v, 1) for k, v in self.timings.items()},
        }


# ------------------------------------------------------------------------------------------------
# the scale sweep: the study repeated along one variable at a time
# ------------------------------------------------------------------------------------------------
@dataclass
class Axis:
    """One swept variable: ``vary`` is ``theta0`` or a fine-tuning option (steps, density, ...),
    set to each of ``values`` in turn for ``regimes``, with the fine-tuning options ``set`` fixed
    along the axis (e.g. ``schedule: constant`` for the constant-lr control)."""

    name: str
    vary: str
    values: list[Any]
    regimes: list[str]
    set: dict[str, Any] = field(default_factory=dict)


def sweep_axes(plan: Plan, path: Path | str = "plan") -> list[Axis]:
    """The plan's ``sweep`` entries, checked (every point's plan is checked too)."""
    from tvedit.finetune.config import FinetuneConfig

    if not isinstance(plan.sweep, list):
        raise UsageError(f"{path}: sweep: a list of axes (name, vary, values[, regimes, set])")
    options = set(FinetuneConfig.__dataclass_fields__) - {"mode"}
    axes, names = [], set()
    for i, entry in enumerate(plan.sweep):
        where = f"{path}: sweep[{i}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: a mapping (name, vary, values[, regimes, set])")
        unknown = sorted(set(entry) - {"name", "vary", "values", "regimes", "set"})
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: name, vary, values, regimes, set)")
        vary = entry.get("vary")
        if vary != "theta0" and vary not in options:
            raise UsageError(f"{where}.vary: theta0 or a fine-tuning option (steps, density, ...), not {vary!r}")
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}.values: a non-empty list")
        name = str(entry.get("name") or vary)
        if name in names or not name.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"{where}.name: {name!r} must be unique and made of letters, digits, - and _")
        names.add(name)
        regimes = entry.get("regimes") or list(plan.regimes)
        bad = [r for r in regimes if r not in plan.regimes]
        if bad:
            raise UsageError(f"{where}.regimes: {bad[0]!r} is not a regime of the plan")
        fixed = entry.get("set") or {}
        if not isinstance(fixed, dict) or sorted(set(fixed) - options):
            raise UsageError(f"{where}.set: a mapping of fine-tuning options")
        axis = Axis(name, vary, list(values), list(regimes), dict(fixed))
        if len({point_label(axis, v) for v in axis.values}) < len(axis.values):
            raise UsageError(f"{where}.values: two values share a name")
        for v in axis.values:
            try:
                check_plan(point_plan(plan, axis, v), f"{where} ({vary}={point_label(axis, v)})")
            except UsageError as exc:
                raise UsageError(str(exc)) from None
        axes.append(axis)
    return axes


def point_label(axis: Axis, value: Any) -> str:
    """A value's name (its directory): a number as written, a theta0 by its file stem."""
    if axis.vary == "theta0":
        path = value.get("theta0") if isinstance(value, dict) else value
        return Path(str(path)).name.removesuffix(".safetensors")
    return _fmt(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def point_plan(plan: Plan, axis: Axis, value: Any) -> Plan:
    """The study at one sweep point: the axis's regimes only, ``vary`` = ``value`` (theta0: a path,
    or a mapping theta0/model), the axis's fixed options; no merges, no disentanglement (the sweep
    reports addition and negation), no further sweep."""
    import copy

    data = copy.deepcopy(asdict(plan))
    data.update(sweep=[], merges={}, disentanglement={})
    data["regimes"] = {r: dict(data["regimes"][r], **axis.set) for r in axis.regimes}
    if axis.vary == "theta0":
        if isinstance(value, dict):
            data["theta0"], data["model"] = str(value.get("theta0")), value.get("model")
        else:
            data["theta0"] = str(value)
    else:
        for options in data["regimes"].values():
            options[axis.vary] = value
    return Plan(**data)


class Sweep:
    """Every point of every axis is a study in ``OUT/sweep/AXIS/VALUE/`` (resumable: outputs that
    exist are reused); ``sweep.json`` gathers the headline numbers and ``sweep.png`` draws them."""

    def __init__(self, plan: Plan, out: Path, progress: Callable[[str], None] | None = None, run_command: RunCommand | None = None,
                 only: Sequence[str] | None = None):
        self.plan = plan
        self.out = Path(out)
        self.say = progress or (lambda msg: None)
        self.run_command = run_command
        self.all_axes = sweep_axes(plan)
        names = [a.name for a in self.all_axes]
        unknown = [n for n in only or () if n not in names]
        if unknown:
            raise UsageError(f"--axis {unknown[0]}: the plan has no sweep axis of that name (axes: {', '.join(names)})")
        self.axes = [a for a in self.all_axes if not only or a.name in only]

    def point_dir(self, axis: Axis, value: Any) -> Path:
        return self.out / "sweep" / axis.name / point_label(axis, value)

    def run(self) -> dict[str, Any]:
        """Run the chosen axes' points in order; after each, sweep.json and sweep.png are rewritten
        with every point finished so far (of any axis), so a long sweep can be read and committed
        while it runs; returns the last of them."""
        result: dict[str, Any] = {}
        for axis in self.axes:
            for value in axis.values:
                self.say(f"sweep {axis.name}: {axis.vary} = {point_label(axis, value)}")
                source = self.source(axis, value)
                if source is not None and source != self.point_dir(axis, value):
                    self.say(f"  the same study as {source.relative_to(self.out)}: reused, not run again")
                else:
                    Study(point_plan(self.plan, axis, value), self.point_dir(axis, value), self.say, self.run_command).run()
                result = self.collect()
                write_sweep_outputs(result, self.out)
        return result

    def source(self, axis: Axis, value: Any) -> Path | None:
        """The point directory whose study.json holds this point: its own once it has run, else a
        finished point of another axis whose study ran this point's regimes with the same options
        and everything else equal (a width axis's shipped-theta0 point is the steps axis's point of
        that length; a regime's row depends on its own runs only), else None (not run yet)."""
        own = self.point_dir(axis, value)
        if (own / "study.json").exists():
            return own
        plan = point_plan(self.plan, axis, value)
        for other in self.all_axes:
            for v in other.values:
                there = self.point_dir(other, v)
                if there != own and (there / "study.json").exists() and _covers(point_plan(self.plan, other, v), plan):
                    return there
        return None

    def collect(self) -> dict[str, Any]:
        """Every number from the finished points' study.json files (every axis of the plan; a point
        not yet run is left out; a point reused from another axis names that axis's study.json; an
        axis none of whose points has run yet is left out)."""
        axes = []
        for axis in self.all_axes:
            points = []
            for value in axis.values:
                source = self.source(axis, value)
                if source is None:
                    continue
                study = read_json(source / "study.json")
                rows = {}
                for regime in axis.regimes:
                    row = study["rows"][regime]
                    rows[regime] = {"lr": row["lr"], "seeds": len(row["seeds"]), "merged": row["addition"]["merged"],
                                    "normalized": row["addition"]["normalized"],
                                    **({"negation_target": row["negation"]["target"]} if "negation" in row else {})}  # fmt: skip
                points.append({"value": value, "label": point_label(axis, value), "zero_shot": study["zero_shot"],
                               "study": str(source.relative_to(self.out) / "study.json"), "rows": rows})  # fmt: skip
            if any(p["study"].startswith(f"sweep/{axis.name}/") for p in points):  # not an axis of reused points only
                axes.append({**asdict(axis), "points": points})
        return {"plan": asdict(self.plan), "axes": axes}


def _covers(done: Plan, wanted: Plan) -> bool:
    """Whether study ``done`` holds every row of study ``wanted``: the same plan but for regimes,
    and each of ``wanted``'s regimes run there with the same options."""
    same = all(getattr(done, f) == getattr(wanted, f) for f in Plan.__dataclass_fields__ if f != "regimes")
    return same and all(done.regimes.get(r) == options for r, options in wanted.regimes.items())


def write_sweep_outputs(result: dict[str, Any], out: Path) -> None:
    write_replacing(out / "sweep.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    try:
        from tvedit.evaluate.plots import sweep_figure

        sweep_figure(result, out / "sweep.png")
    except (ImportError, UsageError):  # pragma: no cover - matplotlib is the [plot] extra
        pass


def write_replacing(path: Path, text: str) -> None:
    """A report written whole or not at all (an interrupted run leaves the previous one)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def _option(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the report: {exc}") from None


def loss_curve(vector: Path) -> list[float]:
    """Training loss per logged step from the run's JSONL log (OUT.train.jsonl)."""
    log = vector.with_name(vector.name.removesuffix(".safetensors") + ".train.jsonl")
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and "step" in rec:
            out.append([rec["step"], rec["loss"]])
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _addition_record(rep: dict[str, Any]) -> dict[str, Any]:
    m = rep["mean"]
    return {"alpha": rep["alpha"], "zero_shot": m["zero_shot"], "single": m["single"], "merged": m["merged"],
            "normalized": m["normalized"], "gain": m["gain"], "per_task": rep["merged"], "single_per_task": rep["single"],
            "zero_shot_per_task": rep["zero_shot"]}  # fmt: skip


def _negation_record(rep: dict[str, Any]) -> dict[str, Any]:
    m = rep["mean"]
    return {"target": m["target_test"], "control": m["control_test"], "target_zero_shot": m["target_zero_shot"],
            "control_zero_shot": rep["control_zero_shot"],
            "target_finetuned": _mean([r["target_finetuned"] for r in rep["targets"]]),
            "alphas": {r["target"]: r["alpha"] for r in rep["targets"]},
            "feasible": all(r["feasible"] for r in rep["targets"])}  # fmt: skip


def _xi_record(rep: dict[str, Any]) -> dict[str, Any]:
    xi = rep["xi"]
    n = sum(len(r) for r in xi)
    return {"tasks": rep["tasks"], "linear": rep["linear"], "xi_mean": sum(map(sum, xi)) / n, "xi_max": max(map(max, xi))}


AGGREGATED = {
    "addition": ("merged", "normalized", "gain", "single", "alpha"),
    "negation": ("target", "control", "target_finetuned"),
}


def _aggregate(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """mean and sample sd over seeds of every headline number."""
    out: dict[str, Any] = {}
    for part, keys in AGGREGATED.items():
        if part not in per_seed[0]:
            continue
        out[part] = {k: {"mean": _mean([r[part][k] for r in per_seed]), "sd": _sd([r[part][k] for r in per_seed])} for k in keys}
    return out


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"


def results_table(result: dict[str, Any]) -> str:
    """The README table (markdown), every number from ``result`` (test accuracy in %)."""
    rows = result["rows"]
    zero = result["zero_shot"] * 100
    seeds = len(result["plan"]["seeds"])
    recipe = result["plan"].get("label") or ""
    select = result["plan"].get("select", "merged")
    lines = [
        *([f"**{recipe}** (lr chosen on validation by: {select})", ""] if recipe else [f"lr chosen on validation by: {select}", ""]),
        f"Task addition over {len(result['plan']['tasks'])} tasks, test accuracy in % (mean ± sd over {seeds} seed{'s' * (seeds > 1)}); zero-shot θ0: {zero:.1f}.",
        "",
        "Zero-shot θ0 per task: " + ", ".join(f"{t} {a * 100:.1f}" for t, a in result.get("zero_shot_per_task", {}).items()) + ".",
        "",
        "| vectors | lr | α | fine-tuned (alone) | merged (absolute) | normalised | gain over zero-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        a = r["addition"]
        label = name if r["kind"] == "regime" else f"{r['vectors']} + {r['method']}"
        lines.append(f"| {label} | {r['lr']:g} | {a['alpha']['mean']:.3g} | {_pm(a['single'])} | {_pm(a['merged'])} | {_pm(a['normalized'])} | {_pm(a['gain'])} |")
    neg_rows = [(n, r) for n, r in rows.items() if "negation" in r]
    if neg_rows:
        first = neg_rows[0][1]["seeds"][0]["negation"]
        plan_neg = result["plan"]["negation"]
        lines += [
            "",
            f"Task negation (θ0 − α τ, targets {', '.join(plan_neg['targets'])}; control {plan_neg['control']} kept ≥ "
            f"{plan_neg.get('threshold', 0.95):g} × θ0's {first['control_zero_shot'] * 100:.1f}), mean over targets; lower target is better:",
            "",
            "| regime | target: zero-shot | fine-tuned | after negation | control |",
            "|---|---|---|---|---|",
        ]
        for name, r in neg_rows:
            n = r["negation"]
            z = r["seeds"][0]["negation"]["target_zero_shot"] * 100
            lines.append(f"| {name} | {z:.1f} | {_pm(n['target_finetuned'])} | {_pm(n['target'])} | {_pm(n['control'])} |")
    xi_rows = [(n, r) for n, r in rows.items() if "disentanglement" in r]
    if xi_rows:
        d = result["plan"]["disentanglement"]
        lines += ["", f"Weight disentanglement ξ ({' + '.join(d['tasks'])}, first seed, grid {d.get('grid_size', XI_GRID_SIZE)}² over {d.get('range', [-3, 3])}; lower is better):", "",
                  "| regime | mean ξ | max ξ |", "|---|---|---|"]  # fmt: skip
        for name, r in xi_rows:
            x = r["disentanglement"]
            lines.append(f"| {name}{' (f_lin)' if x['linear'] else ''} | {x['xi_mean']:.3f} | {x['xi_max']:.3f} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    write_replacing(out / "study.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_replacing(out / "results.md", results_table(result))
    try:
        from tvedit.evaluate.plots import study_figure
    except ImportError:  # pragma: no cover - matplotlib is the [plot] extra
        return
    try:
        study_figure(result, out / "study.png")
    except ImportError:
        pass
