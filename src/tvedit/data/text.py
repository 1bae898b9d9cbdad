"""Text tasks for sequence-to-sequence and causal language models: JSONL files, optional YAML
task specs, splits, and plain-text files for perplexity (``read_texts``).

A JSONL task has one example per line, either

* ``{"input": "...", "choices": ["...", ...], "label": i}`` for rank classification (the model
  scores every choice string given the input; the label's choice is also the training target), or
* ``{"input": "...", "target": "..."}`` for generation-style training.

A YAML task spec (``task.yaml``) names the files and maps other column names::

    name: rotten_tomatoes
    train: train.jsonl           # paths relative to the spec
    validation: val.jsonl        # optional: else 10% of train (seed 0, at most 5,000 examples)
    test: test.jsonl
    columns: {input: text, label: label}   # our field -> the file's column
    choices: [rotten, fresh]     # shared choices; a label may then be an index or a choice string
    template: "review: {input}"  # optional prompt template ({input} and any other column)

Every bad line raises ``DataError`` (exit 8) naming the file and the line number.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvedit.data.splits import (
    HELDOUT_FRACTION,
    HELDOUT_MAX,
    SPLIT_SEED,
    split_indices,
    stream_batches,
)
from tvedit.errors import DataError

FIELDS = ("input", "target", "choices", "label")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TextExample:
    """One example. ``target`` is always set for training (the label's choice when ranked)."""

    input: str
    target: str
    choices: tuple[str, ...] | None = None
    label: int | None = None


@dataclass
class TextTaskSpec:
    """How to read a task's files: column names, shared choices, prompt template."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)  # split -> JSONL path
    columns: dict[str, str] = field(default_factory=dict)  # our field -> file column
    choices: tuple[str, ...] | None = None
    template: str | None = None

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def to_dict(self) -> dict[str, Any]:
        """What a finetune manifest records under ``task`` (enough to rebuild the head)."""
        return {
            "name": self.name,
            "kind": "text",
            "files": {k: str(v) for k, v in self.files.items()},
            "columns": dict(self.columns),
            "choices": list(self.choices) if self.choices else None,
            "template": self.template,
        }


@dataclass
class TextTask:
    """A loaded task: examples per split, and the shared choices (its rank-classification head)."""

    spec: TextTaskSpec
    splits: dict[str, list[TextExample]]
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def choices(self) -> tuple[str, ...] | None:
        """Choices shared by every example (a fixed head), else None (per-example choices)."""
        if self.spec.choices:
            return self.spec.choices
        seen = {ex.choices for exs in self.splits.values() for ex in exs}
        return next(iter(seen)) if len(seen) == 1 and None not in seen else None

    @property
    def ranked(self) -> bool:
        """Whether every example can be rank-classified (has choices and a label)."""
        return all(ex.label is not None for exs in self.splits.values() for ex in exs)

    def split(self, name: str) -> list[TextExample]:
        if name not in self.splits:
            raise DataError(f"task {self.name!r}: no {name!r} split (has {sorted(self.splits)})")
        return self.splits[name]


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def parse_example(record: Any, spec: TextTaskSpec, where: str) -> TextExample:
    """One JSON record -> TextExample, with every problem reported as DataError at ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    col_in = spec.column("input")
    if col_in not in record:
        raise DataError(f"{where}: missing field {col_in!r}")
    text = record[col_in]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {col_in!r} must be a string")
    if spec.template:
        try:
            text = spec.template.format(**{**record, "input": text})
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"{where}: template {spec.template!r} cannot be filled: {exc}") from None

    choices = spec.choices
    col_ch = spec.column("choices")
    if col_ch in record:
        raw = record[col_ch]
        if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) for c in raw):
            raise DataError(f"{where}: field {col_ch!r} must be a list of at least two strings")
        choices = tuple(raw)

    label: int | None = None
    col_lb = spec.column("label")
    if col_lb in record:
        raw_label = record[col_lb]
        if choices is None:
            raise DataError(f"{where}: has a {col_lb!r} but no choices (add {col_ch!r} or shared choices in a task spec)")
        if isinstance(raw_label, bool) or not isinstance(raw_label, (int, str)):
            raise DataError(f"{where}: field {col_lb!r} must be an index or one of the choices")
        if isinstance(raw_label, str):
            if raw_label not in choices:
                raise DataError(f"{where}: label {raw_label!r} is not one of the choices {list(choices)}")
            label = choices.index(raw_label)
        else:
            label = raw_label
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices")

    col_tg = spec.column("target")
    if col_tg in record:
        target = record[col_tg]
        if not isinstance(target, str):
            raise DataError(f"{where}: field {col_tg!r} must be a string")
    elif label is not None and choices is not None:
        target = choices[label]
    else:
        raise DataError(f"{where}: needs either {col_tg!r} or a {col_lb!r} with choices")
    return TextExample(input=text, target=target, choices=choices if label is not None else None, label=label)


