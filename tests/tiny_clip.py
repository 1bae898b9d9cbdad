"""Test helpers: a tiny open_clip config and small image-folder datasets with a learnable signal."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_config(directory: Path, name: str = "tiny-clip") -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """One sub-folder per colour; each image is a noisy patch of its class colour plus a random
    square of another colour (so the task is learnable, not trivial)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLOURS)[:classes]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            other = COLOURS[names[rng.integers(len(names))]]
            x, y = rng.integers(0, size // 2, 2)
            img[y : y + size // 4, x : x + size // 4] = other
            Image.fromarray(img.astype("uint8")).save(root / name / f"{i:03d}.png")
    return root
