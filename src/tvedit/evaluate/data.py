"""Evaluation splits of a task, decoded once into tensors (built on ``tvedit.data``).

A ``--task NAME=SOURCE`` names:

* an image task directory with ``train/`` and ``test/`` image folders (one sub-folder per class):
  ``val`` is the held-out split of ``train`` (``tvedit.data.split_indices`` with the fraction, seed
  and cap recorded in the vector's manifest — checked against its ``heldout_sha256``, exit 8 on a
  mismatch — so the very examples fine-tuning held out; the defaults, 10% seed 0, without a
  record), ``test`` is ``test/``. A ``val/`` (or ``validation/``) folder, when present,
  is used as the validation split instead. A directory with neither is one image folder, used as
  the test split (there is then no validation split: the protocols need one);
* a text task (``tvedit.data.text``: a spec, a directory of JSONL files or a JSONL file) for the
  seq2seq and causal-LM families: its ``validation`` and ``test`` splits (a causal LM scores
  examples without choices by exact match of greedy decoding).

Images go through the adapter's eval transform once; the result is kept as one tensor per split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tvedit.errors import DataError, UsageError
from tvedit.evaluate.runner import TaskData
from tvedit.models.base import ModelAdapter


def parse_task_args(items: list[str]) -> dict[str, Path]:
    """['mnist=data/mnist', ...] -> {'mnist': Path('data/mnist')} (a bare DIR is named after it)."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep:
            name, source = Path(item).name, item
        if not name or not source:
            raise UsageError(f"--task expects NAME=DIR, not {item!r}")
        if name in out:
            raise UsageError(f"--task {name!r} given twice")
        out[name] = Path(source)
    return out


def _decode(
    adapter: ModelAdapter, data: Any, indices: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    transform = adapter.transform(train=False)  # type: ignore[attr-defined]
    images = []
    for i in indices:
        with Image.open(data.paths[i]) as im:
            images.append(transform(im))
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return torch.stack(images), labels


def load_task(
    adapter: ModelAdapter,
    name: str,
    source: Path,
    record: Mapping[str, Any] | None = None,
    max_examples: int | None = None,
) -> TaskData:
    """The task's ``val`` and ``test`` splits as tensors, and its head record.

    ``record``: the task record of the vector fine-tuned on this task (its classes and templates
    build the head, exactly as in fine-tuning); otherwise classes come from the folder names and
    templates from ``tvedit.data.resolve_templates(name)``. ``max_examples`` caps each split
    (seeded random subset)."""
    from tvedit.data import text as text_data

    if text_data.is_text_task(source):
        return _load_text_task(name, source, record, max_examples, generative=adapter.family == "hf-causal")
    if not hasattr(adapter, "transform"):
        raise UsageError(
            f"task {name}: {source} is an image task, but the model family {adapter.family} takes text"
        )
    from tvedit.data import load_image_data, resolve_templates

    source = Path(source)
    if not source.is_dir():
        raise DataError(f"task {name}: {source} is not a directory")
    splits: dict[str, tuple[Any, torch.Tensor]] = {}
    classes: list[str] | None = None
    val_dir = next((source / d for d in ("val", "validation") if (source / d).is_dir()), None)
    if (source / "test").is_dir():
        test = load_image_data(source / "test", verify=False)
        classes = test.classes
        splits["test"] = _decode(adapter, test, list(range(len(test))))
        if val_dir is not None:
            val = load_image_data(val_dir, verify=False)
            splits["val"] = _decode(adapter, val, list(range(len(val))))
        elif (source / "train").is_dir():
            train = load_image_data(source / "train", verify=False)
            if train.classes != test.classes:
                raise DataError(f"task {name}: train/ and test/ have different classes")
            splits["val"] = _decode(adapter, train, _heldout(name, len(train), record))
    else:
        test = load_image_data(source, verify=False)
        classes = test.classes
        splits["test"] = _decode(adapter, test, list(range(len(test))))
    recorded = record.get("templates") if record and record.get("classes") else None
    templates = list(recorded) if recorded else resolve_templates(name)  # the fallback warns: only when used
    task = TaskData(name, _record(name, classes, record, templates), splits)
    if max_examples:
        for split in list(task.splits):
            task.limit(split, max_examples)
    return task


def _heldout(name: str, n: int, record: Mapping[str, Any] | None) -> list[int]:
    """The held-out indices of ``train/``: those the vector's fine-tuning held out, rebuilt from its
    manifest's ``task.split`` (fraction, seed, cap) and checked against its ``heldout_sha256``, so
    that alpha is never chosen on training examples; the defaults without a record."""
    import hashlib
    import json

    from tvedit.data import split_indices

    split = (record or {}).get("split")
    if not isinstance(split, Mapping):
        return split_indices(n)[1]
    try:
        _, held = split_indices(n, float(split["heldout_fraction"]), int(split["seed"]), int(split["heldout_max"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"task {name}: the vector's manifest task.split is incomplete ({exc}); cannot rebuild its validation split") from None
    want = split.get("heldout_sha256")
    if want and hashlib.sha256(json.dumps(held).encode()).hexdigest() != want:
        raise DataError(f"task {name}: the held-out split rebuilt from the vector's manifest (fraction {split['heldout_fraction']}, seed {split['seed']}, max {split['heldout_max']}) over {n} train examples does not match its heldout_sha256: is this the data it was fine-tuned on?")
    return held


def _record(
    name: str, classes: list[str], record: Mapping[str, Any] | None, templates: list[str]
) -> dict[str, Any]:
    if record and record.get("classes"):
        if len(record["classes"]) != len(classes):
            raise DataError(
                f"task {name}: the vector was fine-tuned on {len(record['classes'])} classes, the data has {len(classes)}"
            )
        return {
            "name": name,
            "classes": list(record["classes"]),
            "templates": list(record.get("templates") or templates),
        }
    return {"name": name, "classes": classes, "templates": templates}


def _load_text_task(
    name: str, source: Path, record: Mapping[str, Any] | None, max_examples: int | None, generative: bool = False
) -> TaskData:
    """``generative``: a causal LM, which scores examples without choices by exact match of greedy
    decoding (label 1 = match)."""
    from tvedit.data.text import load_text_task

    loaded = load_text_task(source)
    splits: dict[str, tuple[Any, torch.Tensor]] = {}
    exact = False
    for ours, theirs in (("val", "validation"), ("test", "test")):
        if theirs in loaded.splits:
            examples = loaded.splits[theirs]
            unlabelled = [ex.label is None for ex in examples]
            if any(unlabelled) and not (generative and all(unlabelled)):
                raise DataError(
                    f"task {name}: split {theirs} has examples without a label (accuracy needs rank classification"
                    + (", or a target on every example for exact match)" if generative else ")")
                )
            exact = exact or all(unlabelled)
            splits[ours] = (
                list(examples),
                torch.tensor([1 if ex.label is None else ex.label for ex in examples], dtype=torch.long),
            )
    rec: dict[str, Any] = dict(record or {})
    if exact:
        rec["metric"] = "exact_match"
    rec.setdefault("name", name)
    if loaded.choices and "choices" not in rec:
        rec["choices"] = list(loaded.choices)
    task = TaskData(name, rec, splits)
    if max_examples:
        for split in list(task.splits):
            task.limit(split, max_examples)
    return task
