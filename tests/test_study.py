"""tvedit study: the plan, the aggregation (mean ± sd formulas), the lr choice, every number traced to an
evaluate report, a resumed study, and evaluate --merged (a merged vector scaled by alpha)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_evaluate import TINY, _image_folder
from tvedit.errors import UsageError


# ------------------------------------------------------------------------------------------------
# pure parts
# ------------------------------------------------------------------------------------------------
def test_aggregate_is_mean_and_sample_sd() -> None:
    from tvedit.study import _aggregate

    seeds = [{"addition": {"merged": m, "normalized": n, "gain": 0.1, "single": 0.5, "alpha": a}}
             for m, n, a in ((0.5, 0.8, 0.2), (0.7, 0.9, 0.4), (0.6, 1.0, 0.3))]  # fmt: skip
    agg = _aggregate(seeds)["addition"]
    assert agg["merged"]["mean"] == pytest.approx(0.6)
    assert agg["merged"]["sd"] == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 2))
    assert agg["normalized"]["sd"] == pytest.approx(0.1)
    assert agg["gain"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert _aggregate(seeds[:1])["addition"]["merged"] == {"mean": 0.5, "sd": 0.0}


def _in_process(args, log) -> int:
    """What `tvedit study` passes as the study's command runner: tvedit commands in this process."""
    from tvedit.cli.app import app
    from tvedit.cli.study_cmds import run_in_process

    return run_in_process(app, args, log)


def _write_plan(path: Path, **extra) -> Path:
    plan = {"theta0": "none", "tasks": {"a": "a", "b": "b"}, "regimes": {"full": {"lr": [1e-4, 1e-3]}}, **extra}
    path.write_text(yaml.safe_dump(plan))
    return path


def test_plan_checks_and_overrides(tmp_path: Path) -> None:
    from tvedit.study import load_plan

    p = _write_plan(tmp_path / "p.yaml", negation={"control": "b"}, merges={"vectors": "full", "methods": {"ties": {"density": 0.5}}})
    plan = load_plan(p, seeds=[3, 4], lrs={"full": 2e-4}, jobs=1)
    assert plan.seeds == [3, 4] and plan.jobs == 1
    assert plan.lrs("full") == [2e-4]
    assert plan.negation["targets"] == ["a"]  # every task but the control
    bad = [
        ({"colour": 1}, "unknown plan key 'colour'"),
        ({"regimes": {"fullish": {}}}, "unknown regime 'fullish'"),
        ({"regimes": {"full": {"steps": [1, 2]}}}, "only lr may be a grid"),
        ({"regimes": {"full": {"lr": -1}}}, "positive learning rates"),
        ({"regimes": {"sparse": {"density": 2}}}, "--density"),
        ({"regimes": {"full": {"stepz": 3}}}, "unknown fine-tuning option 'stepz'"),
        ({"negation": {"control": "c"}}, "negation.control"),
        ({"disentanglement": {"tasks": ["a"]}}, "disentanglement.tasks"),
        ({"merges": {"vectors": "full", "methods": {"tiez": {}}}}, "unknown method 'tiez'"),
        ({"merges": {"vectors": "full", "methods": {"ties": {"density": 3}}}}, "merges.methods.ties"),
        ({"select": "best"}, "select"),
    ]
    for extra, message in bad:
        with pytest.raises(UsageError, match=message):
            load_plan(_write_plan(tmp_path / "bad.yaml", **extra))
    with pytest.raises(UsageError, match="no regime 'attn'"):
        load_plan(p, lrs={"attn": 1e-3})


def test_results_table_prints_the_json_numbers() -> None:
    """Every number of the markdown table is a number of the result dict (scaled to %)."""
    from tvedit.study import results_table

    def stat(m: float, s: float) -> dict[str, float]:
        return {"mean": m, "sd": s}

    add = {"merged": stat(0.61234, 0.01), "normalized": stat(0.9, 0.02), "gain": stat(0.11, 0.0), "single": stat(0.7, 0.0), "alpha": stat(0.35, 0.05)}
    result = {
        "plan": {"seeds": [0, 1], "tasks": {"a": "", "b": ""}, "negation": {}, "disentanglement": {}},
        "zero_shot": 0.5,
        "rows": {"full": {"kind": "regime", "lr": 3e-4, "addition": add}},
    }
    table = results_table(result)
    assert "| full | 0.0003 | 0.35 | 70.0 ± 0.0 | 61.2 ± 1.0 | 90.0 ± 2.0 | 11.0 ± 0.0 |" in table
    assert "zero-shot θ0: 50.0" in table


