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
    sha256: str | None = None  # content hash of the stored tensors (see tensorio.content_hash)
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
        from tvedit import __version__

        step = {"op": op, "tvedit": __version__, "params": params, "inputs": inputs}
        data = self.to_dict()
        data["provenance"] = [*self.provenance, step]
        data["sha256"] = None
        return Manifest.from_dict(data)


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
