"""Manifest round-trip, content hashing, sharded inputs, atomic writes, bit packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tvedit.encodings import pack_bits, unpack_bits
from tvedit.errors import InputError, OutputError
from tvedit.manifest import Manifest
from tvedit.reader import content_hash, open_checkpoint
from tvedit.writer import CheckpointWriter, save_tensors


def test_manifest_roundtrip_through_file(tmp_path: Path) -> None:
    m = Manifest(kind="task-vector", model={"family": "open_clip", "architecture": "ViT-B-32"}, regime="linearized",
                 base={"sha256": "a" * 64, "path": "/x/base.safetensors"}, task={"name": "mnist", "classes": ["0", "1"]})  # fmt: skip
    m = m.with_step("extract", {"alpha": 0.5}, [{"path": "ft.safetensors", "sha256": "b" * 64}])
    art = save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(3)}, m)
    with safe_open(str(art.path), "pt") as f:  # plain safetensors sees the manifest
        raw = json.loads(f.metadata()["tvedit"])
    back = open_checkpoint(art.path).manifest
    assert back is not None and raw == back.to_dict()
    for field in ("kind", "model", "regime", "base", "task"):
        assert getattr(back, field) == getattr(m, field)
    assert back.provenance[-1]["op"] == "extract" and back.provenance[-1]["params"] == {"alpha": 0.5}
    assert back.sha256 == content_hash(open_checkpoint(art.path))
    assert Manifest.from_json(back.to_json()).to_dict() == back.to_dict()


def test_content_hash_ignores_metadata_and_order(tmp_path: Path) -> None:
    t = {"b": torch.arange(4.0), "a": torch.ones(2, 2)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"foo": "1"})
    save_file(dict(reversed(list(t.items()))), str(tmp_path / "y.safetensors"))
    hx, hy = (content_hash(open_checkpoint(tmp_path / n)) for n in ("x.safetensors", "y.safetensors"))
    assert hx == hy
    t["a"][0, 0] = 2
    save_file(t, str(tmp_path / "z.safetensors"))
    assert content_hash(open_checkpoint(tmp_path / "z.safetensors")) != hx


def test_sharded_index_reads_as_one(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(tmp_path)  # a directory resolves to its index
    assert ckpt.keys() == ["a", "b"] and torch.equal(ckpt.get("b"), torch.zeros(3))


def test_writer_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError), CheckpointWriter(out, Manifest(), ["a", "b"]) as w:
        w.write("a", torch.ones(2))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp file left
    save_tensors(out, {"a": torch.ones(2)}, Manifest())
    with pytest.raises(OutputError, match="already exists"):
        save_tensors(out, {"a": torch.ones(2)}, Manifest())
    with pytest.raises(OutputError, match="same file as an input"):
        save_tensors(out, {"a": torch.ones(2)}, Manifest(), force=True, inputs=[out])


def test_background_writes_keep_order_and_the_callers_buffer_is_free(tmp_path: Path) -> None:
    """Large tensors go through the writer thread from a copy: reusing the caller's buffer at once
    (as the streaming commands do) must not change what lands in the file."""
    buf = torch.empty(1 << 19)  # 2 MiB: above ASYNC_MIN_BYTES
    expect = {}
    with CheckpointWriter(tmp_path / "o.safetensors", Manifest(), [f"k{i}" for i in range(6)]) as w:
        for i in range(6):
            buf.fill_(float(i))
            expect[f"k{i}"] = buf.clone()
            w.write(f"k{i}", buf if i % 2 else buf[:5])  # large and small writes interleaved
        art = w.commit()
    got = open_checkpoint(art.path)
    for i in range(6):
        ref = expect[f"k{i}"] if i % 2 else expect[f"k{i}"][:5]
        assert torch.equal(got.get(f"k{i}"), ref)
    assert art.manifest.sha256 == content_hash(got)


def test_background_write_error_surfaces_and_leaves_nothing(tmp_path: Path) -> None:
    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            if len(data) >= CheckpointWriter.ASYNC_MIN_BYTES:
                raise OSError(28, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    # a full disk is an output error (exit 6) naming the output, and leaves nothing
    with pytest.raises(OutputError, match=r"o\.safetensors: cannot write: No space left"), CheckpointWriter(tmp_path / "o.safetensors", Manifest(), ["a", "b"]) as w:
        w._fh = Full(w._fh)
        w.write("a", torch.zeros(1 << 19))
        w.write("b", torch.zeros(3))
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_writer_without_key_plan_still_valid(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "o.safetensors", Manifest(), None) as w:
        w.write("a", torch.arange(5.0))
        art = w.commit()
    assert torch.equal(open_checkpoint(art.path).get("a"), torch.arange(5.0))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_bits_roundtrip(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, (n,)), mask)
    import numpy as np

    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))  # documented: numpy.packbits order


@pytest.mark.parametrize(
    "content, message",
    [(b"", "too short"), (b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "not JSON"), (b"\xff" * 8 + b"{}", "bad header length")],
)
def test_not_safetensors(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message):
        open_checkpoint(p)


def test_truncated(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(100)}, str(p))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated"):
        open_checkpoint(p)
