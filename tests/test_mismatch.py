"""--force replaces an existing output and nothing else; mixing bases, regimes or model families needs
--allow-mismatch, which the output's manifest records (issue 16 section 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import make_state, perturb


def _one_line(proc) -> str:
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def mixes(cli, ckpts: dict[str, Path], tmp_path: Path) -> dict[str, tuple[str, ...]]:
    """Pairs of task vectors that disagree on exactly one check each."""
    from tvedit.manifest import Manifest
    from tvedit.reader import load_tensors
    from tvedit.writer import save_tensors

    save_file(make_state(7), str(tmp_path / "other.safetensors"))
    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "t1.safetensors", check=True)
    cli("extract", "ft2.safetensors", "--base", "other.safetensors", "-o", "t2o.safetensors", check=True)
    tensors, manifest = load_tensors(tmp_path / "t1.safetensors")
    assert manifest is not None
    data = {**manifest.to_dict(), "sparse": {}, "sha256": None}
    save_tensors(tmp_path / "lin.safetensors", tensors, Manifest.from_dict({**data, "regime": "linearized"}))
    save_tensors(tmp_path / "clip.safetensors", tensors, Manifest.from_dict({**data, "model": {"family": "open_clip"}}))
    save_tensors(tmp_path / "hf.safetensors", {k: v * 2 for k, v in tensors.items()}, Manifest.from_dict({**data, "model": {"family": "hf"}}))
    return {
        "base": ("t1.safetensors", "t2o.safetensors"),
        "regime": ("t1.safetensors", "lin.safetensors"),
        "family": ("clip.safetensors", "hf.safetensors"),
    }


@pytest.mark.parametrize("what", ["base", "regime", "family"])
def test_force_does_not_mix(cli, mixes, tmp_path: Path, what: str) -> None:
    scratch = Path(__import__("os").environ["TVEDIT_SCRATCH"])
    for extra in ((), ("--force",)):
        if extra:
            (tmp_path / "o.safetensors").write_bytes(b"old output")
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = cli("add", *mixes[what], "-o", "o.safetensors", *extra)
        assert proc.returncode == 4, (extra, proc.stderr)
        assert f"--allow-mismatch {what}" in _one_line(proc)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
        assert not list(scratch.glob("*")) if scratch.exists() else True
    assert (tmp_path / "o.safetensors").read_bytes() == b"old output"
    # the explicit flag mixes; --force replaces the existing output; the manifest records the flag
    proc = cli("add", *mixes[what], "--allow-mismatch", what, "-o", "o.safetensors", "--force", check=True)
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert record["manifest"]["provenance"][-1]["params"]["allow_mismatch"] == [what]
    from tvedit.reader import open_checkpoint

    assert open_checkpoint(tmp_path / "o.safetensors").manifest.provenance[-1]["params"]["allow_mismatch"] == [what]


def test_allow_mismatch_result_and_other_checks(cli, mixes, ckpts: dict[str, Path], tmp_path: Path) -> None:
    # base: the sum is taken against the first vector's base, exactly as the formula says
    cli("add", *mixes["base"], "--allow-mismatch", "base,regime", "-o", "m.safetensors", check=True)
    base, f1, f2 = (load_file(str(ckpts[k])) for k in ("base", "ft1", "ft2"))
    other, m = load_file(str(tmp_path / "other.safetensors")), load_file(str(tmp_path / "m.safetensors"))
    for k, b in base.items():
        if b.is_floating_point():
            torch.testing.assert_close(m[k], b + (f1[k] - b) + (f2[k] - other[k]), atol=1e-5, rtol=0)
    # allowing one check does not switch off another
    proc = cli("add", *mixes["regime"], "t2o.safetensors", "--allow-mismatch", "regime", "-o", "x.safetensors")
    assert proc.returncode == 4 and "--allow-mismatch base" in _one_line(proc)
    # a --base other than the recorded one is a base mismatch too
    proc = cli("add", "t1.safetensors", "--base", "other.safetensors", "-o", "x.safetensors", "--force")
    assert proc.returncode == 4 and "--allow-mismatch base" in _one_line(proc)
    cli("add", "t1.safetensors", "--base", "other.safetensors", "--allow-mismatch", "base", "-o", "x.safetensors", check=True)


@pytest.mark.parametrize("value", ["bases", "base,nope", "force", ""])
def test_unknown_mismatch_word_is_usage_error(cli, ckpts: dict[str, Path], tmp_path: Path, value: str) -> None:
    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "t1.safetensors", check=True)
    for cmd in (("add", "t1.safetensors"), ("extract", "ft1.safetensors", "--base", "base.safetensors")):
        proc = cli(*cmd, "--allow-mismatch", value, "-o", "o.safetensors")
        if value == "":  # an empty list allows nothing: the command runs as without the flag
            assert proc.returncode == 0, proc.stderr
            (tmp_path / "o.safetensors").unlink()
            continue
        assert proc.returncode == 2 and "--allow-mismatch" in _one_line(proc), proc.stderr
        assert not (tmp_path / "o.safetensors").exists()


def test_extract_family_mismatch(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    from tvedit.manifest import Manifest
    from tvedit.writer import save_tensors

    save_tensors(tmp_path / "b.safetensors", make_state(0), Manifest(model={"family": "open_clip"}))
    save_tensors(tmp_path / "f.safetensors", perturb(make_state(0), 1), Manifest(model={"family": "hf"}))
    proc = cli("extract", "f.safetensors", "--base", "b.safetensors", "-o", "t.safetensors", "--force")
    assert proc.returncode == 4 and "--allow-mismatch family" in _one_line(proc)
    assert not (tmp_path / "t.safetensors").exists()
    out = cli("extract", "f.safetensors", "--base", "b.safetensors", "-o", "t.safetensors", "--allow-mismatch", "family", check=True)
    assert json.loads(out.stdout)["manifest"]["provenance"][-1]["params"]["allow_mismatch"] == ["family"]


def test_library_rejects_unknown_words() -> None:
    from tvedit.engine import ArithOptions
    from tvedit.errors import UsageError

    assert ArithOptions(allow_mismatch={"base"}).allow_mismatch == frozenset({"base"})
    with pytest.raises(UsageError, match="unknown check 'everything'"):
        ArithOptions(allow_mismatch="everything")
