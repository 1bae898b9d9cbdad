"""Text tasks for sequence-to-sequence models: JSONL files, optional YAML task specs, splits.

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

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvedit.errors import DataError

FIELDS = ("input", "target", "choices", "label")
SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 5000
VALIDATION_SEED = 0


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


def split_validation(examples: Sequence[TextExample], fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SEED, max_size: int = VALIDATION_MAX) -> tuple[list[TextExample], list[TextExample]]:
    """(train, validation): a seeded random ``fraction`` (at most ``max_size``) held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max_size, max(1, int(round(fraction * len(examples))))) if len(examples) > 1 else 0
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def load_text_task(source: str | os.PathLike[str], validation_seed: int = VALIDATION_SEED) -> TextTask:
    """A task from a YAML spec, a directory (train/validation/test .jsonl) or one JSONL file.

    A single JSONL file is the train split; the validation split is then held out of it
    (``split_validation``), as it is whenever a spec or directory names no validation file.
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        spec = load_spec(path)
    elif path.is_dir():
        files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").exists()}
        if not files:
            raise DataError(f"{path}: directory has none of train.jsonl, validation.jsonl, test.jsonl")
        spec = TextTaskSpec(name=path.name, files=files)
    elif path.exists():
        spec = TextTaskSpec(name=path.stem, files={"train": path})
    else:
        raise DataError(f"{path}: no such file or directory")
    splits = {s: read_jsonl(p, spec) for s, p in spec.files.items()}
    if "train" in splits and "validation" not in splits:
        splits["train"], splits["validation"] = split_validation(splits["train"], seed=validation_seed)
    return TextTask(spec=spec, splits=splits)


def is_text_task(source: str | os.PathLike[str]) -> bool:
    """Whether a data argument names a text task (a .jsonl file, a spec, or a directory of .jsonl)."""
    path = Path(source)
    if path.suffix == ".jsonl":
        return True
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and any(str(data.get(s, "")).endswith(".jsonl") for s in SPLITS)
    return path.is_dir() and any((path / f"{s}.jsonl").exists() for s in SPLITS)


def batches(examples: Sequence[TextExample], batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[list[TextExample]]:
    """Lists of examples (the text adapter tokenizes them itself)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]
