"""Plain (manifest-less) inputs are hashed during the read the arithmetic does: no second pass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tvedit import arith
from tvedit.errors import InputError
from tvedit.reader import content_hash, open_checkpoint


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.fixture
def plain(tmp_path: Path) -> dict[str, Path]:
    """base + two fine-tuned plain safetensors files of ~8 MiB each (float32 and an integer buffer)."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(512, 1024, generator=g) for i in range(4)}
    base["position_ids"] = torch.arange(77)
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for j in (1, 2):
        paths[f"ft{j}"] = tmp_path / f"ft{j}.safetensors"
        save_file({k: v + 0.01 * j if v.is_floating_point() else v for k, v in base.items()}, str(paths[f"ft{j}"]))
    return paths


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
@pytest.mark.parametrize("op", ["add", "extract"])
def test_first_use_reads_each_input_once_and_records_the_true_hashes(plain, tmp_path, op):
    files = [plain["ft1"], plain["ft2"], plain["base"]]
    total = sum(f.stat().st_size for f in files)
    before = _rchar()
    if op == "add":
        arts = [arith.add([plain["ft1"], plain["ft2"]], tmp_path / "m.safetensors", base=plain["base"], alpha=0.5)]
    else:
        arts = arith.extract([plain["ft1"], plain["ft2"]], plain["base"], arith.OutputTarget(out_dir=tmp_path / "tv"))
    read = _rchar() - before
    # extract reads the base once per output (two outputs): the base's bytes count twice, hashing adds nothing
    expected = total if op == "add" else total + plain["base"].stat().st_size
    assert read < 1.1 * expected, (read, expected)  # a separate hashing pass would add `total`
    truth = {str(f): content_hash(open_checkpoint(f)) for f in files}
    for art in arts:
        inputs = art.manifest.provenance[-1]["inputs"]
        assert inputs and all(rec["sha256"] == truth[rec["path"]] for rec in inputs)
        assert art.manifest.base["sha256"] == truth[str(plain["base"])]
        ckpt = open_checkpoint(art.path)
        assert content_hash(ckpt) == ckpt.manifest.sha256  # the header reservation held the final manifest
    for f in files:  # cached for the next use
        assert open_checkpoint(f).known_sha256() == truth[str(f)]


def test_hash_cache_follows_size_mtime_and_inode(plain, tmp_path):
    a = plain["ft1"]
    first = open_checkpoint(a).sha256
    st = a.stat()
    other = tmp_path / "other.safetensors"
    shutil.copy(plain["ft2"], other)  # same size, different content
    os.replace(other, a)  # a new inode under the same name
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert a.stat().st_size == st.st_size and a.stat().st_ino != st.st_ino
    assert open_checkpoint(a).known_sha256() is None
    assert open_checkpoint(a).sha256 == content_hash(open_checkpoint(plain["ft2"])) != first


def test_a_file_changed_while_streamed_is_refused(plain):
    ckpt = open_checkpoint(plain["ft1"])
    assert ckpt.hash_while_reading()
    ckpt.get("w0")
    st = plain["ft1"].stat()
    os.utime(plain["ft1"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(InputError, match="changed while it was being read"):
        _ = ckpt.sha256


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_a_first_use_base_is_checked_against_the_recorded_hash_without_a_second_read(plain, tmp_path, monkeypatch):
    from tvedit.errors import MismatchError

    tvs = [a.path for a in arith.extract([plain["ft1"], plain["ft2"]], plain["base"], arith.OutputTarget(out_dir=tmp_path / "tv"))]
    copy = tmp_path / "base-copy.safetensors"  # the same tensors under a new name: not in the hash cache
    shutil.copy(plain["base"], copy)
    assert open_checkpoint(copy).known_sha256() is None
    files = [*tvs, copy]
    before = _rchar()
    art = arith.add(tvs, tmp_path / "m.safetensors", base=copy)
    assert _rchar() - before < 1.1 * sum(f.stat().st_size for f in files)  # no separate pass over the base
    assert art.manifest.base["sha256"] == content_hash(open_checkpoint(plain["base"]))

    wrong = tmp_path / "wrong.safetensors"  # a different base seen for the first time
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in open_checkpoint(plain["base"]).items()}, str(wrong))
    with pytest.raises(MismatchError, match="differs from the base"):
        arith.add(tvs, tmp_path / "bad.safetensors", base=wrong)
    assert not (tmp_path / "bad.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "tvedit-tmp" in p.name]
