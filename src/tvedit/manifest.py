"""The manifest: one typed record that rides in every file tvedit writes.

It is stored as a JSON string under the ``tvedit`` key of the safetensors header metadata, so any
safetensors reader sees it (``safe_open(path, "pt").metadata()["tvedit"]``). See docs/manifest.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tvedit.errors import InputError

FORMAT = "tvedit/1"
METADATA_KEY = "tvedit"
KINDS = ("checkpoint", "task-vector", "mask")
REGIMES = ("nonlinear", "linearized")
LAYOUTS = ("dense", "sparse", "lowrank", "mixed")


@dataclass
class Manifest:
    """What a file is, where it came from, and how to rebuild the model it belongs to."""

    kind: str = "checkpoint"
    model: dict[str, Any] = field(default_factory=lambda: {"family": "unknown"})
    regime: str = "nonlinear"
    base: dict[str, Any] | None = None  # {"sha256": ..., "path": ...} of theta_0
    density: float | None = None  # fraction of non-zero (kept) entries, where sparse or a mask
    layout: str = "dense"
    sparse: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-tensor sparse encoding
    task: dict[str, Any] | None = None  # task name, class names, templates (finetune outputs)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    sha256: str | None = None  # content hash of the stored tensors (see reader.content_hash)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"manifest: unknown kind {self.kind!r} (expected one of {KINDS})")
        if self.regime not in REGIMES:
            raise InputError(f"manifest: unknown regime {self.regime!r} (expected one of {REGIMES})")
        if self.layout not in LAYOUTS:
            raise InputError(f"manifest: unknown layout {self.layout!r}")

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<manifest>") -> Manifest:
        if not isinstance(data, dict):
            raise InputError(f"{source}: manifest is not a JSON object")
        fmt = data.get("format", FORMAT)
        if not str(fmt).startswith("tvedit/"):
            raise InputError(f"{source}: manifest format {fmt!r} is not a tvedit format")
        if fmt != FORMAT:
            raise InputError(f"{source}: manifest format {fmt!r} is newer than this tvedit ({FORMAT})")
        check_fields(data, source)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # pragma: no cover - defensive
            raise InputError(f"{source}: malformed manifest: {exc}") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: manifest is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return str(self.model.get("family", "unknown"))

    def with_step(self, op: str, params: dict[str, Any], inputs: list[dict[str, Any]]) -> Manifest:
        """A copy with one more provenance step appended (the input provenance is kept)."""
        from tvedit.version import __version__

        step = {"op": op, "tvedit": __version__, "params": params, "inputs": inputs}
        data = self.to_dict()
        data["provenance"] = [*self.provenance, step]
        data["sha256"] = None
        return Manifest.from_dict(data)


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _problem(name: str, value: Any) -> str | None:
    """What is wrong with one manifest field's value (its type and range), or None."""
    if name in ("kind", "regime", "layout", "format"):
        return None if isinstance(value, str) else "not a string"
    if name == "model":
        if not isinstance(value, dict):
            return "not an object"
        return None if _optional_str(value.get("family")) else "family is not a string"
    if name == "base":
        if value is None:
            return None
        if not isinstance(value, dict):
            return "not an object or null"
        return None if _is_sha256(value.get("sha256")) and _optional_str(value.get("path")) else "needs sha256 (64 hex digits) and path (a string or null)"
    if name == "density":
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1)
        return None if ok else "not a number in [0, 1] or null"
    if name == "sparse":  # each record is checked against the stored parts (headers.logical_entries)
        return None if isinstance(value, dict) else "not a map of key to record"
    if name == "task":
        return None if value is None or isinstance(value, dict) else "not an object or null"
    if name == "provenance":
        return None if isinstance(value, list) and all(isinstance(s, dict) for s in value) else "not a list of objects"
    if name == "sha256":
        return None if value is None or _is_sha256(value) else "not 64 lowercase hex digits or null"
    return None


def check_fields(data: dict[str, Any], source: str) -> None:
    """Check every field's type and range before use: a file from elsewhere is untrusted input
    (an InputError, exit 3, naming the file and the field)."""
    for name, value in data.items():
        problem = _problem(name, value)
        if problem is not None:
            raise InputError(f"{source}: manifest {name}: {problem}")


def base_ref(sha256: str, path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The ``base`` record: theta0's content hash and its absolute path (a job run from another
    working directory still finds it; the hash, not the path, decides identity)."""
    return {"sha256": sha256, "path": os.path.abspath(path) if path else None}


def base_candidates(recorded: str | None, source: str | os.PathLike[str]) -> list[Path]:
    """Where the base that ``source`` (a task vector) records may be, existing paths only, in order:
    the recorded path (a relative one, as older files hold: against the working directory, then
    against ``source``'s directory), then a file of the same name beside ``source`` (a folder moved
    or copied with its base). The caller checks each candidate's hash."""
    if not recorded:
        return []
    rec, here = Path(recorded), Path(source).parent
    order = [rec] if rec.is_absolute() else [rec, here / rec]
    order.append(here / rec.name)
    found: list[Path] = []
    for p in order:
        if p.exists() and not any(os.path.samefile(p, q) for q in found):
            found.append(p)
    return found
