"""Tiny random Hugging Face directories (no download): a Llama causal LM with a WordLevel tokenizer,
and fine-tuned copies of any saved directory (perturbed weights, same config and tokenizer files)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

LLAMA_CONFIG = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def write_tokenizer(path: Path) -> None:
    """A WordLevel tokenizer saved through PreTrainedTokenizerFast (tokenizer.json + config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(path))


def write_bpe_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer over the characters of WORDS (``w`` and digits, one merge "Ġw"),
    for architectures whose tokenizer class rebuilds a BPE from tokenizer.json (transformers 5's
    Qwen2Tokenizer drops a WordLevel vocabulary, and every word would encode to no tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "Ġ", "w", *"0123456789", "Ġw"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "w")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(path))


def write_tiny_llama(path: str | Path, seed: int = 0, dtype: str = "bfloat16", **overrides: object) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_CONFIG, **overrides})).to(getattr(torch, dtype))
    model.save_pretrained(str(path))
    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=8).save_pretrained(str(path))
    write_tokenizer(path)
    return path


def finetuned_copy(base: str | Path, out: str | Path, seed: int, scale: float = 0.05) -> Path:
    """Copy a Hugging Face directory with every floating tensor perturbed (a stand-in fine-tune)."""
    import torch
    from safetensors.torch import load_file, save_file

    base, out = Path(base), Path(out)
    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(out.glob("*.safetensors")):
        state = load_file(str(f))
        for k, v in sorted(state.items()):
            if v.is_floating_point():
                state[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
        save_file(state, str(f), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Hugging Face libraries offline and torch on one thread for a test module (use it autouse)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_cli(*args: object) -> tuple[int, str, str]:
    """The CLI in-process (no subprocess start-up): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from tvedit.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def directory_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors files."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
