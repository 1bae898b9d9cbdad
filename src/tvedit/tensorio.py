"""Streaming safetensors I/O: memory-mapped reads, sparse layouts, incremental atomic writes.

Reading: ``open_checkpoint(path)`` accepts a ``.safetensors`` file, a sharded Hugging Face index
(``*.safetensors.index.json``) or a directory holding either. Only the header is parsed up front;
each tensor is read on demand with one positional read straight into its own buffer (no whole-file
mapping, so file pages never count toward the process's resident memory and peak RSS stays at a few
tensors whatever the model size). Sparse-encoded tensors are decoded to dense on access, so every
command sees one logical view.

Writing: ``CheckpointWriter`` writes tensor bytes straight to a temporary file beside the output
(the header is reserved up front and filled in at the end), hashes as it goes, and puts it in place
only when everything succeeded (``tvedit.safeio.commit_file``: fsynced, and exclusive without
--force). A failure or SIGINT/SIGTERM leaves nothing behind; temporaries of killed processes are
removed by the next write to the same directory.

Sparse layout (docs/manifest.md): a logical tensor ``K`` of shape S may be stored as
``K::values`` (its non-zero entries, row-major order) plus ``K::indices`` (int32/int64 flat
positions), or ``K::offsets`` + ``K::counts`` (block16: int16 positions within blocks of 2^16
entries, and the int32 count per block), or ``K::bitmap`` (uint8, one bit per entry, most
significant bit first); a mask is stored as ``K::bitmap`` alone. The manifest's ``sparse`` map records S and the encoding.

Low-rank layout (docs/manifest.md): a 2-D task-vector tensor ``K`` of shape (m, n) may be stored as
``K::U`` (m, k), ``K::S`` (k,) and ``K::V`` (n, k), meaning U diag(S) V^T; its ``sparse`` record is
``{"shape": [m, n], "encoding": "lowrank", "rank": k}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvedit import headers, safeio
from tvedit.errors import InputError, MismatchError, OutputError
from tvedit.manifest import METADATA_KEY, Manifest

SEP = "::"
DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _st
        ST_TO_DTYPE[_st] = getattr(torch, _name)

# A task-vector tensor whose density is at or below this is stored sparse under layout "auto".
AUTO_SPARSE_DENSITY = 0.5
# Tensors smaller than this are always stored dense (the encoding overhead is not worth it).
MIN_SPARSE_NUMEL = 64


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'fp32' / 'F32' / 'bf16' ... -> torch dtype (floating types only)."""
    table = {
        "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
    }  # fmt: skip
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16, float64") from None


