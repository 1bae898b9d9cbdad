"""How commands chain: input arguments (paths, '-', YAML/JSON-lines recipes) and output targets.

* An input argument ``-`` reads the JSON lines another tvedit command printed (one artifact per
  line, ``{"path": ..., ...}``); a plain path per line works too.
* A ``.yaml``/``.yml``/``.jsonl`` argument is a recipe: a list of inputs with optional per-input
  weights, and optional command defaults (``base``, ``alpha``, ``method``, ...). Paths in a recipe
  are relative to the recipe file.
* When a command is given no ``-o``/``--out-dir`` and its standard output is a pipe, it writes its
  results to the scratch directory (``$TVEDIT_SCRATCH``, default ``~/.cache/tvedit/scratch``) as
  *ephemeral* artifacts, named by content hash. The command that consumes an ephemeral artifact
  deletes it after it has written its own output (set ``TVEDIT_KEEP_INTERMEDIATES=1`` to keep
  them); scratch files older than a day are pruned whenever scratch is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvedit.checks import finite_number
from tvedit.errors import InputError, OutputError, UsageError

RECIPE_SUFFIXES = (".yaml", ".yml", ".jsonl")
SCRATCH_MAX_AGE_S = 24 * 3600


@dataclass
class InputSpec:
    path: Path
    weight: float | None = None
    ephemeral: bool = False
    name: str | None = None  # display stem used to name derived outputs

    @property
    def stem(self) -> str:
        if self.name:
            return self.name
        name = self.path.name
        for suffix in (".safetensors.index.json", ".safetensors"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem


@dataclass
class Inputs:
    items: list[InputSpec] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # defaults from a recipe


def _record_to_spec(rec: Any, where: str, root: Path | None) -> InputSpec:
    if isinstance(rec, str):
        rec = {"path": rec}
    if not isinstance(rec, dict) or "path" not in rec:
        raise InputError(f"{where}: each input needs a 'path'")
    path = Path(os.path.expanduser(str(rec["path"])))
    if root is not None and not path.is_absolute():
        path = root / path
    weight = rec.get("weight")
    if weight is not None:  # a bad value is a usage error (exit 2), as for --weights
        weight = finite_number(weight, f"{where}: input {rec['path']}: weight")
    return InputSpec(path, weight, bool(rec.get("ephemeral", False)), rec.get("name"))


def _parse_lines(text: str, where: str) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: line {n}: not a JSON artifact line: {exc.msg}") from None
        else:
            records.append({"path": line})
    return records


def read_recipe(path: Path) -> Inputs:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read recipe: {exc.strerror or exc}") from None
    stripped = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    root = path.parent
    if stripped and all(ln.lstrip().startswith("{") for ln in stripped):
        return Inputs([_record_to_spec(r, str(path), root) for r in _parse_lines(text, str(path))])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    if isinstance(data, list):
        data = {"inputs": data}
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise InputError(f"{path}: a recipe needs an 'inputs' list")
    items = [_record_to_spec(r, str(path), root) for r in data["inputs"]]
    options = {k: v for k, v in data.items() if k != "inputs"}
    for key in ("base", "mask"):
        if isinstance(options.get(key), str) and not Path(options[key]).is_absolute():
            options[key] = str(root / options[key])
    return Inputs(items, options)


def resolve_inputs(args: list[str], stdin_text: str | None = None) -> Inputs:
    """Expand '-' (JSON lines on stdin) and recipes into one ordered list of inputs."""
    result = Inputs()
    if args.count("-") > 1:
        raise UsageError("'-' (standard input) can be given only once")
    for arg in args:
        if arg == "-":
            text = stdin_text if stdin_text is not None else sys.stdin.read()
            records = _parse_lines(text, "<stdin>")
            if not records:
                raise InputError("<stdin>: no inputs received (did the previous command fail?)")
            result.items.extend(_record_to_spec(r, "<stdin>", None) for r in records)
            continue
        path = Path(arg)
        if path.suffix in RECIPE_SUFFIXES:
            recipe = read_recipe(path)
            result.items.extend(recipe.items)
            for k, v in recipe.options.items():
                result.options.setdefault(k, v)
        else:
            result.items.append(InputSpec(path))
    return result


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def scratch_dir() -> Path:
    root = os.environ.get("TVEDIT_SCRATCH")
    if root:
        path = Path(root)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        path = Path(cache) / "tvedit" / "scratch"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the scratch directory ($TVEDIT_SCRATCH): {exc.strerror or exc}") from None
    return path


def prune_scratch(now: float | None = None) -> None:
    now = time.time() if now is None else now
    for f in scratch_dir().glob("*.safetensors"):
        try:
            if now - f.stat().st_mtime > SCRATCH_MAX_AGE_S:
                f.unlink()
        except OSError:
            pass


@dataclass
class OutputTarget:
    """Where a command's results go: one file (-o), a directory (--out-dir), or scratch (piped)."""

    output: Path | None = None
    out_dir: Path | None = None
    ephemeral: bool = False
    force: bool = False
    hf: Any = None  # hfdir.HFOutput: write Hugging Face directories (named without .safetensors)

    def path_for(self, spec: InputSpec | None, suffix: str, count: int) -> Path:
        if self.output is not None:
            if count > 1:
                raise UsageError(f"-o names one file but there are {count} outputs; use --out-dir")
            return self.output
        stem = spec.stem if spec is not None else "merged"
        name = f"{stem}.{suffix}" if self.hf is not None else f"{stem}.{suffix}.safetensors"
        if self.out_dir is not None:
            return self.out_dir / name
        return scratch_dir() / name


def output_target(output: Path | None, out_dir: Path | None, force: bool, piped: bool) -> OutputTarget:
    if output is not None and out_dir is not None:
        raise UsageError("give either -o/--output or --out-dir, not both")
    if output is None and out_dir is None:
        if not piped:
            raise UsageError("no output given: use -o FILE or --out-dir DIR (or pipe into another tvedit command)")
        prune_scratch()
        return OutputTarget(ephemeral=True, force=True)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir}: --out-dir is not a directory")
    return OutputTarget(output, out_dir, False, force)


def consume_ephemeral(items: list[InputSpec]) -> None:
    """Delete ephemeral inputs after a successful write (unless TVEDIT_KEEP_INTERMEDIATES=1)."""
    if os.environ.get("TVEDIT_KEEP_INTERMEDIATES"):
        return
    scratch = scratch_dir().resolve()
    for spec in items:
        if spec.ephemeral and spec.path.resolve().parent == scratch:
            try:
                spec.path.unlink()
            except OSError:
                pass