@pytest.mark.parametrize("select", ["merged", "single", "negation", "both"])
def test_lr_selection_rules(tmp_path: Path, select: str) -> None:
    """select: merged | single | negation (1 - mean target val accuracy after negation, the TaLoS
    way) | both (the mean of the merged and negation scores), from the first seed's reports."""
    from tvedit.study import Study, load_plan

    plan = load_plan(_write_plan(tmp_path / "p.yaml", select=select, negation={"control": "b"}))
    study = Study(plan, tmp_path / "out")
    # lr 1e-4: better merged, worse negation; lr 1e-3: the opposite
    numbers = {1e-4: {"merged": 0.8, "single": [0.5, 0.7], "target": [0.6, 0.4]}, 1e-3: {"merged": 0.6, "single": [0.9, 0.9], "target": [0.1, 0.1]}}
    for lr, n in numbers.items():
        add = study.report("full", lr, 0, "addition")
        add.parent.mkdir(parents=True, exist_ok=True)
        add.write_text(json.dumps({"val": {"merged_mean": n["merged"], "single": dict(zip("ab", n["single"], strict=True))}}))
        study.report("full", lr, 0, "negation").write_text(json.dumps({"targets": [{"target_val": t} for t in n["target"]]}))
    expected = {
        "merged": {1e-4: 0.8, 1e-3: 0.6},
        "single": {1e-4: 0.6, 1e-3: 0.9},
        "negation": {1e-4: 0.5, 1e-3: 0.9},
        "both": {1e-4: (0.8 + 0.5) / 2, 1e-3: (0.6 + 0.9) / 2},
    }[select]
    choice = study.select_lr("full")
    assert choice["scores"] == pytest.approx({f"{k:g}": v for k, v in expected.items()})
    assert choice["lr"] == max(expected, key=lambda lr: expected[lr]) and choice["select"] == select
    if select in ("negation", "both"):
        with pytest.raises(UsageError, match="needs a negation section"):
            load_plan(_write_plan(tmp_path / "bad.yaml", select=select))


def test_study_xi_defaults_are_evaluates(tmp_path: Path) -> None:
    """A plan without grid_size/points runs ξ on tvedit evaluate's own defaults (20 x 20, 2,048)."""
    import click
    import typer.main

    from tvedit.cli.app import app
    from tvedit.study import Study, load_plan

    plan = load_plan(_write_plan(tmp_path / "p.yaml", disentanglement={"tasks": ["a", "b"]}))
    args = Study(plan, tmp_path / "out").xi_step("full", 1e-4, 0).args
    command = typer.main.get_command(app)
    ev = command.get_command(click.Context(command), "evaluate")
    defaults = {p.name: p.default for p in ev.params}
    assert (defaults["grid_size"], defaults["points"]) == (20, 2048)
    assert args[args.index("--grid-size") + 1] == "20" and args[args.index("--points") + 1] == "2048"
    assert "--no-bf16" not in args
    plan.evaluate["bf16"] = False  # the evaluate switch, from the plan
    assert "--no-bf16" in Study(plan, tmp_path / "out").xi_step("full", 1e-4, 0).args