def read_jsonl(path: str | os.PathLike[str], spec: TextTaskSpec | None = None) -> list[TextExample]:
    """All examples of one JSONL file (blank lines are skipped)."""
    path = Path(path)
    spec = spec or TextTaskSpec(name=path.stem)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out: list[TextExample] = []
    with handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{_where(path, n)}: not valid JSON: {exc.msg}") from None
            out.append(parse_example(record, spec, _where(path, n)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def load_spec(path: str | os.PathLike[str]) -> TextTaskSpec:
    """A YAML task spec (paths in it are relative to the spec file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a task spec is a YAML mapping")
    unknown = set(data) - {"name", "columns", "choices", "template", *SPLITS}
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)}")
    files = {s: (path.parent / str(data[s])) for s in SPLITS if data.get(s)}
    if not files:
        raise DataError(f"{path}: names no data file (train, validation or test)")
    columns = data.get("columns") or {}
    if not isinstance(columns, dict) or not set(columns) <= set(FIELDS):
        raise DataError(f"{path}: 'columns' maps {list(FIELDS)} to column names")
    choices = data.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2):
        raise DataError(f"{path}: 'choices' must be a list of at least two strings")
    return TextTaskSpec(
        name=str(data.get("name") or path.stem),
        files=files,
        columns={str(k): str(v) for k, v in columns.items()},
        choices=tuple(str(c) for c in choices) if choices else None,
        template=data.get("template"),
    )


def load_text_task(source: str | os.PathLike[str], heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = SPLIT_SEED, heldout_max: int = HELDOUT_MAX) -> TextTask:
    """A task from a YAML spec, a directory (train/validation/test .jsonl) or one JSONL file.

    A single JSONL file is the train split. When no validation file is named, the validation
    split is held out of train exactly as for image tasks (``tvedit.data.split_indices``: a seeded
    10%, at most 5,000 examples), so fine-tuning and evaluation hold out the same examples.
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        spec = load_spec(path)
    elif path.is_dir():
        files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").exists()}
        if not files:
            raise DataError(f"{path}: directory has none of train.jsonl, validation.jsonl, test.jsonl")
        spec = TextTaskSpec(name=path.resolve().name, files=files)
    elif path.exists():
        spec = TextTaskSpec(name=path.stem, files={"train": path})
    else:
        raise DataError(f"{path}: no such file or directory")
    splits = {s: read_jsonl(p, spec) for s, p in spec.files.items()}
    if "train" in splits and "validation" not in splits:
        train = splits["train"]
        kept, held = split_indices(len(train), heldout_fraction, split_seed, heldout_max)
        splits["train"], splits["validation"] = [train[i] for i in kept], [train[i] for i in held]
    return TextTask(spec=spec, splits=splits, source=path)


def read_texts(source: str | os.PathLike[str]) -> list[str]:
    """The documents of a plain-text task, for perplexity: a JSONL file, or a directory's
    test.jsonl (else validation.jsonl). A line is ``{"text": ...}``, or an example whose input and
    target (when it has one) are joined by a space. A bad line, or a file with no non-empty text,
    is a DataError (exit 8) naming the file."""
    path = Path(source)
    if path.is_dir():
        path = next((path / f"{s}.jsonl" for s in ("test", "validation") if (path / f"{s}.jsonl").exists()), path / "test.jsonl")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{_where(path, n)}: not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{_where(path, n)}: expected a JSON object")
        parts = [record["text"]] if "text" in record else [record.get("input"), record.get("target")]
        if not all(p is None or isinstance(p, str) for p in parts) or parts[0] is None:
            raise DataError(f"{_where(path, n)}: needs a string 'text' (or 'input')")
        text = " ".join(p for p in parts if p)
        if text.strip():
            out.append(text)
    if not out:
        raise DataError(f"{path}: no text to measure perplexity on")
    return out


def _is_image_list(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
        record = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "path" in record and "input" not in record


def is_text_task(source: str | os.PathLike[str]) -> bool:
    """Whether a data argument names a text task (a .jsonl file, a spec, or a directory of .jsonl)."""
    path = Path(source)
    if path.suffix == ".jsonl":  # unless it is an image list ({"path": ..., "label": ...} lines)
        return not _is_image_list(path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and any(str(data.get(s, "")).endswith(".jsonl") for s in SPLITS)
    return path.is_dir() and any((path / f"{s}.jsonl").exists() for s in SPLITS)


def fingerprint(task: TextTask) -> str:
    """sha256 over the task's files (and its spec): what a fine-tuned manifest records as its data."""
    h = hashlib.sha256()
    for split in sorted(task.spec.files):
        h.update(split.encode() + b"\0" + task.spec.files[split].read_bytes() + b"\0")
    h.update(json.dumps({k: v for k, v in task.spec.to_dict().items() if k != "files"}, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class TextFinetuneTask:
    """A text task as ``tvedit.finetune.run`` uses it: examples addressed by ``train_idx`` and
    ``heldout_idx`` (the validation split, which TaLoS calibration uses), a manifest record, the
    frozen head (the choice strings) and a seeded, resumable loader of token batches."""

    task: TextTask
    examples: list[TextExample]
    train_idx: list[int]
    heldout_idx: list[int]
    data_sha256: str
    split: dict[str, Any]

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def root(self) -> Path:
        return self.task.source or Path(self.task.name)

    @property
    def data(self) -> TextFinetuneTask:
        """``run.finetune`` records ``task.data.root`` as the data input."""
        return self

    def record(self) -> dict[str, Any]:
        choices = self.task.choices
        return {
            **self.task.spec.to_dict(),
            "choices": list(choices) if choices else None,
            "data": {"source": str(self.root), "sha256": self.data_sha256, "n": len(self.examples)},
            "split": self.split,
        }

    def head(self, adapter: Any) -> Any:
        return adapter.make_head(None, self.record())

    def loader(self, indices: Sequence[int], adapter: Any, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[Any, Any]]:
        """(token batch, labels) for global batch ``start`` on (rank ``rank``'s share of each)."""
        head = self.head(adapter)
        for items in stream_batches(len(indices), batch_size, seed, start, rank, world):
            yield adapter.collate([self.examples[indices[i]] for _, i in items], head)


def load_finetune_task(source: str | os.PathLike[str], *, name: str | None = None, mode: str = "full", heldout_fraction: float = HELDOUT_FRACTION, split_seed: int = SPLIT_SEED, heldout_max: int = HELDOUT_MAX) -> TextFinetuneTask:
    """A text task for fine-tuning: its train and validation splits (the test split is not read)."""
    task = load_text_task(source, heldout_fraction, split_seed, heldout_max)
    if name:
        task.spec.name = name
    if "train" not in task.splits:
        raise DataError(f"{source}: a fine-tuning task needs a train split")
    if mode == "sparse" and not task.ranked:
        raise DataError(f"{source}: TaLoS calibration samples answers from the model's distribution over the choices, but this task has examples without choices")
    train, val = task.splits["train"], task.splits.get("validation", [])
    split = {"seed": split_seed, "heldout_fraction": heldout_fraction, "heldout_max": heldout_max, "n_train": len(train), "n_heldout": len(val)}
    n = len(train)
    return TextFinetuneTask(task, [*train, *val], list(range(n)), list(range(n, n + len(val))), fingerprint(task), split)
