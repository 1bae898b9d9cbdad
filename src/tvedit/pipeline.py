"""How commands chain: input arguments (paths, '-', YAML/JSON-lines recipes) and output targets.

* An input argument ``-`` reads the JSON lines another tvedit command printed (one artifact per
  line, ``{"path": ..., ...}``); a plain path per line works too.
* A ``.yaml``/``.yml``/``.jsonl`` argument is a recipe: a list of inputs with optional per-input
  weights, and optional command defaults (``base``, ``alpha``, ``method``, ...). Paths in a recipe
  are relative to the recipe file.
* When a command is given no ``-o``/``--out-dir`` and its standard output is a pipe, it writes its
  results to the scratch directory (``$TVEDIT_SCRATCH``, default ``~/.cache/tvedit/scratch``) as
  *ephemeral* intermediates named ``STEM.PID-RANDOM.safetensors`` (private to the writing
  process, so concurrent pipelines never share one).
* Who removes an intermediate (safeio.hold / hand_on / release, one registry): its writer holds it
  from the commit and removes it when the command ends unless its JSON line reached the next
  command (a closed pipe: exit 141, see cli/common.py). The command that reads the line holds it
  from then on and removes it when it ends, on every exit path: success (as soon as its own
  output is written), an error, SIGINT/SIGTERM. A command that fails before it read its ``-``
  input reads it then, to remove what it was handed (``drain_stdin``). Set
  ``TVEDIT_KEEP_INTERMEDIATES=1`` to keep them. Only a SIGKILL (or a crash of the interpreter)
  leaves an intermediate that no process holds: ``tvedit clean`` removes those, and
  unheld intermediates written more than a day ago are pruned whenever scratch is written.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from tvedit import safeio
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


def _parse_line(line: str, n: int, where: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if not line.startswith("{"):
        return {"path": line}
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: line {n}: not a JSON artifact line: {exc.msg}") from None


def _parse_lines(text: str, where: str) -> list[dict[str, Any]]:
    return [r for n, line in enumerate(text.splitlines(), 1) if (r := _parse_line(line, n, where)) is not None]


def _claim(spec: InputSpec) -> InputSpec:
    """An ephemeral input in the scratch directory is held by this process from now on, and removed
    when the command ends (safeio.release) unless TVEDIT_KEEP_INTERMEDIATES is set."""
    if spec.ephemeral and in_scratch(spec.path):
        safeio.hold(spec.path, remove=not os.environ.get("TVEDIT_KEEP_INTERMEDIATES"))
    return spec


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


_stdin_done = False  # this process read its standard input to the end


def _stdin_specs(stream: IO[str]) -> list[InputSpec]:
    """The inputs listed on ``stream``, each held (if ephemeral) as soon as its line arrives."""
    global _stdin_done
    specs = []
    for n, line in enumerate(stream, 1):
        record = _parse_line(line, n, "<stdin>")
        if record is not None:
            specs.append(_claim(_record_to_spec(record, "<stdin>", None)))
    _stdin_done = True
    return specs


def drain_stdin(wait: bool = True) -> None:
    """A command that failed (``wait``) or was interrupted before reading all of its ``-`` input
    reads the rest now and removes the intermediates listed there (the previous command handed
    them on): nothing is left behind. ``wait``: read to the end (the previous command's exit);
    else only what has arrived (a signal must not wait)."""
    if _stdin_done or sys.stdin is None or sys.stdin.closed or sys.stdin.isatty():
        return
    if wait:
        lines: Iterable[str] = sys.stdin
    else:
        chunks = []
        try:
            fd = sys.stdin.fileno()
            os.set_blocking(fd, False)
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except (OSError, ValueError):  # nothing (more) there yet, or no real descriptor
            pass
        lines = b"".join(chunks).decode(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            record = _parse_line(line, n, "<stdin>")
            if record is not None:
                _claim(_record_to_spec(record, "<stdin>", None))
        except InputError:
            continue
    safeio.release()


def resolve_inputs(args: list[str], stdin: IO[str] | None = None) -> Inputs:
    """Expand '-' (JSON lines on stdin) and recipes into one ordered list of inputs."""
    result = Inputs()
    if args.count("-") > 1:
        raise UsageError("'-' (standard input) can be given only once")
    for arg in args:
        if arg == "-":
            specs = _stdin_specs(stdin if stdin is not None else sys.stdin)
            if not specs:
                raise InputError("<stdin>: no inputs received (did the previous command fail?)")
            result.items.extend(specs)
            continue
        path = Path(arg)
        if path.suffix in RECIPE_SUFFIXES:
            recipe = read_recipe(path)
            result.items.extend(_claim(spec) for spec in recipe.items)
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


def in_scratch(path: Path) -> bool:
    try:
        return path.resolve().parent == scratch_dir().resolve()
    except OSError:
        return False


def prune_scratch() -> None:
    """Remove intermediates written more than a day ago that no process holds (safeio.unheld_intermediates)."""
    safeio.unheld_intermediates(scratch_dir(), min_age_s=SCRATCH_MAX_AGE_S)


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
        return OutputTarget(ephemeral=True)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir}: --out-dir is not a directory")
    return OutputTarget(output, out_dir, False, force)


def consume_ephemeral(items: list[InputSpec]) -> None:
    """The output is written: remove the ephemeral inputs this process holds now (not at exit)."""
    safeio.release([s.path for s in items if s.ephemeral])
