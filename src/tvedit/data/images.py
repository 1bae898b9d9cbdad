"""Image classification data: an image folder (one sub-folder per class) or a CSV/JSONL list of
``path,label``; validated up front (DataError, exit 8) so that bad data fails before training."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tvedit.errors import DataError, UsageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageData:
    """A labelled list of image files and the readable class names (label i -> classes[i])."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 over (relative path, label, file bytes) of every example and the class names."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for p, y in zip(self.paths, self.labels, strict=True):
            rel = str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
            h.update(f"{rel}\0{y}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()


def _readable_names(names: list[str], mapping_file: Path | None) -> list[str]:
    if mapping_file is None:
        return [n.replace("_", " ") for n in names]
    try:
        text = mapping_file.read_text()
        import yaml

        mapping = json.loads(text) if mapping_file.suffix == ".json" else yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{mapping_file}: not a readable class-name mapping: {exc}") from None
    if isinstance(mapping, list):
        if len(mapping) != len(names):
            raise DataError(f"{mapping_file}: {len(mapping)} names for {len(names)} classes")
        return [str(x) for x in mapping]
    if not isinstance(mapping, dict):
        raise DataError(f"{mapping_file}: expected a mapping folder/label -> name (or a list)")
    return [str(mapping.get(n, n.replace("_", " "))) for n in names]


def _read_list(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    try:
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    rows.append((str(rec["path"]), str(rec["label"])))
        else:
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                    raise DataError(f"{path}: a CSV list needs a header with 'path' and 'label' columns")
                rows = [(r["path"], r["label"]) for r in reader]
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable path,label list: {exc}") from None
    return rows


def load_image_data(source: str | Path, class_names: Path | None = None, verify: bool = True) -> ImageData:
    """An image folder (class = sub-folder name, sorted) or a ``.csv``/``.jsonl`` list of path,label
    (paths relative to the list's folder; labels are class names, or integers)."""
    root = Path(source)
    if not root.exists():
        raise DataError(f"{root}: no such dataset")
    if root.is_dir():
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        names = [d.name for d in folders]
        paths, labels = [], []
        for i, d in enumerate(folders):
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(f)
                    labels.append(i)
        base = root
    elif root.suffix in (".csv", ".jsonl"):
        rows = _read_list(root)
        raw = [lab for _, lab in rows]
        names = sorted(set(raw), key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))  # type: ignore[arg-type]
        index = {n: i for i, n in enumerate(names)}
        base = root.parent
        paths = [Path(p) if Path(p).is_absolute() else base / p for p, _ in rows]
        labels = [index[lab] for lab in raw]
    else:
        raise DataError(f"{root}: expected an image folder or a .csv/.jsonl list of path,label")
    if not paths:
        raise DataError(f"{root}: no images found (expected one sub-folder of images per class)")
    used = sorted(set(labels))
    if len(used) < 2:
        raise DataError(f"{root}: only one class ({names[used[0]]!r}); classification needs at least two")
    if verify:
        verify_images(paths)
    return ImageData(base, paths, labels, _readable_names(names, class_names))


def verify_images(paths: Sequence[Path]) -> None:
    """Every file exists, is non-empty and decodes as an image (header check, fast)."""
    from PIL import Image

    for p in paths:
        try:
            if p.stat().st_size == 0:
                raise DataError(f"{p}: empty image file")
            with Image.open(p) as im:
                im.verify()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise DataError(f"{p}: unreadable image: {exc}") from None


def _mix(seed: int, epoch: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(epoch, index)`` pairs (from splits.stream_batches) or plain indices; the random
    augmentation of an item is seeded by (seed, epoch, index), so it does not depend on worker
    count, order, or on resuming."""

    def __init__(self, data: ImageData, indices: Sequence[int], transform: Callable[[Any], torch.Tensor], seed: int = 0):
        self.data, self.indices, self.transform, self.seed = data, list(indices), transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        j = self.indices[i]
        from PIL import Image

        with Image.open(self.data.paths[j]) as im, torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, j))
            x = self.transform(im)
        return x, self.data.labels[j]


def builtin_templates() -> dict[str, list[str]]:
    text = resources.files("tvedit.data").joinpath("templates.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def resolve_templates(task: str, templates_file: Path | None = None) -> list[str]:
    """--templates FILE (a JSON list or one template per line), else the built-in set of ``task``
    (case-insensitive: mnist, svhn, eurosat, gtsrb, dtd, cars, sun397, resisc45, imagenet), else the
    default "a photo of a {}." with a warning on stderr (once per task name and process)."""
    if templates_file is not None:
        try:
            text = templates_file.read_text()
        except OSError as exc:
            raise UsageError(f"--templates {templates_file}: {exc}") from None
        items = json.loads(text) if text.lstrip().startswith("[") else [t for t in text.splitlines() if t.strip()]
        if not items or not all(isinstance(t, str) and "{}" in t for t in items):
            raise UsageError(f"--templates {templates_file}: need a list of templates each with '{{}}'")
        return list(items)
    sets = builtin_templates()
    key = task.lower().replace("-", "")
    if key not in sets:
        if key not in _WARNED:
            _WARNED.add(key)
            known = ", ".join(k for k in sets if k != "default")
            print(f"warning: task {task!r} has no built-in prompt templates ({known}); using {sets['default'][0]!r} (tvedit finetune --templates FILE chooses others)", file=sys.stderr)
        return list(sets["default"])
    return sets[key]


_WARNED: set[str] = set()  # task names whose template fallback was already reported
