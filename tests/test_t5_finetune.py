"""T5 through the shared fine-tuning loop and evaluation: every regime's invariants, resume, the
text recipe, and the CLI (init --model DIR, export-hf, DataError on a bad line)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.tiny_t5 import first_letter_examples, write_task, write_tiny_t5
from tvedit.finetune import run
from tvedit.finetune.config import FinetuneConfig
from tvedit.models.hf_seq2seq import RECIPE
from tvedit.reader import load_tensors


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded (and do not fight over a shared machine's cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5ft")
    hf = write_tiny_t5(root / "tiny")
    theta0 = root / "theta0.safetensors"
    run.init(str(hf), None, theta0)
    task = write_task(root, "first_letter", first_letter_examples(80, seed=1))
    return {"root": root, "hf": hf, "theta0": theta0, "task": task}


def _cfg(mode: str, **kw: object) -> FinetuneConfig:
    base: dict[str, object] = dict(mode=mode, steps=6, batch_size=8, lr=1e-2, warmup=1, device="cpu", rounds=2, calib_batches=2, density=0.2, calib_chunk=4)
    return FinetuneConfig(**{**base, **kw}).validate()  # type: ignore[arg-type]


def _finetune(setup: dict[str, Path], mode: str, name: str, **kw: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    out = setup["root"] / f"{name}.safetensors"
    resume = bool(kw.pop("resume", False))
    arts = run.finetune(None, str(setup["theta0"]), setup["task"], out, _cfg(mode, **kw), resume=resume, force=True)
    base, _ = load_tensors(setup["theta0"])
    tuned, manifest = load_tensors(out) if arts else ({}, None)
    return base, tuned, manifest


def _changed(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in base if not torch.equal(base[k], tuned[k])}


def test_sparse_vector_is_zero_outside_the_mask(setup: dict[str, Path]) -> None:
    base, tuned, manifest = _finetune(setup, "sparse", "sparse")
    mask, mask_manifest = load_tensors(setup["root"] / "sparse.mask.safetensors")
    assert mask_manifest is not None and mask_manifest.kind == "mask"
    from tvedit.models import adapter_for

    maskable = set(adapter_for(manifest.model).maskable_keys())  # type: ignore[attr-defined]
    assert set(mask) == maskable
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(0.2 * sum(m.numel() for m in mask.values()))
    for key in base:
        tau = tuned[key] - base[key]
        if key in mask:
            assert not bool(tau[~mask[key]].any()), key
        else:
            assert not bool(tau.any()), f"{key} is not maskable and must not move"
    assert _changed(base, tuned)  # something trained
    assert not _changed(base, tuned) & {"shared.weight"}  # embeddings (and the tied lm_head) frozen


def test_attn_touches_only_q_k_v_o(setup: dict[str, Path]) -> None:
    base, tuned, manifest = _finetune(setup, "attn", "attn")
    changed = _changed(base, tuned)
    assert changed and all(k.split(".")[-2] in ("q", "k", "v", "o") for k in changed)
    assert {k.split(".")[-3] for k in changed} == {"SelfAttention", "EncDecAttention"}
    assert manifest.regime == "nonlinear" and manifest.task["choices"] == ["yes", "no"]  # type: ignore[attr-defined]


def test_linearized_run_is_marked(setup: dict[str, Path]) -> None:
    base, tuned, manifest = _finetune(setup, "linearized", "lin", steps=3)
    assert manifest.regime == "linearized"  # type: ignore[attr-defined]
    assert _changed(base, tuned)


def test_resume_gives_the_same_weights(setup: dict[str, Path]) -> None:
    _, straight, _ = _finetune(setup, "full", "straight")
    _, nothing, _ = _finetune(setup, "full", "halves", stop_after=3)
    assert not nothing  # stopped early: no output yet, resume state kept
    _, resumed, _ = _finetune(setup, "full", "halves", resume=True)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_full_finetuning_learns_the_rule_and_evaluates_by_rank_classification(setup: dict[str, Path]) -> None:
    from tvedit.evaluate.data import load_task
    from tvedit.evaluate.runner import Evaluator
    from tvedit.models import adapter_for

    base, tuned, manifest = _finetune(setup, "full", "learn", steps=100, batch_size=16, lr=3e-3, warmup=4)
    adapter = adapter_for(manifest.model)  # type: ignore[attr-defined]
    task = load_task(adapter, "first_letter", setup["task"], manifest.task)  # type: ignore[attr-defined]
    ev = Evaluator(adapter, base, batch_size=64)
    inputs, labels = task.split("test")
    params = {k: tuned[k] for k in _changed(base, tuned)}
    acc = float((ev.logits(task, "test", params).argmax(1) == labels).float().mean())
    acc0 = float((ev.logits(task, "test").argmax(1) == labels).float().mean())
    assert acc >= 0.75 and acc >= acc0 + 0.25, (acc, acc0)


def test_text_recipe_defaults_and_overrides(setup: dict[str, Path], tmp_path: Path) -> None:
    from tvedit.cli.finetune_cmds import _config

    cfg = _config(None, None, str(setup["theta0"]))
    assert cfg.lr == RECIPE["lr"] == 1e-4 and cfg.batch_size == RECIPE["batch_size"]
    assert cfg.patience == 5 and cfg.eval_every > 0  # TaLoS text setup: early stopping, patience 5
    (tmp_path / "c.yaml").write_text("lr: 0.002\n")
    assert _config(tmp_path / "c.yaml", None, str(setup["hf"])).lr == 0.002
    assert _config(tmp_path / "c.yaml", None, str(setup["hf"]), lr=0.5).lr == 0.5
    assert _config(None, None, "openai").lr == 1e-5  # open_clip keeps the CLIP recipe


def test_cli_init_export_and_bad_data(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tvedit.cli.app import app

    monkeypatch.chdir(tmp_path)

    def cli(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, result.stdout, result.stderr

    code, out, _ = cli("init", "--model", str(setup["hf"]), "-o", "t0.safetensors")
    assert code == 0 and json.loads(out)["manifest"]["model"]["family"] == "hf-seq2seq"
    t0, _ = load_tensors(tmp_path / "t0.safetensors")
    ref, _ = load_tensors(setup["theta0"])
    assert all(torch.equal(t0[k], ref[k]) for k in ref)
    code, out, _ = cli("export-hf", "t0.safetensors", "-o", "hf-out")
    assert code == 0 and json.loads(out)["kind"] == "hf-directory" and (tmp_path / "hf-out" / "config.json").exists()
    code, _, err = cli("export-hf", "t0.safetensors", "-o", "hf-out")
    assert code == 6 and "not empty" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "choices": ["x", "y"], "label": 0}\n{"input": "b", "choices": ["x", "y"], "label": 7}\n')
    code, _, err = cli("finetune", "-p", "t0.safetensors", "--train", str(bad), "-o", "never.safetensors", "--steps", "1")
    assert code == 8 and "bad.jsonl:2:" in err and "out of range" in err
    assert not (tmp_path / "never.safetensors").exists()


def test_theta0_from_a_hf_directory_is_materialised_once(setup: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "out.theta0.safetensors"
    first = run.resolve_theta0(None, str(setup["hf"]), seed=0, materialise=target)
    again = run.resolve_theta0(str(setup["hf"]), str(setup["hf"]), seed=0, materialise=target)
    ref = run.resolve_theta0(str(setup["hf"]), str(setup["theta0"]), seed=0, materialise=tmp_path / "unused")
    assert first.sha256 == again.sha256 == ref.sha256 and first.path == target and ref.path == setup["theta0"]
    assert not (tmp_path / "unused").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_cli_every_mode_and_the_protocols(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the command line: all four regimes on JSONL tasks, then task addition and negation by
    rank classification, then the merged model written as a Hugging Face directory."""
    from transformers import AutoModelForSeq2SeqLM
    from typer.testing import CliRunner

    from tests.tiny_t5 import parity_examples
    from tvedit.cli.app import app

    monkeypatch.chdir(tmp_path)
    parity = write_task(tmp_path / "parity", "parity", parity_examples(64, seed=2))
    first = setup["task"]

    def cli(*args: str) -> list[dict]:
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, f"tvedit {' '.join(args)}: {result.stderr}"
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    tiny = ["--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--warmup", "1", "--emit", "vector"]
    for mode in ("full", "attn", "linearized", "sparse"):
        extra = ["--density", "0.2", "--calib-batches", "2"] if mode == "sparse" else []
        (rec, *_) = [r for r in cli("finetune", "-p", str(setup["theta0"]), "--train", str(first), "--mode", mode, *tiny, *extra,
                                    "-o", f"first-{mode}.safetensors") if r["kind"] == "task-vector"]  # fmt: skip
        assert rec["manifest"]["regime"] == ("linearized" if mode == "linearized" else "nonlinear")
    cli("finetune", "-p", str(setup["theta0"]), "--train", str(parity), "--mode", "full", *tiny, "-o", "parity.safetensors")

    vectors = ["first-full.safetensors", "parity.safetensors"]
    tasks = ["--task", f"first_letter={first}", "--task", f"parity={parity}", "--grid", "0:1:0.5"]
    added = cli("evaluate", *vectors, *tasks, "--protocol", "addition", "--report", "add.json")
    report = json.loads((tmp_path / "add.json").read_text())
    assert report["alpha"] in (0.0, 0.5, 1.0) and set(report["single"]) == {"first_letter", "parity"}
    assert added and all(0.0 <= v <= 1.0 for v in report["single"].values())
    cli("evaluate", "first-full.safetensors", "--task", f"first_letter={first}", "--control", f"parity={parity}",
        "--protocol", "negation", "--grid", "0:1:0.5", "--report", "neg.json")  # fmt: skip
    neg = json.loads((tmp_path / "neg.json").read_text())
    assert neg["protocol"] == "negation"
    lin = cli("evaluate", "first-linearized.safetensors", "--task", f"first_letter={first}", "--alpha", "0", "--alpha", "1")
    base_acc = cli("evaluate", "first-full.safetensors", "--task", f"first_letter={first}", "--alpha", "0")
    assert lin[0]["accuracy"] == base_acc[0]["accuracy"]  # f_lin at alpha 0 is theta0

    cli("add", *vectors, "--alpha", "0.5", "-o", "merged.safetensors")
    cli("export-hf", "merged.safetensors", "-o", "merged-hf")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged-hf")
    merged, _ = load_tensors(tmp_path / "merged.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], merged[k]) for k in merged if k in state)
