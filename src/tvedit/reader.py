"""Reading checkpoints: ``open_checkpoint(path)`` accepts a ``.safetensors`` file, a sharded Hugging Face
index (``*.safetensors.index.json``) or a directory holding either. Only the header is parsed up front;
each tensor is read on demand with one positional read straight into its own buffer (no whole-file
mapping, so file pages never count toward the process's resident memory). Sparse- and low-rank-encoded
tensors are decoded on access, so every command sees one logical view. Content hashes (cached).
"""


from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvedit import headers
from tvedit.encodings import (
    DTYPE_TO_ST,
    SEP,
    SPARSE_PARTS,
    ST_TO_DTYPE,
    decode_lowrank,
    decode_sparse,
    unpack_bits,
)
from tvedit.errors import InputError, MismatchError
from tvedit.manifest import METADATA_KEY, Manifest

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
            self._digests[key] = entry_digest(key, DTYPE_TO_ST[info.dtype], info.shape, hashlib.sha256(view[: loc.nbytes]).hexdigest())
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
                    self._digests[key] = entry_digest(key, DTYPE_TO_ST[info.dtype], info.shape, h.hexdigest())
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
def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


entry_digest = headers.entry_digest
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


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Manifest | None]:
    """Read a whole (small) checkpoint into memory as dense tensors."""
    ckpt = open_checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}, ckpt.manifest
