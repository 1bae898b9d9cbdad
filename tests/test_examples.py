"""Every file in examples/ runs as the README presents it, on small inputs (issue 16 section 4).
The scripts that train or load models (pretrain_tiny_clip.py, t5_*, llm_tasks.sh) are in
tests/test_examples_models.py, so that pytest-xdist (a file per worker) runs the two halves side by side.

* make_inputs.sh, recipe.yaml (via `tvedit add`), ci_job.sh and pipeline.sh: the real scripts on the
  inputs make_inputs.sh writes (TVEDIT_EXAMPLE_SMALL=1: tiny tensors), results checked against the formula.
* study.yaml, study-long.yaml: `--dry-run` of the files as they are, and a run of study.yaml with
  the sizes shrunk (2 steps, one lr per regime, tiny image tasks under its task names), theta0 as shipped.
* sweep.yaml, sweep-seeds.yaml: `--dry-run` lists their points (all, or one axis).
* demo.sh (`make demo`, ~10 min) is not run: its step 1 is make_inputs.sh and its step 2 is study.yaml,
  both run here; its step 3 (mask plot, gate) is covered by tests/test_evaluate.py. demo_data.py
  needs the data packages (pip) and is not run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.examples_run import EXAMPLES, REPO
from tests.examples_run import run_example as _run

COVERED = {"make_inputs.sh", "recipe.yaml", "ci_job.sh", "pipeline.sh", "study.yaml", "study-long.yaml",
           "pretrain_tiny_clip.py", "t5_rotten_tomatoes.py", "t5_text_tasks.sh", "demo.sh", "demo_data.py", "theta0", "study-talos.yaml", "study-talos-extended.yaml", "sweep.yaml", "sweep-seeds.yaml", "llm_tasks.sh"}  # fmt: skip


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


@pytest.mark.parametrize("plan", ["study.yaml", "study-long.yaml", "study-talos.yaml", "study-talos-extended.yaml"])
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
