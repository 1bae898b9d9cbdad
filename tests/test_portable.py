"""Files a user moves around (issue 16 section 5): task vectors used from other working directories
and other folders, the shipped theta0 taken as it is by every command, verification of recorded
content hashes (info --verify, --verify-inputs)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
THETA0 = REPO / "examples" / "theta0" / "tiny_clip.safetensors"


def _one_line(proc) -> str:
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# the base a task vector records
# ---------------------------------------------------------------------------------------------
def test_vector_used_from_another_directory(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "tau.safetensors", check=True)
    from tvedit.reader import open_checkpoint

    recorded = open_checkpoint(tmp_path / "tau.safetensors").manifest.base
    assert recorded["path"] == str(tmp_path / "base.safetensors")  # absolute, although typed relative
    elsewhere = tmp_path / "job"
    elsewhere.mkdir()
    out = cli("add", str(tmp_path / "tau.safetensors"), "--alpha", "0.5", "-o", "m.safetensors", cwd=elsewhere, check=True)
    assert json.loads(out.stdout)["manifest"]["base"]["sha256"] == recorded["sha256"]
    base, ft1, m = (load_file(str(p)) for p in (ckpts["base"], ckpts["ft1"], elsewhere / "m.safetensors"))
    torch.testing.assert_close(m["layer.0.weight"], base["layer.0.weight"] + 0.5 * (ft1["layer.0.weight"] - base["layer.0.weight"]), atol=1e-6, rtol=0)


def test_relative_and_moved_bases_resolve_by_the_vector(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    from tvedit.manifest import Manifest
    from tvedit.reader import load_tensors
    from tvedit.writer import save_tensors

    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "tau.safetensors", check=True)
    tensors, manifest = load_tensors(tmp_path / "tau.safetensors")
    data = {**manifest.to_dict(), "sparse": {}, "sha256": None}
    # a file written before paths were absolute records "base.safetensors" as typed
    save_tensors(tmp_path / "old.safetensors", tensors, Manifest.from_dict({**data, "base": {**data["base"], "path": "base.safetensors"}}))
    job = tmp_path / "job"
    job.mkdir()
    cli("add", str(tmp_path / "old.safetensors"), "-o", "a.safetensors", cwd=job, check=True)
    # a folder moved with its base: the recorded absolute path is gone, the base beside the vector is found
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    moved.mkdir()
    for name in ("tau.safetensors", "base.safetensors"):
        shutil.copy(tmp_path / name, moved / name)
    os.rename(tmp_path / "base.safetensors", tmp_path / "base.gone")
    cli("add", str(moved / "tau.safetensors"), "-o", "b.safetensors", cwd=job, check=True)
    assert (job / "a.safetensors").read_bytes() != b""
    # a file of the same name with other content is not taken for the base: the hash decides
    from safetensors.torch import save_file

    from .conftest import make_state

    save_file(make_state(9), str(moved / "base.safetensors"))
    proc = cli("add", str(moved / "tau.safetensors"), "-o", "c.safetensors", cwd=job)
    assert proc.returncode == 4 and "has changed" in _one_line(proc)
    shutil.rmtree(moved)
    proc = cli("add", str(tmp_path / "tau.safetensors"), "-o", "c.safetensors", cwd=job)
    assert proc.returncode == 3 and "is not there" in _one_line(proc) and not (job / "c.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# content hashes: info --verify and --verify-inputs
# ---------------------------------------------------------------------------------------------
def _flip_last_tensor_byte(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    data[-3] ^= 0x10
    dst.write_bytes(bytes(data))


def test_info_verify_says_what_it_checked(cli, ckpts: dict[str, Path], tmp_path: Path) -> None:
    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "tau.safetensors", check=True)
    _flip_last_tensor_byte(tmp_path / "tau.safetensors", tmp_path / "flip.safetensors")
    plain = json.loads(cli("info", "base.safetensors", "--verify", check=True).stdout)
    assert plain["verified"] is None and "no recorded hash" in plain["checked"]
    good = json.loads(cli("info", "tau.safetensors", "--verify", check=True).stdout)
    assert good["verified"] is True and good["sha256"] in good["checked"]
    bad = cli("info", "flip.safetensors", "--verify")
    assert bad.returncode == 4 and json.loads(bad.stdout)["verified"] is False
    human = cli(shell="script -qec 'tvedit info base.safetensors --verify' /dev/null")
    assert "nothing to verify against" in human.stdout and "yes" not in human.stdout


@pytest.mark.parametrize("chunk_mib", ["2", "0.0001"])  # whole tensors, and ranges read ahead
def test_verify_inputs_refuses_a_bit_flip(cli, ckpts: dict[str, Path], tmp_path: Path, monkeypatch, chunk_mib: str) -> None:
    monkeypatch.setenv("TVEDIT_CHUNK_MIB", chunk_mib)
    cli("extract", "ft1.safetensors", "--base", "base.safetensors", "-o", "tau.safetensors", "--layout", "dense", check=True)
    _flip_last_tensor_byte(tmp_path / "tau.safetensors", tmp_path / "flip.safetensors")
    assert cli("add", "flip.safetensors", "-o", "unchecked.safetensors").returncode == 0  # off by default
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (("add", "flip.safetensors"), ("scale", "flip.safetensors", "--by", "2"), ("negate", "flip.safetensors")):
        proc = cli(*args, "-o", "o.safetensors", "--verify-inputs")
        assert proc.returncode == 3, (args, proc.stderr)
        err = _one_line(proc)
        assert "flip.safetensors" in err and "does not match its manifest" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    # intact inputs pass, with the same bytes as without verification
    cli("add", "tau.safetensors", "-o", "v.safetensors", "--verify-inputs", check=True)
    cli("add", "tau.safetensors", "-o", "u.safetensors", check=True)
    assert (tmp_path / "v.safetensors").read_bytes() == (tmp_path / "u.safetensors").read_bytes()
    # a plain file is checked against the hash cached on its first use: bit rot that keeps the
    # size, the inode and the modification time is found
    shutil.copy(tmp_path / "base.safetensors", tmp_path / "b2.safetensors")
    cli("extract", "ft1.safetensors", "--base", "b2.safetensors", "-o", "t2.safetensors", check=True)
    st = os.stat(tmp_path / "b2.safetensors")
    with open(tmp_path / "b2.safetensors", "r+b") as fh:
        fh.seek(st.st_size - 3)
        byte = fh.read(1)
        fh.seek(st.st_size - 3)
        fh.write(bytes([byte[0] ^ 0x10]))
    os.utime(tmp_path / "b2.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cli("extract", "ft1.safetensors", "--base", "b2.safetensors", "-o", "t3.safetensors").returncode == 0
    proc = cli("extract", "ft1.safetensors", "--base", "b2.safetensors", "-o", "t4.safetensors", "--verify-inputs")
    assert proc.returncode == 3 and "b2.safetensors" in _one_line(proc) and "first use" in proc.stderr
    assert not (tmp_path / "t4.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# the shipped theta0 is a tvedit checkpoint that every command takes as it is
# ---------------------------------------------------------------------------------------------
def test_shipped_theta0_is_a_tvedit_checkpoint(cli, tmp_path: Path) -> None:
    from tvedit.reader import open_checkpoint

    assert THETA0.stat().st_size <= 25 * 1000 * 1000
    ckpt = open_checkpoint(THETA0)
    m = ckpt.manifest
    assert m is not None and m.kind == "checkpoint" and m.family == "open_clip" and m.model["image_size"] == 32
    (step,) = m.provenance
    assert step["op"] == "pretrain" and step["params"]["script"] == "examples/pretrain_tiny_clip.py"
    assert {"seed", "steps", "batch", "lr", "command", "loss"} <= set(step["params"])
    assert set(step["params"]["data"]["tasks"]) >= {"digits", "animals", "letters", "shapes"}
    verified = json.loads(cli("info", str(THETA0), "--verify", check=True).stdout)
    assert verified["verified"] is True


@pytest.mark.slow
def test_shipped_theta0_taken_as_it_is(cli, tmp_path: Path) -> None:
    from .tiny_clip import make_image_folder

    for split in ("train", "test"):
        make_image_folder(tmp_path / "task" / split, classes=3, per_class=4, seed=1 if split == "test" else 0)
    ev = cli("evaluate", str(THETA0), "--task", "t=task", "--device", "cpu", check=True)
    assert json.loads(ev.stdout)["task"] == "t"
    cli("finetune", "-p", str(THETA0), "--train", "task/train", "--steps", "2", "--batch-size", "4", "--warmup", "0",
        "--emit", "vector", "-o", "tau.safetensors", "--device", "cpu", check=True)  # fmt: skip
    from tvedit.reader import open_checkpoint

    tau = open_checkpoint(tmp_path / "tau.safetensors").manifest
    assert tau.base["path"] == str(THETA0) and tau.base["sha256"] == open_checkpoint(THETA0).sha256
    cli("evaluate", "tau.safetensors", "--task", "t=task", "--device", "cpu", check=True)  # its recorded base
    cli("add", "tau.safetensors", "--alpha", "0.5", "-o", "merged.safetensors", check=True)
    cli("init", "--pretrained", str(THETA0), "-o", "theta0.safetensors", check=True)
    assert open_checkpoint(tmp_path / "theta0.safetensors").sha256 == open_checkpoint(THETA0).sha256
