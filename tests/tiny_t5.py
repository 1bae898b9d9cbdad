"""A tiny randomly initialised T5 with the byte-level ByT5 tokenizer (no download), and small text
tasks with a learnable rule. Used by tests/test_t5*.py and examples/t5_text_tasks.sh."""

from __future__ import annotations

import json
import random
from pathlib import Path

TINY_CONFIG = dict(
    vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # fmt: skip


def write_tiny_t5(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random T5 + ByT5 tokenizer as a Hugging Face directory."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**TINY_CONFIG))
    model.save_pretrained(str(path))
    ByT5Tokenizer().save_pretrained(str(path))
    return path


def parity_examples(n: int, seed: int = 0, choices: tuple[str, str] = ("even", "odd")) -> list[dict]:
    """Rank classification: is the number of 'x' in a short string even or odd? (learnable rule)"""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice("xy") for _ in range(rng.randint(3, 8)))
        out.append({"input": text, "choices": list(choices), "label": text.count("x") % 2})
    return out


def first_letter_examples(n: int, seed: int = 0) -> list[dict]:
    """Rank classification: does the string start with 'a' or 'b'? (an easy rule)"""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = rng.choice("ab")
        text = first + "".join(rng.choice("abc") for _ in range(rng.randint(2, 6)))
        out.append({"input": text, "choices": ["yes", "no"], "label": 0 if first == "a" else 1})
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_task(root: str | Path, name: str, records: list[dict], n_test: int = 16) -> Path:
    """A task directory: train.jsonl (validation is held out of it) and test.jsonl."""
    root = Path(root) / name
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", records[n_test:])
    write_jsonl(root / "test.jsonl", records[:n_test])
    return root


if __name__ == "__main__":  # used by examples/t5_text_tasks.sh
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "t5-example")
    write_tiny_t5(out / "tiny-t5")
    write_task(out, "first_letter", first_letter_examples(96, seed=1))
    write_task(out, "parity", parity_examples(96, seed=2))
    print(out)