def _st_dtype(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_ST[dtype]
    except KeyError:
        raise InputError(f"dtype {dtype} cannot be stored in safetensors") from None


# --------------------------------------------------------------------------------------------
# Bit packing (masks and bitmap-encoded sparse tensors)
# --------------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bytes, one bit per entry in row-major order, MSB first (numpy.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[:numel].reshape(shape)


# Stored parts of each sparse encoding (docs/manifest.md); files of every encoding stay readable.
SPARSE_PARTS = headers.ENCODING_PARTS  # indices, block16, bitmap, mask, lowrank
BLOCK16 = 1 << 16  # block16: positions are (block of 2^16 entries, 16-bit offset in the block)
_CONVERT_NUMEL = 1 << 22  # entries per piece when a chunk-written tensor is re-encoded sparse


def choose_encoding(nnz: int, numel: int) -> tuple[str, torch.dtype]:
    """The smallest of the index-list, block16 and bitmap encodings for ``nnz`` of ``numel``
    entries (ties: the first listed), and the index dtype of the index-list encoding."""
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    sizes = {
        "block16": 2 * nnz + 4 * -(-numel // BLOCK16),
        "indices": nnz * (4 if index_dtype == torch.int32 else 8),
        "bitmap": (numel + 7) // 8,
    }
    return min(sizes, key=sizes.__getitem__), index_dtype


def encode_parts(encoding: str, parts: Iterable[str], flat: torch.Tensor, start: int, numel: int, index_dtype: torch.dtype = torch.int32) -> dict[str, torch.Tensor]:
    """Stored ``parts`` of ``encoding`` for the entries ``flat`` found at ``start`` of a flattened
    tensor of ``numel`` entries. Parts of consecutive pieces concatenate to the whole tensor's part
    (bitmap: pieces start at multiples of 8), except block16's ``counts``, which add up."""
    nz = flat != 0
    positions = nz.nonzero().reshape(-1) + start if encoding in ("indices", "block16") else None
    out = {}
    for part in parts:
        if part == "values":
            out[part] = flat[nz]
        elif part == "bitmap":
            out[part] = pack_bits(nz)
        elif part == "indices":
            out[part] = positions.to(index_dtype)
        elif part == "counts":
            out[part] = torch.bincount(positions >> 16, minlength=-(-numel // BLOCK16)).to(torch.int32)
        else:  # offsets: the low 16 bits, two's complement
            low = (positions & (BLOCK16 - 1)).to(torch.int32)
            out[part] = torch.where(low >= BLOCK16 // 2, low - BLOCK16, low).to(torch.int16)
    return out


def encode_sparse(tensor: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]]:
    """Pick the smallest of the index-list, block16 and bitmap encodings. Returns (encoding, parts)."""
    flat = tensor.reshape(-1)
    numel = flat.numel()
    encoding, index_dtype = choose_encoding(int(torch.count_nonzero(flat)), numel)
    return encoding, encode_parts(encoding, SPARSE_PARTS[encoding], flat, 0, numel, index_dtype)


def decode_sparse(encoding: str, parts: dict[str, torch.Tensor], shape: list[int], dtype: torch.dtype | None, where: str = "sparse tensor") -> torch.Tensor:
    """The dense tensor of stored parts (their shapes checked by headers.logical_entries); positions
    outside the tensor or a bitmap that does not count the values are an InputError naming ``where``."""
    if encoding == "mask":
        return unpack_bits(parts["bitmap"], shape)
    values = parts["values"]
    numel = 1
    for s in shape:
        numel *= s
    try:
        out = torch.zeros(numel, dtype=values.dtype)
    except (RuntimeError, MemoryError):  # a hostile shape: terabytes for a few stored values
        raise InputError(f"{where}: cannot allocate the {numel} entries of shape {list(shape)}") from None
    if encoding == "indices":
        positions = parts["indices"].long()
    elif encoding == "bitmap":
        bits = unpack_bits(parts["bitmap"], (numel,))
        if int(bits.sum()) != values.numel():
            raise InputError(f"{where}: bitmap marks {int(bits.sum())} entries for {values.numel()} values")
        out[bits] = values
        return out.reshape(shape)
    elif encoding == "block16":
        counts = parts["counts"].long()
        if counts.numel() != -(-numel // BLOCK16) or (counts.numel() and int(counts.min()) < 0) or int(counts.sum()) != values.numel() or parts["offsets"].numel() != values.numel():
            raise InputError(f"{where}: block16 parts do not fit a tensor of shape {list(shape)}")
        block = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        positions = block * BLOCK16 + (parts["offsets"].long() & (BLOCK16 - 1))
    else:
        raise InputError(f"{where}: unknown sparse encoding {encoding!r}")
    if positions.numel() != values.numel() or (positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel)):
        raise InputError(f"{where}: sparse positions fall outside a tensor of shape {list(shape)}")
    out[positions] = values
    return out.reshape(shape)


LOWRANK_PARTS = ("U", "S", "V")


def decode_lowrank(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """U diag(S) V^T, computed in float32 (float64 for float64 factors), in the factors' dtype."""
    u, s, v = (parts[p] for p in LOWRANK_PARTS)
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    return ((u.to(work) * s.to(work)) @ v.to(work).T).to(u.dtype)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Stored:
    file: Path
    start: int  # absolute file offset
    nbytes: int


class Checkpoint:
    """A read-only, memory-mapped, logical (dense) view of one checkpoint or task vector."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._files: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}  # stored key -> file
        self._stored: dict[str, TensorInfo] = {}
        self._loc: dict[str, _Stored] = {}
        metadata, entries = headers.stored_entries(self._resolve_files(self.path))
        for f, data_start, key, info in entries:  # checked by headers.check_header
            dtype = ST_TO_DTYPE.get(info["dtype"])
            if dtype is None:  # a float8 dtype this torch lacks
                raise InputError(f"{f}: key {key!r}: unsupported dtype {info['dtype']!r}")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            self._stored[key] = TensorInfo(shape, dtype)
            self._where[key] = f
            self._loc[key] = _Stored(f, data_start + begin, end - begin)
        self.metadata = metadata
        raw = metadata.get(METADATA_KEY)
        self.manifest: Manifest | None = Manifest.from_json(raw, str(self.path)) if raw else None
        self._sparse = dict(self.manifest.sparse) if self.manifest else {}
        self._sha256: str | None = self.manifest.sha256 if self.manifest else None
        self._digests: dict[str, bytes] | None = None  # per stored key, while hashing as we read
        self._partial: dict[str, tuple[Any, int]] = {}  # key -> (sha256 so far, next byte) for range reads
        self._stamp: str | None = None
        # the hash this file must have and the file that records it: a first-use --base checked at
        # commit (engine.check_base) instead of hashed up front
        self.expected: tuple[str, Path] | None = None
        self._verifying = False  # hashing what is read, to compare with the recorded hash (verify_streamed)
        stored = {key: (info["dtype"], list(info["shape"])) for _, _, key, info in entries}
        logical, _ = headers.logical_entries(self.path, self._sparse, stored)
        self._logical: dict[str, TensorInfo] = {key: TensorInfo(tuple(shape), ST_TO_DTYPE[st]) for key, (st, shape) in logical.items()}

    _resolve_files = staticmethod(headers.resolve_files)

    # -- the logical view -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._logical)

    def __contains__(self, key: str) -> bool:
        return key in self._logical

    def info(self, key: str) -> TensorInfo:
        try:
            return self._logical[key]
        except KeyError:
            raise MismatchError(f"{self.path}: key {key!r} is missing") from None

    def is_floating(self, key: str) -> bool:
        return self.info(key).dtype.is_floating_point

    def is_sparse(self, key: str) -> bool:
        """Stored in any encoding other than itself (sparse or low-rank): ``get`` decodes it."""
        return key in self._sparse

    def encoding(self, key: str) -> str:
        """How a logical key is stored: dense, indices, bitmap, mask or lowrank."""
        return str(self._sparse[key]["encoding"]) if key in self._sparse else "dense"

    def _handle(self, f: Path) -> Any:
        handle = self._files.get(f)
        if handle is None:
            try:
                handle = open(f, "rb", buffering=0)
            except OSError as exc:
                raise InputError(f"{f}: cannot open: {exc.strerror or exc}") from None
            self._files[f] = handle
        return handle

    def _pread(self, key: str, loc: _Stored, view: memoryview, begin: int, nbytes: int) -> None:
        """Positional reads of ``nbytes`` at byte ``begin`` of a stored tensor into ``view``."""
        fh = self._handle(loc.file)
        done = 0
        try:
            while done < nbytes:
                n = os.preadv(fh.fileno(), [view[done:nbytes]], loc.start + begin + done)
                if n <= 0:
                    raise InputError(f"{loc.file}: key {key!r}: file ended early (truncated while reading?)")
                done += n
        except OSError as exc:
            raise InputError(f"{loc.file}: key {key!r}: cannot read: {exc.strerror or exc}") from None

    def _get_stored(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One positional read of the tensor's bytes into ``out`` (same dtype and size) or a new buffer."""
        info, loc = self._stored[key], self._loc[key]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or out.numel() * out.element_size() != loc.nbytes or not out.is_contiguous():
            raise ValueError(f"{key}: output buffer does not match {info.dtype} {list(info.shape)}")
        if loc.nbytes == 0:
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        self._pread(key, loc, view, 0, loc.nbytes)
        if self._digests is not None and key not in self._digests:  # hash while streaming
            self._digests[key] = _entry_digest(key, DTYPE_TO_ST[info.dtype], info.shape, hashlib.sha256(view[: loc.nbytes]).hexdigest())
        return out

    def get_range(self, key: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``start .. start + out.numel()`` of a dense-stored key's flattened tensor, read
        into ``out`` (contiguous, the stored dtype): bounded memory for huge tensors. Consecutive
        ranges from 0 on keep the streamed content hash going."""
        info, loc = self._stored[key], self._loc[key]
        if out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"{key}: range buffer must be contiguous {info.dtype}")
        item = out.element_size()
        begin, nbytes = start * item, out.numel() * item
        if begin < 0 or begin + nbytes > loc.nbytes:
            raise ValueError(f"{key}: range {start}+{out.numel()} is outside the tensor")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        self._pread(key, loc, view, begin, nbytes)
        if self._digests is not None and key not in self._digests:
            h, at = self._partial.pop(key, (None, 0))
            if at == begin:
                h = h or hashlib.sha256()
                h.update(view[:nbytes])
                if begin + nbytes == loc.nbytes:
                    self._digests[key] = _entry_digest(key, DTYPE_TO_ST[info.dtype], info.shape, h.hexdigest())
                else:
                    self._partial[key] = (h, begin + nbytes)
        return out

    def get_mask_range(self, key: str, start: int, count: int) -> torch.Tensor:
        """Entries ``start .. start + count`` (``start`` a multiple of 8) of a mask key stored
        bit-packed, as a flat bool tensor: a huge mask is read a range at a time."""
        if self.encoding(key) != "mask" or start % 8:
            raise ValueError(f"{key}: mask ranges need a bit-packed mask and a start that is a multiple of 8")
        stored = f"{key}{SEP}bitmap"
        first, last = start // 8, -(-(start + count) // 8)
        packed = self.get_range(stored, first, torch.empty(last - first, dtype=torch.uint8))
        return unpack_bits(packed, (count,))

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense tensor for a logical key (decoded if stored sparse).

        ``out``: a contiguous buffer of the stored dtype and size to read into (dense keys only),
        so that streaming loops can reuse memory instead of faulting in new pages for every tensor.
        """
        if key in self._sparse:
            spec = self._sparse[key]
            parts = {}
            for part in SPARSE_PARTS[spec["encoding"]]:
                stored = f"{key}{SEP}{part}"
                if stored in self._stored:
                    parts[part] = self._get_stored(stored)
            if spec["encoding"] == "lowrank":
                return decode_lowrank(parts)
            return decode_sparse(spec["encoding"], parts, list(spec["shape"]), None, f"{self.path}: key {key!r}")
        if key not in self._stored:
            raise MismatchError(f"{self.path}: key {key!r} is missing")
        return self._get_stored(key, out).view(self._stored[key].shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.get(key)

    def stored_nbytes(self) -> int:
        return sum(_nbytes(i) for i in self._stored.values())

    @property
    def kind(self) -> str:
        return self.manifest.kind if self.manifest else "checkpoint"

    @property
    def sha256(self) -> str:
        """Content hash: from the manifest when present, else from the hash cache, else from the
        reads made since ``hash_while_reading()`` (completed by reading the keys nobody read),
        else one pass over the file. Computed hashes are cached by (path, size, mtime, inode)."""
        if self._sha256 is None:
            self._sha256 = self._finish_streamed_hash() if self._digests is not None else cached_content_hash(self)
        return self._sha256

    def known_sha256(self) -> str | None:
        """The content hash if it costs no tensor reads (manifest or hash cache), else None."""
        if self._sha256 is None:
            self._sha256 = headers.cached_hash(headers.file_stamp(self._where.values()))
        return self._sha256

    def hash_while_reading(self) -> bool:
        """Hash every stored tensor as it is read, so a first use needs no separate hashing pass.
        False (nothing to do) when the hash is already known."""
        if self.known_sha256() is not None:
            return False
        if self._digests is None:
            self._digests, self._stamp = {}, headers.file_stamp(self._where.values())
        return True

    def verify_while_reading(self) -> bool:
        """Hash every stored tensor as it is read, to compare with the recorded hash (the manifest's,
        else the hash cache's) in ``verify_streamed``. False when nothing is recorded: then the
        first use hashes the file anyway (``hash_while_reading``)."""
        if self.known_sha256() is None:
            return False
        if self._digests is None:
            self._digests, self._stamp = {}, headers.file_stamp(self._where.values())
        self._verifying = True
        return True

    def verify_streamed(self) -> None:
        """After an operation streamed this file (``verify_while_reading``): the content hash of what
        was read (keys nobody read are read now) equals the recorded one, else InputError."""
        if not self._verifying:
            return
        self._verifying = False
        actual = self._streamed_digest()
        if actual != self._sha256:
            where = "its manifest" if self.manifest is not None and self.manifest.sha256 else "the hash recorded on its first use"
            raise InputError(f"{self.path}: content hash {actual[:12]} does not match {where} ({str(self._sha256)[:12]}): the file was modified or is corrupt")

    def _streamed_digest(self) -> str:
        assert self._digests is not None
        for key in self._stored:
            if key not in self._digests:
                self._get_stored(key)  # a key the operation did not read (e.g. integer buffers)
        value = combine_digests(self._digests)
        self._digests = None
        if headers.file_stamp(self._where.values()) != self._stamp:
            raise InputError(f"{self.path}: changed while it was being read")
        return value

    def _finish_streamed_hash(self) -> str:
        value = self._streamed_digest()
        headers.store_hash(self._stamp, value)  # type: ignore[arg-type]
        return value

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, tensors={len(self._logical)})"


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    return Checkpoint(path)


def _nbytes(info: TensorInfo) -> int:
    numel = 1
    for s in info.shape:
        numel *= s
    return numel * info.dtype.itemsize


# --------------------------------------------------------------------------------------------
# Content hashing
# --------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


_entry_digest = headers.entry_digest
combine_digests = headers.combine_digests


def content_hash(ckpt: Checkpoint) -> str:
    """Recompute the content hash of the stored tensors (independent of file layout and metadata)."""
    return headers.file_content_hash(sorted(set(ckpt._where.values())))


def cached_content_hash(ckpt: Checkpoint) -> str:
    """Content hash of a file without a manifest hash, cached by (real path, size, mtime, inode)."""
    stamp = headers.file_stamp(ckpt._where.values())
    value = headers.cached_hash(stamp)
    if value is None:
        value = content_hash(ckpt)
        headers.store_hash(stamp, value)
    return value


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    """What a command wrote: one JSON line on standard output when piped."""

    path: Path
    manifest: Manifest
    ephemeral: bool = False
    name: str | None = None  # display stem for derived names (scratch names carry a unique suffix)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def sha256(self) -> str:
        assert self.manifest.sha256
        return self.manifest.sha256

    def to_json(self) -> str:
        record = {
            "path": str(self.path),
            "kind": self.kind,
            "sha256": self.sha256,
            "ephemeral": self.ephemeral,
            "name": self.name,
            "manifest": self.manifest.to_dict(),
        }
        return json.dumps(record, sort_keys=True)


@dataclass
class WrittenData:
    """What one file of a (sharded) output holds, once written (CheckpointWriter.finish_data)."""

    digests: dict[str, bytes]  # stored key -> content-hash record
    sparse: dict[str, dict[str, Any]]  # logical key -> sparse encoding
    nonzero: int
    float_numel: int
    nbytes: dict[str, int]  # stored key -> bytes


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse to overwrite an input, or an existing file without force (before any work)."""
    for inp in inputs:
        if _same_file(path, Path(inp)):
            raise OutputError(f"{path}: output is the same file as an input; choose another path")
    if path.exists() and not force:
        raise safeio.exists_error(path)
    if path.exists() and path.is_dir():
        raise OutputError(f"{path}: is a directory")


def layout_of(specs: dict[str, dict[str, Any]], kind: str | None) -> str:
    """The manifest layout of a file from its encoded tensors: dense, sparse, lowrank or mixed
    (a mask's bitmaps are its dense form)."""
    encodings = {spec["encoding"] for spec in specs.values()} - {"mask"}
    if kind == "mask":
        encodings = set()
    return {0: "dense", 1: "sparse", 2: "lowrank", 3: "mixed"}[bool(encodings - {"lowrank"}) + 2 * ("lowrank" in encodings)]


class ChunkSink:
    """One tensor being written piece by piece into a CheckpointWriter (``open_chunks``)."""

    def __init__(self, w: CheckpointWriter, key: str, shape: list[int], dtype: torch.dtype):
        w._begin(key)
        self.w, self.key, self.shape, self.dtype = w, key, shape, dtype
        self.numel = math.prod(shape)
        self.mask = w.manifest.kind == "mask" and dtype == torch.bool  # stored bit-packed
        self.stored = f"{key}{SEP}bitmap" if self.mask else key
        self.st = _st_dtype(torch.uint8 if self.mask else dtype)
        self.nbytes = -(-self.numel // 8) if self.mask else self.numel * dtype.itemsize
        self.start = w._offset
        w._header[self.stored] = {"dtype": self.st, "shape": [self.nbytes] if self.mask else shape, "data_offsets": [self.start, self.start + self.nbytes]}
        w._offset += self.nbytes
        self.h = hashlib.sha256()
        self.done = self.nnz = self.entries = 0
        self.vector = dtype.is_floating_point and w.manifest.kind != "checkpoint"
        self.carry = torch.zeros(0, dtype=torch.bool)  # mask bits after the last whole byte

    def add(self, chunk: torch.Tensor) -> None:
        if chunk.dtype != self.dtype:
            raise ValueError(f"{self.key}: chunk dtype {chunk.dtype} is not {self.dtype}")
        self.entries += chunk.numel()
        if self.vector:
            self.nnz += int(torch.count_nonzero(chunk))
        if self.mask:
            self.nnz += int(chunk.sum())
            bits = torch.cat([self.carry, chunk.reshape(-1)]) if self.carry.numel() else chunk.reshape(-1)
            whole = bits.numel() // 8 * 8
            self.carry = bits[whole:].clone()
            if self.entries == self.numel and self.carry.numel():  # the last piece: pad the last byte
                whole, self.carry = bits.numel(), self.carry[:0]
            chunk = pack_bits(bits[:whole])
        data = _tensor_bytes(chunk)
        self.done += len(data)
        self.w._submit(data, self.h.update)

    def close(self) -> None:
        w = self.w
        if self.done != self.nbytes or self.entries != self.numel:
            raise ValueError(f"{self.key}: chunks hold {self.entries} entries, the shape needs {self.numel}")
        w._drain()
        if self.mask:
            w._nonzero += self.nnz
            w._float_numel += self.numel
            w._sparse[self.key] = {"shape": self.shape, "encoding": "mask"}
        elif self.vector:
            w._nonzero += self.nnz
            w._float_numel += self.numel
            if w._store_sparse(self.nnz, self.numel):
                w._encode_in_place(self.key, self.shape, self.dtype, self.start, self.nnz)
                return
        w._digests[self.stored] = _entry_digest(self.stored, self.st, self.shape if not self.mask else [self.nbytes], self.h.hexdigest())


class CheckpointWriter:
    """Incremental, atomic safetensors writer.

    ``keys`` (the logical keys to be written, any order) lets the writer reserve the header so that
    tensor bytes are written exactly once. Tensors must be written in sorted logical-key order so
    that identical inputs give byte-identical files.

    ``layout``: "dense" stores everything dense; "sparse" stores every floating tensor sparse;
    "auto" stores a floating tensor sparse when its density is at most AUTO_SPARSE_DENSITY (task
    vectors only). Masks (bool tensors in a ``kind: mask`` file) are always bit-packed.

    Large tensors are copied into one of two writer-owned buffers, written by one background
    thread and hashed by another, so the caller may reuse its buffer at once and writing and
    hashing overlap each other and the caller's next reads and arithmetic (sha256 and file writes
    release the GIL). Each thread keeps call order; an error in either surfaces at the next write
    or at commit.
    """

    ASYNC_MIN_BYTES = 1 << 20

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest,
        keys: Iterable[str] | None = None,
        *,
        force: bool = False,
        inputs: Iterable[Path] = (),
        layout: str = "dense",
        ephemeral: bool = False,
    ):
        """``ephemeral``: a scratch intermediate, renamed on commit to STEM.PID-RANDOM.safetensors and
        held (safeio.hold) by this process until it is handed on or removed."""
        if layout not in ("dense", "sparse", "auto"):
            raise ValueError(f"unknown layout {layout!r}")
        self.path = Path(path)
        self.force = force
        check_output(self.path, force, inputs)
        self.manifest = manifest
        self.layout = layout if manifest.kind == "task-vector" else "dense"
        self.ephemeral = ephemeral
        safeio.make_output_dir(self.path.parent)
        safeio.remove_stale(self.path.parent)  # left by killed runs
        self._tmp = safeio.temp_path(self.path)
        safeio.register(self._tmp)
        try:
            self._fh = open(self._tmp, "wb")
        except OSError as exc:
            safeio.unregister(self._tmp)
            raise safeio.cannot_write(self.path, exc) from None
        self._header: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, bytes] = {}
        self._sparse: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self._last_key: str | None = None
        self._nonzero = 0
        self._float_numel = 0
        self._done = False
        self._pools: list[ThreadPoolExecutor] = []  # [writes, hashes]: one thread each, in call order
        self._pending: list[Future[Any]] = []
        self._bufs = [bytearray(), bytearray()]
        self._turn = 0
        key_list = list(keys) if keys is not None else None
        self._reserved = self._estimate_header(key_list) if key_list is not None else 0
        self._fh.seek(8 + self._reserved)

    def _estimate_header(self, keys: list[str]) -> int:
        # Worst case per key: a sparse tensor's three stored entries (block16) plus its manifest record.
        per_key = sum(4 * len(k.encode()) + 400 for k in keys)
        manifest = len(self.manifest.to_json().encode()) * 5 // 4 + 1024
        return ((per_key + manifest) + 7) // 8 * 8

    # -- writing ------------------------------------------------------------------------------
    def _write_stored(self, key: str, tensor: torch.Tensor) -> None:
        data = _tensor_bytes(tensor)
        st = _st_dtype(tensor.dtype)
        shape = list(tensor.shape)
        n = len(data)
        self._header[key] = {"dtype": st, "shape": shape, "data_offsets": [self._offset, self._offset + n]}
        self._offset += n
        self._submit(data, lambda d: self._digest(key, st, shape, d))

    def _submit(self, data: memoryview, hash_job: Any) -> None:
        """Write ``data`` and run ``hash_job(data)``, in call order: large data from a writer-owned
        copy, written by one background thread and hashed by another at the same time, so the
        caller may reuse its buffer at once; small data right here."""
        n = len(data)
        if n < self.ASYNC_MIN_BYTES:
            self._drain()
            self._fh.write(data)
            hash_job(data)
            return
        # this buffer's previous jobs were drained before the jobs now pending were submitted
        if len(self._bufs[self._turn]) < n:
            self._bufs[self._turn] = bytearray(n)
        copy = memoryview(self._bufs[self._turn])[:n]
        copy[:] = data
        self._turn ^= 1
        self._drain()
        if not self._pools:
            self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"tvedit-{name}") for name in ("write", "hash")]
        self._pending = [self._pools[0].submit(self._fh.write, copy), self._pools[1].submit(hash_job, copy)]

    def write_chunks(self, key: str, shape: Iterable[int], dtype: torch.dtype, chunks: Iterable[torch.Tensor]) -> None:
        """Write one tensor given as consecutive pieces of its flattened entries (bounded memory for
        huge tensors; the caller may reuse each piece's buffer at once). The stored bytes are those
        ``write`` would store for the whole tensor: a task-vector tensor that turns out sparse enough
        for the layout is written dense first and re-encoded in place (``_encode_in_place``); a bool
        tensor in a mask file is bit-packed piece by piece."""
        sink = self.open_chunks(key, shape, dtype)
        for chunk in chunks:
            sink.add(chunk)
        sink.close()

    def open_chunks(self, key: str, shape: Iterable[int], dtype: torch.dtype) -> ChunkSink:
        """``write_chunks`` one piece at a time (``add`` each piece in order, then ``close``): lets
        one pass over the inputs feed several writers."""
        return ChunkSink(self, key, list(shape), dtype)

    def _store_sparse(self, nnz: int, numel: int) -> bool:
        """Whether a task-vector tensor with ``nnz`` non-zeros of ``numel`` is stored sparse."""
        if self.manifest.kind == "checkpoint" or numel < MIN_SPARSE_NUMEL:
            return False
        return self.layout == "sparse" or (self.layout == "auto" and nnz / numel <= AUTO_SPARSE_DENSITY)

    def _encode_in_place(self, key: str, shape: list[int], dtype: torch.dtype, start: int, nnz: int) -> None:
        """Replace the dense bytes of ``key`` just written at data offset ``start`` by its sparse
        parts, reading the dense bytes back a piece at a time: the parts are appended after the
        dense bytes (each part one pass), then moved down over them and the file truncated."""
        numel = math.prod(shape)
        item = dtype.itemsize
        encoding, index_dtype = choose_encoding(nnz, numel)
        step = max(BLOCK16, _CONVERT_NUMEL // BLOCK16 * BLOCK16)  # whole blocks: pieces start at multiples of 8
        self._fh.flush()
        fd = os.open(self._tmp, os.O_RDONLY)
        data0 = 8 + self._reserved
        piece = torch.empty(min(step, numel), dtype=dtype)

        def pieces() -> Iterator[tuple[int, torch.Tensor]]:
            for at in range(0, numel, step):
                count = min(step, numel - at)
                view = memoryview(piece[:count].view(torch.uint8).numpy())
                got = os.preadv(fd, [view], data0 + start + at * item)
                if got != count * item:
                    raise OutputError(f"{self._tmp}: short read while re-encoding {key!r}")
                yield at, piece[:count]

        del self._header[key]
        end = start + numel * item
        try:
            self._fh.seek(data0 + end)
            at_out = 0
            for part in sorted(SPARSE_PARTS[encoding]):
                stored = f"{key}{SEP}{part}"
                h, size = hashlib.sha256(), 0
                if part == "counts":  # per-block counts add up over the pieces
                    total = torch.zeros(-(-numel // BLOCK16), dtype=torch.int32)
                    for at, flat in pieces():
                        total += encode_parts(encoding, [part], flat, at, numel, index_dtype)[part]
                    outs: Iterable[torch.Tensor] = [total]
                else:
                    outs = (encode_parts(encoding, [part], flat, pos, numel, index_dtype)[part] for pos, flat in pieces())
                part_dtype = dtype
                for t in outs:
                    part_dtype = t.dtype
                    data = _tensor_bytes(t)
                    self._fh.write(data)
                    h.update(data)
                    size += len(data)
                st = _st_dtype(part_dtype)
                part_shape = [size // part_dtype.itemsize]
                self._digests[stored] = _entry_digest(stored, st, part_shape, h.hexdigest())
                self._header[stored] = {"dtype": st, "shape": part_shape, "data_offsets": [start + at_out, start + at_out + size]}
                at_out += size
            self._fh.flush()
            moved, buf = 0, bytearray(16 << 20)
            view = memoryview(buf)
            while moved < at_out:  # the source lies at_out >= dense bytes ahead: never overwritten
                count = min(len(buf), at_out - moved)
                got = os.preadv(fd, [view[:count]], data0 + end + moved)
                if got != count:
                    raise OutputError(f"{self._tmp}: short read while re-encoding {key!r}")
                os.pwrite(self._fh.fileno(), view[:count], data0 + start + moved)
                moved += count
        finally:
            os.close(fd)
        self._fh.seek(data0 + start + at_out)
        self._fh.truncate()
        self._offset = start + at_out
        self._sparse[key] = {"shape": shape, "encoding": encoding}

    def _digest(self, key: str, st: str, shape: list[int], data: memoryview) -> None:
        self._digests[key] = _entry_digest(key, st, shape, hashlib.sha256(data).hexdigest())

    def _drain(self) -> None:
        """Wait for the background write and hash in flight (re-raising an error of either)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _stop_thread(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._pools = []
        self._bufs = [bytearray(), bytearray()]

    def _begin(self, key: str) -> None:
        if self._done:
            raise RuntimeError("writer is closed")
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"keys must be written in sorted order ({key!r} after {self._last_key!r})")
        if SEP in key:
            raise InputError(f"key {key!r}: '{SEP}' is reserved for tvedit's sparse layout")
        self._last_key = key

    def write_lowrank(self, key: str, factors: Any) -> None:
        """Store a task-vector matrix given as factors (U (m, k), S (k,), V (n, k): U diag(S) V^T) in
        the low-rank layout, or as the dense product when the factors would not be smaller."""
        if self.manifest.kind != "task-vector":
            raise ValueError("the low-rank layout is for task vectors")
        u, s, v = (t.detach().cpu().contiguous() for t in (factors.U, factors.S, factors.V))
        (m, k), n = u.shape, v.shape[0]
        dense = decode_lowrank(dict(zip(LOWRANK_PARTS, (u, s, v), strict=True)))
        if k * (m + n + 1) >= m * n:
            self.write(key, dense)
            return
        self._begin(key)
        self._nonzero += int(torch.count_nonzero(dense))
        self._float_numel += dense.numel()
        for part, t in sorted(zip(LOWRANK_PARTS, (u, s, v), strict=True)):
            self._write_stored(f"{key}{SEP}{part}", t)
        self._sparse[key] = {"shape": [m, n], "encoding": "lowrank", "rank": k}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._begin(key)
        tensor = tensor.detach().cpu()
        if self.manifest.kind == "mask" and tensor.dtype == torch.bool:
            self._nonzero += int(tensor.sum())
            self._float_numel += tensor.numel()
            self._write_stored(f"{key}{SEP}bitmap", pack_bits(tensor))
            self._sparse[key] = {"shape": list(tensor.shape), "encoding": "mask"}
            return
        if tensor.dtype.is_floating_point and self.manifest.kind != "checkpoint":  # density: vectors only
            nnz = int(torch.count_nonzero(tensor))
            self._nonzero += nnz
            self._float_numel += tensor.numel()
            if self._store_sparse(nnz, tensor.numel()):
                encoding, parts = encode_sparse(tensor)
                for part in sorted(parts):
                    self._write_stored(f"{key}{SEP}{part}", parts[part])
                self._sparse[key] = {"shape": list(tensor.shape), "encoding": encoding}
                return
        self._write_stored(key, tensor)

    @property
    def density(self) -> float | None:
        return self._nonzero / self._float_numel if self._float_numel else None

    def finish_data(self) -> WrittenData:
        """Wait for every tensor byte to be written; what a sharded writer needs to build the
        shared manifest of its shards (hfdir.py)."""
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        self._stop_thread()
        sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in self._header.items()}
        return WrittenData(dict(self._digests), dict(self._sparse), self._nonzero, self._float_numel, sizes)

    def commit(self, manifest: Manifest | None = None) -> Artifact:
        """Finish the header, flush, and rename into place. Returns the artifact record.

        ``manifest``: written as is instead of this file's own (the shared manifest of a sharded
        output, whose content hash covers every shard)."""
        self.finish_data()
        if manifest is None:
            data = self.manifest.to_dict()
            data["sparse"] = self._sparse
            data["layout"] = layout_of(self._sparse, self.manifest.kind)
            if self.manifest.kind in ("task-vector", "mask"):
                data["density"] = self.density
            data["sha256"] = combine_digests(self._digests)
            manifest = Manifest.from_dict(data)
        metadata = {METADATA_KEY: manifest.to_json()}
        header = json.dumps({"__metadata__": metadata, **dict(sorted(self._header.items()))}, separators=(",", ":")).encode()
        try:
            if self._reserved and len(header) <= self._reserved:
                header = header + b" " * (self._reserved - len(header))
                self._fh.seek(0)
                self._fh.write(struct.pack("<Q", len(header)))
                self._fh.write(header)
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
            else:  # no (or too small) reservation: rewrite with the header in front
                pad = (-len(header)) % 8
                header = header + b" " * pad
                self._fh.close()
                final = self._tmp.with_name(self._tmp.name + "-final")
                with open(self._tmp, "rb") as src, open(final, "wb") as dst:
                    dst.write(struct.pack("<Q", len(header)))
                    dst.write(header)
                    src.seek(8 + self._reserved)
                    shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(final, self._tmp)
            stem = self.path.name[: -len(".safetensors")] if self.path.name.endswith(".safetensors") else self.path.name
            # an intermediate's name is private to this writer (concurrent pipelines never share one)
            final = self.path.with_name(f"{stem}.{os.getpid()}-{secrets.token_hex(4)}.safetensors") if self.ephemeral else self.path
            safeio.test_hold()
            with safeio.deferred_signals():  # no signal between the rename and the bookkeeping
                lock = safeio.lock_shared(self._tmp) if self.ephemeral else None  # held from the first instant
                try:
                    safeio.commit_file(self._tmp, final, force=self.force)
                except BaseException:
                    if lock is not None:
                        os.close(lock)
                    raise
                self._done = True
                safeio.unregister(self._tmp)
                if lock is not None:  # removed when this command ends, unless handed on (its JSON line printed)
                    safeio.hold(final, fd=lock)
        except BaseException:
            if not self._done:
                self.abort()
            raise
        return Artifact(final, manifest, self.ephemeral, stem if self.ephemeral else None)

    def abort(self) -> None:
        self._done = True
        try:
            self._drain()
        except BaseException:  # noqa: S110 - the error that made us abort is already on its way
            pass
        self._stop_thread()
        try:
            self._fh.close()
        except OSError:
            pass
        for p in (self._tmp, self._tmp.with_name(self._tmp.name + "-final")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        safeio.unregister(self._tmp)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and not self._done:
            self.abort()
        if isinstance(exc, OSError) and exc.errno in safeio.WRITE_ERRNOS:  # e.g. a full disk
            raise safeio.cannot_write(self.path, exc) from None


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    *,
    force: bool = False,
    layout: str = "dense",
    inputs: Iterable[Path] = (),
) -> Artifact:
    """Write an in-memory dict of tensors (small models, fine-tuning outputs) with a manifest."""
    with CheckpointWriter(path, manifest, tensors.keys(), force=force, layout=layout, inputs=inputs) as w:
        for key in sorted(tensors):
            w.write(key, tensors[key])
        return w.commit()


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Manifest | None]:
    """Read a whole (small) checkpoint into memory as dense tensors."""
    ckpt = open_checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}, ckpt.manifest
