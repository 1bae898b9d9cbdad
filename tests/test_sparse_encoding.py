"""block16, the narrow index encoding of sparse tensors, and the older encodings it replaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tvedit.encodings import BLOCK16, decode_sparse, encode_sparse
from tvedit.manifest import METADATA_KEY, Manifest
from tvedit.reader import open_checkpoint
from tvedit.writer import save_tensors


def _sparse(shape: tuple[int, ...], density: float, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)).to(dtype)


@pytest.mark.parametrize("shape", [(300, 40), (3, BLOCK16 + 17), (5 * BLOCK16 + 3,)])
def test_block16_round_trip_across_blocks(shape):
    t = _sparse(shape, 0.01)
    t.view(-1)[BLOCK16 // 2 + 1 :: BLOCK16] = 1.5  # offsets >= 2^15 (stored as negative int16) in every block
    encoding, parts = encode_sparse(t)
    assert encoding == "block16"
    assert parts["offsets"].dtype == torch.int16 and parts["counts"].dtype == torch.int32
    assert parts["counts"].numel() == -(-t.numel() // BLOCK16) and int(parts["counts"].sum()) == int(torch.count_nonzero(t))
    back = decode_sparse(encoding, parts, list(shape), None)
    assert torch.equal(back, t)
    # the positions, by the formula in docs/manifest.md
    block = torch.repeat_interleave(torch.arange(parts["counts"].numel()), parts["counts"].long())
    positions = block * BLOCK16 + (parts["offsets"].long() & 0xFFFF)
    assert torch.equal(positions, t.reshape(-1).nonzero().reshape(-1))


def test_encoding_choice_is_the_smallest():
    assert encode_sparse(_sparse((300, 40), 0.01))[0] == "block16"  # 2 bytes per entry + 4 per block
    assert encode_sparse(_sparse((300, 40), 0.3))[0] == "bitmap"  # 1 bit per position
    huge = torch.zeros(40 * BLOCK16)
    huge[7] = 1.0  # one entry among 40 blocks: an int32 index (4 bytes) beats 40 block counts
    assert encode_sparse(huge)[0] == "indices"


def test_bf16_at_one_percent_is_at_most_three_percent_of_dense(tmp_path):
    tau = {f"l{i}": _sparse((512, 1024), 0.01, seed=i, dtype=torch.bfloat16) for i in range(4)}
    dense = save_tensors(tmp_path / "d.safetensors", tau, Manifest(kind="task-vector"), layout="dense").path
    sparse = save_tensors(tmp_path / "s.safetensors", tau, Manifest(kind="task-vector"), layout="sparse").path
    ratio = sparse.stat().st_size / dense.stat().st_size
    assert ratio <= 0.03, ratio  # int32 indices gave 3 * density + headers
    back = open_checkpoint(sparse)
    assert all(torch.equal(back.get(k), v) for k, v in tau.items())


def test_files_with_int32_index_lists_stay_readable(tmp_path: Path):
    """A file as the previous writer made it (encoding "indices"), built here by hand."""
    t = _sparse((300, 40), 0.01)
    flat = t.reshape(-1)
    positions = flat.nonzero().reshape(-1)
    manifest = Manifest(kind="task-vector", layout="sparse", sparse={"a": {"shape": [300, 40], "encoding": "indices"}})
    path = tmp_path / "old.safetensors"
    save_file({"a::indices": positions.to(torch.int32), "a::values": flat[positions], "b": torch.ones(3)}, str(path),
              metadata={METADATA_KEY: manifest.to_json()})  # fmt: skip
    ckpt = open_checkpoint(path)
    assert ckpt.keys() == ["a", "b"] and torch.equal(ckpt.get("a"), t)
    from tvedit.cli.info_cmds import summarize

    assert summarize(path, tensors=False, verify=False)["tensors"] == 2


def test_block16_file_layout_on_disk(tmp_path):
    t = _sparse((300, 40), 0.01)
    art = save_tensors(tmp_path / "v.safetensors", {"a": t}, Manifest(kind="task-vector"), layout="sparse")
    stored = load_file(str(art.path))
    assert set(stored) == {"a::values", "a::offsets", "a::counts"}
    header_len = int.from_bytes(art.path.read_bytes()[:8], "little")
    header = json.loads(art.path.read_bytes()[8 : 8 + header_len])
    assert header["a::offsets"]["dtype"] == "I16" and header["a::counts"]["dtype"] == "I32"
    assert json.loads(header["__metadata__"][METADATA_KEY])["sparse"]["a"] == {"shape": [300, 40], "encoding": "block16"}