# ------------------------------------------------------------------------------------------------
# the whole study on a tiny model (a few steps per run)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study")
    (root / "tiny.json").write_text(json.dumps(TINY))
    classes = {"a": ["red", "green", "blue"], "b": ["dark", "light"], "c": ["red", "blue"]}
    for i, (task, names) in enumerate(classes.items()):
        _image_folder(root / task / "train", names, 12, seed=10 + i)
        _image_folder(root / task / "test", names, 6, seed=20 + i)
    plan = {
        "theta0": "none",
        "model": str(root / "tiny.json"),
        "tasks": {t: str(root / t) for t in classes},
        "seeds": [0, 1],
        "finetune": {"steps": 3, "batch_size": 8, "warmup": 1},
        "regimes": {
            "full": {"lr": [1e-4, 1e-3]},
            "attn": {"lr": 1e-3},
            "linearized": {"lr": 1e-3},
            "sparse": {"lr": 1e-2, "density": 0.5, "calib_batches": 2, "rounds": 2},
        },
        "negation": {"targets": ["a", "b"], "control": "c"},
        "disentanglement": {"tasks": ["a", "b"], "grid_size": 3, "points": 8},
        "merges": {"vectors": "full", "methods": {"ties": {"density": 0.5}, "consensus": {}}, "grid": "0:1:0.25"},
        "evaluate": {"grid": "0:1:0.25"},
        "jobs": 1,  # in-process (the subprocess path: test_failed_step_names_the_command_and_its_log)
    }
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return {"root": root, "plan": path}


