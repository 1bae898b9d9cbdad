"""The CLI through real subprocesses and shell pipelines, and the bad-input matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import make_state


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_issue_pipeline_matches_formula(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    proc = cli(shell="tvedit extract ft1.safetensors ft2.safetensors --base base.safetensors | tvedit scale - --by 0.5 | tvedit add - --alpha 0.3 -o merged.safetensors")
    assert proc.returncode == 0, proc.stderr
    (record,) = _lines(proc.stdout)
    assert record["path"] == "merged.safetensors" and record["kind"] == "checkpoint"
    base, f1, f2 = (load_file(str(ckpts[k])) for k in ("base", "ft1", "ft2"))
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for k, b in base.items():
        if b.is_floating_point():
            expected = b + 0.3 * (0.5 * (f1[k] - b) + 0.5 * (f2[k] - b))
            assert torch.allclose(merged[k], expected, atol=1e-6, rtol=0), k
    ops = [s["op"] for s in record["manifest"]["provenance"]]
    assert ops == ["add"] and [s["op"] for s in record["manifest"]["provenance"][0]["inputs"][0]["provenance"]] == ["extract", "scale"]
    # intermediates lived in scratch and were consumed
    scratch = Path(__import__("os").environ["TVEDIT_SCRATCH"])
    assert list(scratch.glob("*.safetensors")) == []


def test_yaml_recipe_with_weights(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    cli("extract", "ft1.safetensors", "ft2.safetensors", "--base", "base.safetensors", "--out-dir", "tv", check=True)
    (tmp_path / "recipe.yaml").write_text(
        "base: base.safetensors\nalpha: 0.4\ninputs:\n  - path: tv/ft1.tv.safetensors\n    weight: 1.0\n  - path: tv/ft2.tv.safetensors\n    weight: 0.25\n"
    )
    cli("add", "recipe.yaml", "-o", "m.safetensors", check=True)
    base, f1, f2 = (load_file(str(ckpts[k])) for k in ("base", "ft1", "ft2"))
    m = load_file(str(tmp_path / "m.safetensors"))
    k = "layer.0.weight"
    assert torch.allclose(m[k], base[k] + 0.4 * ((f1[k] - base[k]) + 0.25 * (f2[k] - base[k])), atol=1e-6, rtol=0)
    # JSON lines saved to a file are a recipe too
    lines = cli("info", "tv/ft1.tv.safetensors", "--json", check=True).stdout
    (tmp_path / "list.jsonl").write_text(lines)
    out = cli("add", "list.jsonl", "--base", "base.safetensors", "-o", "m2.safetensors", check=True)
    assert _lines(out.stdout)[0]["kind"] == "checkpoint"


def test_deterministic_bytes(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    for name in ("a", "b"):
        cli(shell=f"tvedit extract ft1.safetensors ft2.safetensors --base base.safetensors | tvedit add - --alpha 0.3 -o {name}.safetensors", check=True)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_human_output_and_json_flag(cli, ckpts: dict[str, Path]) -> None:
    out = cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "t.safetensors", "--json", check=True)
    assert _lines(out.stdout)[0]["manifest"]["kind"] == "task-vector"
    info = _lines(cli("info", "t.safetensors", check=True).stdout)[0]
    assert info["kind"] == "task-vector" and info["tensors"] == 3 and info["density"] == 1.0
    ver = cli("info", "t.safetensors", "--verify", check=True)
    assert _lines(ver.stdout)[0]["verified"] is True


# ---------------------------------------------------------------------------------------------
# bad input: one-line error naming file and key, documented exit code, no partial output
# ---------------------------------------------------------------------------------------------
def _write(tmp: Path, name: str, tensors: dict) -> None:
    save_file(tensors, str(tmp / name))


def _assert_error(proc, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_bad_inputs(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    base = make_state(0)
    shape_bad = dict(base, **{"layer.0.weight": torch.zeros(3, 3)})
    _write(tmp_path, "shape.safetensors", shape_bad)
    extra = dict(base, **{"extra.weight": torch.zeros(2)})
    _write(tmp_path, "extra.safetensors", extra)
    nan = dict(base, **{"layer.0.bias": torch.full((16,), float("nan"))})
    _write(tmp_path, "nan.safetensors", nan)
    (tmp_path / "garbage.safetensors").write_bytes(b"hello world, not a tensor file")
    trunc = (tmp_path / "ft1.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(trunc[: len(trunc) // 2])

    cases = [
        (("extract", "missing.safetensors", "--base", "base.safetensors", "-o", "o.safetensors"), 3, ["missing.safetensors", "no such file"]),
        (("extract", "garbage.safetensors", "--base", "base.safetensors", "-o", "o.safetensors"), 3, ["garbage.safetensors"]),
        (("extract", "trunc.safetensors", "--base", "base.safetensors", "-o", "o.safetensors"), 3, ["trunc.safetensors", "truncated"]),
        (("extract", "shape.safetensors", "--base", "base.safetensors", "-o", "o.safetensors"), 4, ["shape.safetensors", "layer.0.weight", "[3, 3]", "[16, 8]"]),
        (("extract", "extra.safetensors", "--base", "base.safetensors", "-o", "o.safetensors"), 4, ["extra.weight"]),
        (("extract", "nan.safetensors", "--base", "base.safetensors", "-o", "o.safetensors"), 5, ["o.safetensors", "layer.0.bias", "NaN"]),
        (("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "ft1.safetensors", "--force"), 6, ["same file as an input"]),
        (("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "ft2.safetensors"), 6, ["ft2.safetensors", "already exists"]),
        (("add", "ft1.safetensors", "--base", "base.safetensors", "--method", "nope", "-o", "o.safetensors"), 2, ["nope"]),
        (("add", "ft1.safetensors", "--base", "base.safetensors", "--weights", "1,2", "-o", "o.safetensors"), 2, ["--weights"]),
        (("add", "ft1.safetensors", "--base", "base.safetensors", "--dtype", "int7", "-o", "o.safetensors"), 2, ["--dtype"]),
        (("scale", "ft1.safetensors", "--by", "2", "-o", "o.safetensors"), 3, ["ft1.safetensors", "task vectors"]),
    ]
    for args, code, needles in cases:
        _assert_error(cli(*args), code, *needles)
        assert not (tmp_path / "o.safetensors").exists(), args
        assert not [p for p in tmp_path.iterdir() if "tvedit-tmp" in p.name], args
    # NaN allowed on request
    assert cli("extract", "nan.safetensors", "--base", "base.safetensors", "-o", "o.safetensors", "--allow-nonfinite").returncode == 0


def test_base_hash_and_regime_mismatch(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    other = make_state(7)
    _write(tmp_path, "other.safetensors", other)
    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "t1.safetensors", check=True)
    cli("extract", "ft2.safetensors", "--base", "other.safetensors", "-o", "t2.safetensors", "--allow-nonfinite", check=True)
    _assert_error(cli("add", "t1.safetensors", "t2.safetensors", "-o", "o.safetensors"), 4, "t2.safetensors", "base")
    _assert_error(cli("add", "t1.safetensors", "--base", "other.safetensors", "-o", "o.safetensors"), 4, "other.safetensors", "differs")
    # a linearized vector cannot be mixed with a non-linear one (tests/test_mismatch.py: --allow-mismatch)
    from tvedit.manifest import Manifest
    from tvedit.reader import load_tensors
    from tvedit.writer import save_tensors

    tensors, manifest = load_tensors(tmp_path / "t1.safetensors")
    assert manifest is not None
    lin = Manifest.from_dict({**manifest.to_dict(), "regime": "linearized", "sparse": {}})
    save_tensors(tmp_path / "lin.safetensors", tensors, lin)
    _assert_error(cli("add", "t1.safetensors", "lin.safetensors", "-o", "o.safetensors"), 4, "regimes", "lin.safetensors")
    assert cli("add", "t1.safetensors", "lin.safetensors", "-o", "o.safetensors", "--allow-mismatch", "regime").returncode == 0


def test_stdin_dash_errors(cli, ckpts: dict[str, Path]) -> None:
    _assert_error(cli("add", "-", "-o", "o.safetensors", input=""), 3, "no inputs")
    _assert_error(cli("add", "-", "-o", "o.safetensors", input="{broken json\n"), 3, "line 1")


def test_import_refuses_pickles_unless_trusted(cli, tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"state_dict": {"w": torch.ones(3)}, "obj": Evil()}, tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": torch.ones(3), "pos": torch.arange(3)}, "epoch": 3}, tmp_path / "plain.pt")
    _assert_error(cli("import", "evil.pt", "-o", "e.safetensors"), 3, "evil.pt", "--trust-pickle")
    assert not (tmp_path / "e.safetensors").exists()
    out = cli("import", "plain.pt", "-o", "p.safetensors", check=True)
    assert json.loads(out.stdout)["kind"] == "checkpoint"
    assert torch.equal(load_file(str(tmp_path / "p.safetensors"))["w"], torch.ones(3))


def test_help_lists_exit_codes(cli) -> None:
    out = cli("--help", check=True).stdout
    assert "Exit codes" in out and "mismatch" in out


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_up_to_date(cli, shell: str) -> None:
    names = {"bash": "tvedit.bash", "zsh": "_tvedit", "fish": "tvedit.fish"}
    shipped = Path(__file__).resolve().parents[1] / "completions" / names[shell]
    generated = cli("completions", shell, check=True).stdout
    assert shipped.exists(), f"{shipped} missing: run `make completions`"
    assert shipped.read_text() == generated, f"{shipped.name} is out of date: run `make completions`"
    alpha = "-l alpha" if shell == "fish" else "--alpha"  # fish names long options without dashes
    assert "extract" in generated and alpha in generated


def test_examples_pipeline_and_ci_job(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    proc = cli(shell=f"bash {root}/examples/pipeline.sh base.safetensors ft1.safetensors ft2.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged.safetensors").exists()
    cli("extract", "ft1.safetensors", "ft2.safetensors", "--base", "base.safetensors", "--out-dir", "tv", check=True)
    (tmp_path / "r.yaml").write_text("alpha: 0.3\ninputs: [tv/ft1.tv.safetensors, tv/ft2.tv.safetensors]\n")
    ok = cli(shell=f"bash {root}/examples/ci_job.sh r.yaml built.safetensors")
    assert ok.returncode == 0 and "built built.safetensors" in ok.stdout, ok.stderr
    (tmp_path / "bad.yaml").write_text("inputs: [tv/missing.safetensors]\n")
    bad = cli(shell=f"bash {root}/examples/ci_job.sh bad.yaml b.safetensors")
    assert bad.returncode == 3 and "missing.safetensors" in bad.stderr
    # the shipped recipe parses, with paths relative to itself
    from tvedit.pipeline import resolve_inputs

    recipe = resolve_inputs([str(root / "examples" / "recipe.yaml")])
    assert [s.weight for s in recipe.items] == [1.0, 0.5] and recipe.options["alpha"] == 0.3
    assert Path(recipe.options["base"]).parent == (root / "examples" / ".." / "demo-out" / "arith")  # made by examples/make_inputs.sh


def test_bash_completion_completes(tmp_path: Path) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "completions" / "tvedit.bash"
    out = subprocess.run(
        ["bash", "-c", f"source {script}; COMP_WORDS=(tvedit ext); COMP_CWORD=1; _tvedit; echo ${{COMPREPLY[@]}};"
         f"COMP_WORDS=(tvedit add --alp); COMP_CWORD=2; _tvedit; echo ${{COMPREPLY[@]}}"],  # fmt: skip
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.split("\n")[:2] == ["extract", "--alpha"]
