"""safetensors headers, file resolution and content hashes without torch.

``tvedit info`` (without ``--tensors``) and the hash cache need only these: they parse headers and
hash raw bytes, so they start in a fraction of the time an ``import torch`` takes. ``tensorio``
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
        raise InputError(f"{path}: not a safetensors file")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise InputError(f"{path}: key {key!r}: malformed safetensors entry") from None
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}")
    return header, 8 + n


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
    ``files`` as (file, absolute offset of its data section, key, header entry); an unknown dtype
    is an InputError naming the file and the key."""
    metadata: dict[str, str] = {}
    entries = []
    for f in files:
        header, data_start = read_header(f)
        for key, info in header.items():
            if key == "__metadata__":
                if len(files) == 1 or not metadata:
                    metadata = dict(info or {})
                continue
            if info.get("dtype") not in ST_ITEMSIZE:
                raise InputError(f"{f}: key {key!r}: unsupported dtype {info.get('dtype')!r}")
            entries.append((f, data_start, key, info))
    return metadata, entries


def summary(path: Path) -> dict[str, Any]:
    """kind, manifest, logical tensor count, parameters, bytes, dtypes and the content hash of a
    file, from its headers (the hash: the manifest's, the cached one, or one pass over the bytes)."""
    from tvedit.manifest import METADATA_KEY, Manifest

    files = resolve_files(path)
    metadata, entries = stored_entries(files)
    stored = {key: (info["dtype"], [int(s) for s in info["shape"]]) for _, _, key, info in entries}
    raw = metadata.get(METADATA_KEY)
    manifest = Manifest.from_json(raw, str(path)) if raw else None
    logical: dict[str, tuple[str, list[int]]] = {}
    layouts: dict[str, int] = {}  # encoding -> number of logical tensors
    hidden: set[str] = set()
    for key, spec in (manifest.sparse if manifest else {}).items():
        enc = spec.get("encoding")
        if enc not in ENCODING_PARTS:
            raise InputError(f"{path}: key {key!r}: unknown encoding {enc!r}")
        for part in ENCODING_PARTS[enc]:
            if f"{key}{SEP}{part}" not in stored:
                raise InputError(f"{path}: key {key!r}: sparse part {part!r} is missing")
            hidden.add(f"{key}{SEP}{part}")
        logical[key] = ("BOOL" if enc == "mask" else stored[f"{key}{SEP}{ENCODING_PARTS[enc][0]}"][0], list(spec["shape"]))
        layouts[enc] = layouts.get(enc, 0) + 1
    for key, value in stored.items():
        if key not in hidden:
            logical[key] = value
            layouts["dense"] = layouts.get("dense", 0) + 1
    dtypes: dict[str, int] = {}
    parameters = logical_bytes = 0
    for key in sorted(logical):
        st, shape = logical[key]
        numel = 1
        for s in shape:
            numel *= s
        parameters += numel
        logical_bytes += numel * ST_ITEMSIZE[st]
        dtypes[ST_NAMES[st]] = dtypes.get(ST_NAMES[st], 0) + 1
    stored_bytes = 0
    for st, shape in stored.values():
        numel = 1
        for s in shape:
            numel *= s
        stored_bytes += numel * ST_ITEMSIZE[st]
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