@pytest.mark.slow
def test_study_end_to_end_numbers_come_from_reports(tiny_study: dict[str, Path], cli) -> None:
    out = tiny_study["root"] / "out"
    proc = cli("study", str(tiny_study["plan"]), "-o", str(out), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    result = json.loads((out / "study.json").read_text())
    assert set(result["rows"]) == {"full", "attn", "linearized", "sparse", "merge-ties", "merge-consensus"}
    assert summary["rows"]["full"]["addition"] == result["rows"]["full"]["addition"]

    # the lr choice: the grid value whose first-seed reports give the best mean validation accuracy
    scores = {}
    for lr in ("0.0001", "0.001"):
        rep = json.loads((out / "reports" / "full" / f"lr{lr}" / "seed0" / "addition.json").read_text())
        scores[float(lr)] = sum(rep["val"]["merged"].values()) / len(rep["val"]["merged"])
    best = max(sorted(scores), key=lambda lr: scores[lr])
    assert result["rows"]["full"]["lr"] == best
    assert result["rows"]["full"]["lr_choice"]["scores"] == pytest.approx({f"{k:g}": v for k, v in scores.items()})

    # every aggregated number is the mean / sample sd of the per-seed evaluate reports
    for name, row in result["rows"].items():
        lr = f"lr{row['lr']:g}"
        per_seed = []
        for seed in (0, 1):
            parts = [name, lr] if row["kind"] == "regime" else [name]
            rep = json.loads((out / "reports").joinpath(*parts, f"seed{seed}", "addition.json").read_text())
            per_seed.append(rep["mean"]["merged"])
            if row["kind"] == "merge":
                assert rep["merged_vector"].endswith(f"{name}/seed{seed}/merged.safetensors")
        m = sum(per_seed) / 2
        assert row["addition"]["merged"]["mean"] == pytest.approx(m)
        assert row["addition"]["merged"]["sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
        if row["kind"] == "regime":
            assert row["negation"]["target"]["mean"] >= 0 and "disentanglement" in row
            curve = row["seeds"][0]["loss"]["a"]
            assert curve and curve[-1][0] == 3  # the training log, up to the last step
    # sparse vectors: zero outside the mask, the regime recorded in the vector
    from tvedit.reader import open_checkpoint

    sparse = open_checkpoint(out / "runs" / "sparse" / "lr0.01" / "seed0" / "a.safetensors")
    assert sparse.manifest.provenance[-1]["params"]["mode"] == "sparse"
    lin = open_checkpoint(out / "runs" / "linearized" / "lr0.001" / "seed0" / "a.safetensors")
    assert lin.manifest.regime == "linearized"
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert f"{result['rows']['attn']['addition']['merged']['mean'] * 100:.1f}" in table

    # a second run reuses every output: no command runs, the same study.json comes out
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")}
    again = cli("study", str(tiny_study["plan"]), "-o", str(out), "--device", "cpu", "--json")
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")} == before
    assert json.loads((out / "study.json").read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_sweep_numbers_are_the_points_study_numbers(tiny_study: dict[str, Path]) -> None:
    """A tiny sweep (2 points of steps, 1 seed, constant lr along the axis), in-process: every
    number in sweep.json is the one in its point's study.json; sweep.json is rewritten after each
    point; an axis not chosen (--axis) is not run and not reported; a second run reuses every point."""
    from tvedit.reader import open_checkpoint
    from tvedit.study import Sweep, load_plan

    plan = yaml.safe_load(tiny_study["plan"].read_text())
    plan.update(seeds=[0], regimes={"full": {"lr": 1e-3}, "sparse": {"lr": 1e-2, "density": 0.5, "calib_batches": 2, "rounds": 2}},
                negation={"targets": ["a"], "control": "c"}, merges={}, disentanglement={},
                sweep=[{"name": "length", "vary": "steps", "values": [2, 3], "set": {"schedule": "constant"}},
                       {"name": "not-run", "vary": "steps", "values": [4]},
                       {"name": "same", "vary": "density", "values": [0.5, 0.25], "regimes": ["sparse"], "set": {"steps": 3, "schedule": "constant"}}])  # fmt: skip
    path = tiny_study["root"] / "sweep.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tiny_study["root"] / "sweep-out"
    seen = {}  # sweep.json as each point starts

    def progress(msg: str) -> None:
        if msg.startswith("sweep length"):
            seen[msg] = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else None

    result = Sweep(load_plan(path), out, progress=progress, run_command=_in_process, only=["length"]).run()
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(result))
    assert not (out / "sweep" / "not-run").exists()
    first, second = seen.values()
    assert first is None and [p["value"] for a in second["axes"] for p in a["points"]] == [2]
    (axis,) = result["axes"]  # "same" has not run: its density 0.5 point alone (reused below) does not show it
    assert [p["value"] for p in axis["points"]] == [2, 3] and axis["regimes"] == ["full", "sparse"]
    checked = 0
    for point in axis["points"]:
        study = json.loads((out / point["study"]).read_text())
        assert point["zero_shot"] == study["zero_shot"]
        for regime, cell in point["rows"].items():
            row = study["rows"][regime]
            assert cell["merged"] == row["addition"]["merged"] and cell["normalized"] == row["addition"]["normalized"]
            assert cell["negation_target"] == row["negation"]["target"] and cell["lr"] == row["lr"]
            checked += 3
            vec = open_checkpoint(out / point["study"].replace("study.json", f"runs/{regime}/lr{row['lr']:g}/seed0/a.safetensors"))
            params = vec.manifest.provenance[-1]["params"]
            assert params["steps"] == point["value"] and params["schedule"] == "constant"
    assert checked == 12
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p: p.stat().st_mtime_ns for p in (out / "sweep").rglob("*.safetensors")}
    assert Sweep(load_plan(path), out, run_command=_in_process, only=["length"]).run() == result
    assert {p: p.stat().st_mtime_ns for p in (out / "sweep").joinpath("length").rglob("*.safetensors")} == before
    ran = []
    both = Sweep(load_plan(path), out, run_command=lambda args, log: ran.append(" ".join(map(str, args))) or _in_process(args, log), only=["same"]).run()
    assert both["axes"][0] == result["axes"][0] and not (out / "sweep" / "same" / "0.5").exists()
    assert ran and all(str(out / "sweep" / "same" / "0.25") in args for args in ran), ran
    same = both["axes"][1]  # the density 0.5 point is the sparse half of length/3: reused, not run again
    assert same["name"] == "same" and [p["study"] for p in same["points"]] == ["sweep/length/3/study.json", "sweep/same/0.25/study.json"]
    assert same["points"][0]["rows"]["sparse"] == axis["points"][1]["rows"]["sparse"]
    assert {p: p.stat().st_mtime_ns for p in (out / "sweep").joinpath("length").rglob("*.safetensors")} == before


def test_sweep_plan_checks(tmp_path: Path) -> None:
    from tvedit.study import Sweep, load_plan, point_plan, sweep_axes

    good = [{"vary": "steps", "values": [200, 600]}, {"name": "density", "vary": "density", "values": [0.05, 0.1], "regimes": ["sparse"]},
            {"name": "width", "vary": "theta0", "values": ["a.safetensors", {"theta0": "wide.safetensors", "model": None}], "set": {"steps": 1500}}]  # fmt: skip
    plan = load_plan(_write_plan(tmp_path / "p.yaml", regimes={"full": {"lr": 1e-4}, "sparse": {"lr": 1e-3, "density": 0.2}}, sweep=good))
    steps, density, width = sweep_axes(plan)
    assert point_plan(plan, steps, 600).regimes == {"full": {"lr": 1e-4, "steps": 600}, "sparse": {"lr": 1e-3, "density": 0.2, "steps": 600}}
    assert point_plan(plan, density, 0.05).regimes == {"sparse": {"lr": 1e-3, "density": 0.05}}
    wide = point_plan(plan, width, {"theta0": "wide.safetensors", "model": None})
    assert wide.theta0 == "wide.safetensors" and wide.model is None and wide.regimes["full"]["steps"] == 1500
    assert not wide.sweep and not wide.merges
    bad = [
        ([{"vary": "stepz", "values": [1]}], "vary"),
        ([{"vary": "steps", "values": []}], "values"),
        ([{"vary": "steps", "values": [1], "regimes": ["attn"]}], "not a regime"),
        ([{"vary": "density", "values": [2.0]}], "--density"),
        ([{"vary": "steps", "values": [1], "set": {"schedule": "linear"}}], "schedule"),
        ([{"vary": "steps", "values": [1]}, {"vary": "steps", "values": [2]}], "unique"),
    ]
    for sweep, message in bad:
        with pytest.raises(UsageError, match=message):
            load_plan(_write_plan(tmp_path / "bad.yaml", regimes={"full": {"lr": 1e-4}}, sweep=sweep))
    with pytest.raises(UsageError, match="--axis widht: the plan has no sweep axis of that name .axes: steps, density, width"):
        Sweep(plan, tmp_path / "out", only=["steps", "widht"])
    assert [a.name for a in Sweep(plan, tmp_path / "out", only=["width", "steps"]).axes] == ["steps", "width"]


def test_study_bad_plan_is_a_usage_error_before_any_run(tmp_path: Path, cli) -> None:
    p = _write_plan(tmp_path / "p.yaml", regimes={"full": {"lr": 1e-3}, "lora": {}})
    proc = cli("study", str(p), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unknown regime 'lora'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    proc = cli("study", str(p), "-o", str(tmp_path / "out"), "--seeds", "a,b")
    assert proc.returncode == 2 and "--seeds" in proc.stderr


def test_failed_step_names_the_command_and_its_log(tiny_study: dict[str, Path], cli, tmp_path: Path) -> None:
    plan = yaml.safe_load(tiny_study["plan"].read_text())
    plan["tasks"]["a"] = str(tmp_path / "missing")
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({**plan, "jobs": 2, "seeds": [0], "regimes": {"full": {"lr": 1e-3}}, "merges": {}, "negation": {}, "disentanglement": {}}))
    proc = cli("study", str(p), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 8, proc.stderr  # the fine-tuning command's data error, passed through
    assert "finetune/full/lr0.001/seed0/a failed (exit 8)" in proc.stderr and "(log: " in proc.stderr


def test_sigterm_stops_the_study_and_its_running_commands(tiny_study: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM to `tvedit study` (jobs 2: each command a subprocess) terminates the commands it runs,
    starts no other, exits 143 with the one interrupted line, and leaves no vector or temporary."""
    import signal
    import subprocess
    import sys
    import time

    from tvedit import safeio

    plan = yaml.safe_load(tiny_study["plan"].read_text())
    plan.update(jobs=2, seeds=[0], regimes={"full": {"lr": 1e-3}}, merges={}, negation={}, disentanglement={},
                finetune={"steps": 1_000_000, "batch_size": 8, "warmup": 1})  # fmt: skip
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tvedit", "study", str(p), "-o", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def commands() -> list[str]:  # the study's fine-tuning commands still alive
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "finetune" in text and str(out) in text:
                found.append(text)
        return found

    deadline = time.monotonic() + 600  # bounds a hang only (a loaded box takes a while to start torch)
    logs = lambda: [f for f in (out / "runs").rglob("*.train.jsonl") if f.stat().st_size > 0] if (out / "runs").exists() else []  # noqa: E731
    while len(logs()) < 2:  # two fine-tunes are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timed out"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM): unfinished output removed"
    assert commands() == []  # none left running, none started after the signal
    assert len(list((out / "logs").glob("finetune_*.log"))) == 2
    assert not [f for f in (out / "runs").rglob("*") if f.suffix == ".safetensors" or safeio.TMP_MARK in f.name]


# ------------------------------------------------------------------------------------------------
# evaluate --merged
# ------------------------------------------------------------------------------------------------
def test_evaluate_merged_sum_equals_plain_addition(cli, tmp_path: Path) -> None:
    """A merged vector that IS the plain sum gives exactly the plain protocol's choice and numbers."""
    from tests.test_evaluate import CLASSES  # noqa: F401  (same tiny setup as test_evaluate)
    from tvedit.manifest import Manifest, base_ref
    from tvedit.models.open_clip import OpenClipAdapter
    from tvedit.writer import save_tensors

    adapter = OpenClipAdapter("tiny", TINY)
    torch.manual_seed(0)
    state = adapter.state_dict(adapter.build())
    base = tmp_path / "base.safetensors"
    art = save_tensors(base, state, Manifest(kind="checkpoint", model=adapter.model_info()))
    g = torch.Generator().manual_seed(1)
    vectors = []
    names = {"a": ["red", "green", "blue"], "b": ["dark", "light"]}
    for i, task in enumerate(names):
        tau = {k: 0.05 * torch.randn(v.shape, generator=g) if k.startswith("visual.") else torch.zeros_like(v)
               for k, v in state.items() if v.is_floating_point()}  # fmt: skip
        m = Manifest(kind="task-vector", model=adapter.model_info(), base=base_ref(art.sha256, str(base)),
                     task={"name": task, "classes": names[task], "templates": ["a photo of a {}."]})  # fmt: skip
        vectors.append(tmp_path / f"tau_{task}.safetensors")
        save_tensors(vectors[-1], tau, m)
        _image_folder(tmp_path / task / "train", names[task], 10, seed=10 + i)
        _image_folder(tmp_path / task / "test", names[task], 6, seed=20 + i)
    cli("add", *map(str, vectors), "--emit", "vector", "-o", str(tmp_path / "sum.safetensors"), check=True)
    common = [*map(str, vectors), "--base", str(base), "--task", f"a={tmp_path / 'a'}", "--task", f"b={tmp_path / 'b'}",
              "--protocol", "addition", "--grid", "0:1:0.25", "--device", "cpu"]  # fmt: skip
    cli("evaluate", *common, "--report", str(tmp_path / "plain.json"), check=True)
    cli("evaluate", *common, "--merged", str(tmp_path / "sum.safetensors"), "--report", str(tmp_path / "merged.json"), check=True)
    plain = json.loads((tmp_path / "plain.json").read_text())
    merged = json.loads((tmp_path / "merged.json").read_text())
    for key in ("alpha", "choice", "merged", "single", "zero_shot", "normalized", "val"):
        assert merged[key] == plain[key], key  # the same predictions, so the same floats
    assert merged["merged_vector"].endswith("sum.safetensors") and plain["merged_vector"] is None
    bad = cli("evaluate", *common[:-6], "--protocol", "negation", "--merged", str(tmp_path / "sum.safetensors"), "--control", f"b={tmp_path / 'b'}")
    assert bad.returncode == 2 and "--merged is for --protocol addition" in bad.stderr


def test_sweep_figure_gives_each_regime_one_colour_in_every_row() -> None:
    """A regime keeps its colour across the figure's rows: a density row that has sparse alone
    draws it in sparse's colour from the four-regime rows, not in the first colour of its row."""
    from tvedit.evaluate.plots import regime_colors

    result = {"axes": [{"regimes": ["sparse"]}, {"regimes": ["full", "attn", "linearized", "sparse"]},
                       {"regimes": ["linearized", "mine"]}]}  # fmt: skip
    colors = regime_colors(result)
    assert colors == {"full": "C0", "attn": "C1", "linearized": "C2", "sparse": "C3", "mine": "C4"}
    assert regime_colors({"axes": [{"regimes": ["sparse"]}]}) == {"sparse": "C3"}
