"""safetensors headers, file resolution and content hashes without torch.

``tvedit info`` (without ``--tensors``) and the hash cache need only these: they parse headers and
hash raw bytes, so they start in a fraction of the time an ``import torch`` takes. ``reader``
builds its tensor views on the same functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tvedit import safeio
from tvedit.errors import InputError

# bytes per element of each safetensors dtype tvedit reads
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
            "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # fmt: skip
SEP = "::"
# The stored parts of each encoding of a logical tensor (docs/manifest.md); the first part's dtype is
# the logical dtype (masks: bool).
ENCODING_PARTS = {
    "indices": ("values", "indices"),
    "block16": ("values", "offsets", "counts"),
    "bitmap": ("values", "bitmap"),
    "mask": ("bitmap",),
    "lowrank": ("U", "S", "V"),
}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header (catches truncation before any tensor is read).

    Returns the header and the file offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise InputError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: not a safetensors file (header is not JSON)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = check_header(path, header)
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}")
    return header, 8 + n


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def numel_of(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_header(path: Path, header: dict[str, Any]) -> int:
    """Check a parsed safetensors header against the format before anything uses it: ``__metadata__``
    a map of strings to strings; every other entry ``{"dtype": a dtype tvedit reads, "shape": [n, ...]
    (integers >= 0), "data_offsets": [begin, end]}`` with ``end - begin`` the bytes of that dtype and
    shape. An InputError (exit 3) names the file, the key and the field. Returns the end of the data."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: __metadata__: not a map of strings to strings")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InputError(f"{path}: key {key!r}: malformed safetensors entry (not an object)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_ITEMSIZE:
            raise InputError(f"{path}: key {key!r}: dtype: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise InputError(f"{path}: key {key!r}: shape: {shape!r} is not a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets) or offsets[0] > offsets[1]:
            raise InputError(f"{path}: key {key!r}: data_offsets: {offsets!r} is not [begin, end] with 0 <= begin <= end")
        nbytes = numel_of(shape) * ST_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise InputError(f"{path}: key {key!r}: data_offsets: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype} ({nbytes} needed)")
        end = max(end, offsets[1])
    return end


# --------------------------------------------------------------------------------------------
# Sparse and low-rank records: which stored parts make up each logical tensor
# --------------------------------------------------------------------------------------------
def _part_shapes(enc: str, shape: list[int], spec: dict[str, Any], stored: dict[str, tuple[str, list[int]]], key: str) -> dict[str, list[int] | None]:
    """The shape each stored part must have (None: any 1-D length, checked against the others)."""
    numel = numel_of(shape)
    if enc == "lowrank":
        m, n = shape
        k = spec.get("rank")
        if not _is_count(k):
            raise InputError(f"sparse record {key!r}: rank: {k!r} is not an integer >= 0")
        return {"U": [m, k], "S": [k], "V": [n, k]}
    if enc == "mask":
        return {"bitmap": [-(-numel // 8)]}
    n = stored[f"{key}{SEP}values"][1][0] if len(stored[f"{key}{SEP}values"][1]) == 1 else -1
    if not 0 <= n <= numel:
        raise InputError(f"sparse record {key!r}: values: {stored[f'{key}{SEP}values'][1]} does not fit a tensor of {numel} entries")
    if enc == "indices":
        return {"values": [n], "indices": [n]}
    if enc == "bitmap":
        return {"values": [n], "bitmap": [-(-numel // 8)]}
    return {"values": [n], "offsets": [n], "counts": [-(-numel // (1 << 16))]}  # block16


# the dtype family each stored part must have ("float": any floating dtype, "int": any integer)
_PART_DTYPES = {"values": "any", "indices": "int", "offsets": "int", "counts": "int", "bitmap": ("U8",), "U": "float", "S": "float", "V": "float"}
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_INTS = ("I64", "I32", "I16", "I8", "U8")


def logical_entries(path: Path, sparse: Any, stored: dict[str, tuple[str, list[int]]]) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """The logical tensors of a file from its stored ones (``key: (safetensors dtype, shape)``) and
    the manifest's ``sparse`` records, each record checked first (the one check of the sparse and
    low-rank layouts: Checkpoint and ``tvedit info`` both use it). Returns ``key: (dtype, shape)``
    (a mask's dtype is BOOL, otherwise the first part's) and ``key: encoding`` of encoded keys."""
    if not isinstance(sparse, dict):
        raise InputError(f"{path}: manifest sparse: not a map of key to record")
    logical: dict[str, tuple[str, list[int]]] = {}
    encodings: dict[str, str] = {}
    hidden: set[str] = set()
    for key, spec in sparse.items():
        where = f"{path}: manifest sparse record {key!r}"
        if not isinstance(spec, dict):
            raise InputError(f"{where}: not an object")
        enc, shape = spec.get("encoding"), spec.get("shape")
        if enc not in ENCODING_PARTS:
            raise InputError(f"{where}: unknown encoding {enc!r}")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape) or (enc == "lowrank" and len(shape) != 2):
            raise InputError(f"{where}: shape: {shape!r} is not a list of integers >= 0" + (" of length 2" if enc == "lowrank" else ""))
        for part in ENCODING_PARTS[enc]:
            if f"{key}{SEP}{part}" not in stored:
                raise InputError(f"{where}: sparse part {part!r} is missing")
        try:
            want = _part_shapes(enc, shape, spec, stored, key)
        except InputError as exc:
            raise InputError(f"{path}: manifest {exc}") from None
        for part in ENCODING_PARTS[enc]:
            st, got = stored[f"{key}{SEP}{part}"]
            kinds = _PART_DTYPES[part]
            ok_dtype = kinds == "any" or st in (_FLOATS if kinds == "float" else _INTS if kinds == "int" else kinds)
            if not ok_dtype or got != want[part]:
                raise InputError(f"{where}: stored part {part!r} is {st} {got}, which does not fit the record")
        if enc == "lowrank" and len({stored[f"{key}{SEP}{p}"][0] for p in ENCODING_PARTS[enc]}) != 1:
            raise InputError(f"{where}: the low-rank factors U, S, V differ in dtype")
        hidden.update(f"{key}{SEP}{part}" for part in ENCODING_PARTS[enc])
        logical[key] = ("BOOL" if enc == "mask" else stored[f"{key}{SEP}{ENCODING_PARTS[enc][0]}"][0], list(shape))
        encodings[key] = enc
    for key, value in stored.items():
        if key not in hidden:
            if key in logical:
                raise InputError(f"{path}: key {key!r} is stored both as itself and in a sparse record")
            logical[key] = value
    return logical, encodings


def resolve_files(path: Path) -> list[Path]:
    """The safetensors files behind a file, a sharded index or a model directory."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json"):
            if (path / name).exists():
                return resolve_files(path / name)
        raise InputError(f"{path}: directory has no model.safetensors or model.safetensors.index.json")
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InputError(f"{path}: not a safetensors index (needs a 'weight_map')") from None
        files = [path.parent / s for s in shards]
        for f in files:
            if not f.exists():
                raise InputError(f"{path}: shard {f.name} is missing")
        return files
    return [path]


# --------------------------------------------------------------------------------------------
# Content hash: sha256 over per-tensor records (key, dtype, shape, sha256 of the stored bytes)
# --------------------------------------------------------------------------------------------
def entry_digest(key: str, dtype: str, shape: Iterable[int], data_digest: str) -> bytes:
    return f"{key}\0{dtype}\0{list(shape)}\0{data_digest}\n".encode()


def combine_digests(entries: dict[str, bytes]) -> str:
    """sha256 over per-tensor records sorted by stored key: order-independent content hash."""
    h = hashlib.sha256()
    for key in sorted(entries):
        h.update(entries[key])
    return h.hexdigest()


def file_content_hash(files: Iterable[Path], chunk: int = 16 << 20) -> str:
    """The content hash of stored tensors, straight from the files' bytes (no torch)."""
    entries: dict[str, bytes] = {}
    buf = bytearray(chunk)
    view = memoryview(buf)
    for f in files:
        header, start = read_header(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = (int(x) for x in info["data_offsets"])
                h = hashlib.sha256()
                pos, stop = start + begin, start + end
                while pos < stop:
                    n = os.preadv(fd, [view[: min(chunk, stop - pos)]], pos)
                    if n <= 0:
                        raise InputError(f"{f}: key {key!r}: file ended early (truncated while reading?)")
                    h.update(view[:n])
                    pos += n
                entries[key] = entry_digest(key, info["dtype"], info["shape"], h.hexdigest())
        finally:
            os.close(fd)
    return combine_digests(entries)


def cache_dir() -> Path:
    root = os.environ.get("TVEDIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tvedit")
    return Path(root)


def file_stamp(files: Iterable[Path]) -> str:
    """What the hash cache is keyed by: real path, size, mtime and inode of every file."""
    stats = []
    for f in sorted(set(files)):
        st = f.stat()
        stats.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("|".join(stats).encode()).hexdigest()


def cached_hash(stamp: str) -> str | None:
    try:
        value = (cache_dir() / "hashes" / stamp).read_text().strip()
    except OSError:
        return None
    return value if len(value) == 64 else None


def store_hash(stamp: str, value: str) -> None:
    cache = cache_dir() / "hashes" / stamp
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with safeio.replacing(cache) as tmp:
            tmp.write_text(value)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# A header-only summary (tvedit info without --tensors)
# --------------------------------------------------------------------------------------------
def stored_entries(files: list[Path]) -> tuple[dict[str, str], list[tuple[Path, int, str, dict[str, Any]]]]:
    """The metadata (of the only file, else of the first that has any) and every stored tensor of
    ``files`` as (file, absolute offset of its data section, key, header entry), each header
    checked by ``check_header``."""
    metadata: dict[str, str] = {}
    entries = []
    for f in files:
        header, data_start = read_header(f)
        for key, info in header.items():
            if key == "__metadata__":
                if len(files) == 1 or not metadata:
                    metadata = dict(info)
                continue
            entries.append((f, data_start, key, info))
    return metadata, entries


def summary(path: Path) -> dict[str, Any]:
    """kind, manifest, logical tensor count, parameters, bytes, dtypes and the content hash of a
    file, from its headers (the hash: the manifest's, the cached one, or one pass over the bytes)."""
    from tvedit.manifest import METADATA_KEY, Manifest

    files = resolve_files(path)
    metadata, entries = stored_entries(files)
    stored = {key: (info["dtype"], list(info["shape"])) for _, _, key, info in entries}
    raw = metadata.get(METADATA_KEY)
    manifest = Manifest.from_json(raw, str(path)) if raw else None
    logical, encodings = logical_entries(path, manifest.sparse if manifest else {}, stored)
    layouts: dict[str, int] = {}  # encoding -> number of logical tensors
    for key in logical:
        enc = encodings.get(key, "dense")
        layouts[enc] = layouts.get(enc, 0) + 1
    dtypes: dict[str, int] = {}
    parameters = logical_bytes = 0
    for key in sorted(logical):
        st, shape = logical[key]
        numel = numel_of(shape)
        parameters += numel
        logical_bytes += numel * ST_ITEMSIZE[st]
        dtypes[ST_NAMES[st]] = dtypes.get(ST_NAMES[st], 0) + 1
    stored_bytes = 0
    for st, shape in stored.values():
        stored_bytes += numel_of(shape) * ST_ITEMSIZE[st]
    if manifest and manifest.sha256:
        sha = manifest.sha256
    else:
        stamp = file_stamp(files)
        sha = cached_hash(stamp) or file_content_hash(files)
        store_hash(stamp, sha)
    return {
        "path": str(path),
        "kind": manifest.kind if manifest else "checkpoint",
        "sha256": sha,
        "tensors": len(logical),
        "parameters": parameters,
        "bytes": sum(f.stat().st_size for f in set(files)),
        "dtypes": dtypes,
        "layouts": layouts,
        "storage_ratio": stored_bytes / logical_bytes if logical_bytes else None,
        "density": manifest.density if manifest else None,
        "manifest": manifest.to_dict() if manifest else None,
    }
