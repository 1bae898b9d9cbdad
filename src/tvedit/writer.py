"""Writing checkpoints: ``CheckpointWriter`` writes tensor bytes straight to a temporary file beside the
output (the header is reserved up front and filled in at the end), hashes as it goes, and puts it in
place only when everything succeeded (``tvedit.safeio.commit_file``: fsynced, and exclusive without
--force). A failure or SIGINT/SIGTERM leaves nothing behind; temporaries of killed processes are
removed by the next write to the same directory. Task vectors are encoded sparse where that is
smaller (docs/manifest.md).
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

from tvedit import safeio
from tvedit.encodings import (
    AUTO_SPARSE_DENSITY,
    BLOCK16,
    LOWRANK_PARTS,
    MIN_SPARSE_NUMEL,
    SEP,
    SPARSE_PARTS,
    choose_encoding,
    decode_lowrank,
    encode_parts,
    encode_sparse,
    pack_bits,
    st_dtype,
)
from tvedit.errors import InputError, OutputError
from tvedit.manifest import METADATA_KEY, Manifest
from tvedit.reader import combine_digests, entry_digest, tensor_bytes

CONVERT_NUMEL = 1 << 22  # entries per piece when a chunk-written tensor is re-encoded sparse


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
        self.st = st_dtype(torch.uint8 if self.mask else dtype)
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
        data = tensor_bytes(chunk)
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
        w._digests[self.stored] = entry_digest(self.stored, self.st, self.shape if not self.mask else [self.nbytes], self.h.hexdigest())


class CheckpointWriter(safeio.Transaction):
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
        data = tensor_bytes(tensor)
        st = st_dtype(tensor.dtype)
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
        step = max(BLOCK16, CONVERT_NUMEL // BLOCK16 * BLOCK16)  # whole blocks: pieces start at multiples of 8
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
                    data = tensor_bytes(t)
                    self._fh.write(data)
                    h.update(data)
                    size += len(data)
                st = st_dtype(part_dtype)
                part_shape = [size // part_dtype.itemsize]
                self._digests[stored] = entry_digest(stored, st, part_shape, h.hexdigest())
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
        self._digests[key] = entry_digest(key, st, shape, hashlib.sha256(data).hexdigest())

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
