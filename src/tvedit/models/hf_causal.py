"""Hugging Face causal language models (Llama, Mistral, Qwen2, GPT-2, ...): the ``hf-causal`` family.

It shares the seq2seq adapter's machinery (config and tokenizer in the manifest, HF keys with tied
weights once, token batches) and differs in three places:

* the model is ``AutoModelForCausalLM`` (eager attention: fused kernels have no forward-mode AD);
* a choice is scored as lm-eval-harness scores a continuation: the context and context + choice
  are tokenized (no special tokens; the choice is what ``context + continuation`` adds after the
  context's tokens), a BOS token is put in front when the tokenizer has one, and the score is the
  sum of log p(token | everything before it) over the continuation's tokens. A task's
  ``metric: acc_norm`` divides that by the choice's length in characters (lm-eval's ``acc_norm``);
* ``attn`` trains the projections inside the attention blocks, found by module role (every Linear
  or GPT-2 Conv1D whose parent module is named ``*attn*``/``*attention*``: Llama's
  q/k/v/o_proj, GPT-2's c_attn/c_proj); embeddings and the LM head are frozen in every regime unless
  ``train_embeddings`` is set. See docs/llm.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tvedit.data.text import TextExample
from tvedit.errors import DataError, InputError, MismatchError, UsageError
from tvedit.models.base import check_mode, register_adapter
from tvedit.models.hf_seq2seq import (
    DEFAULT_MAX_LENGTH,
    HFSeq2SeqAdapter,
    TokenBatch,
    is_hf_directory,
)

FAMILY = "hf-causal"
ATTENTION_CONTAINERS = ("attn", "attention")  # a projection's parent module name contains one (case-insensitive)
METRICS = ("acc", "acc_norm", "exact_match")


@dataclass(frozen=True)
class ContinuationHead:
    """A text task's frozen head for a causal LM: its shared choices (None: per example) and the
    metric (``acc``: summed log-likelihood; ``acc_norm``: divided by the choice's length in
    characters; ``exact_match``: greedy decoding of a ``target``, scored ``[B, 2]`` = [miss, match])."""

    choices: tuple[str, ...] | None
    metric: str = "acc"


@register_adapter
class HFCausalAdapter(HFSeq2SeqAdapter):
    """An ``AutoModelForCausalLM`` architecture and its tokenizer."""

    family = FAMILY
    encoder_decoder = False  # (from_directory: the seq2seq adapter's, with this kind check)
    wrong_kind = "is an encoder-decoder model (the hf-seq2seq family), not a causal LM"

    def __init__(self, config: Mapping[str, Any], tokenizer: Mapping[str, Any], max_length: int = DEFAULT_MAX_LENGTH, train_embeddings: bool = False):
        super().__init__(config, tokenizer, max_length)
        self.train_embeddings = bool(train_embeddings)

    def model_info(self) -> dict[str, Any]:
        return {**super().model_info(), "family": FAMILY, "train_embeddings": self.train_embeddings}

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> HFCausalAdapter:
        if "config" not in info or "tokenizer" not in info:
            raise InputError("hf-causal model info needs 'config' and 'tokenizer'")
        return cls(info["config"], info["tokenizer"], info.get("max_length", DEFAULT_MAX_LENGTH), bool(info.get("train_embeddings", False)))

    # -- building --------------------------------------------------------------------------------
    @staticmethod
    def auto_class() -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    # -- which tensors train -----------------------------------------------------------------------
    def _frozen(self) -> set[str]:
        """Embeddings (token and position) and the LM head, unless train_embeddings."""
        if self.train_embeddings:
            return set()
        skel = self._skeleton
        names = {f"{n}.weight" for n, m in skel.named_modules() if isinstance(m, nn.Embedding)}
        out = skel.get_output_embeddings()
        if out is not None:
            names |= {n for n, p in skel.named_parameters() if p is out.weight}
        return names

    def trainable_keys(self, mode: str, *, attn_bias: bool = False) -> list[str]:
        check_mode(mode)
        params = {n for n, _ in self._skeleton.named_parameters()}
        if mode in ("full", "linearized"):
            return sorted(params - self._frozen())
        if mode == "attn":
            kinds = ("weight", "bias") if attn_bias else ("weight",)
            return sorted(f"{m}.{kind}" for m in self.attention_projections() for kind in kinds if f"{m}.{kind}" in params)
        return self.maskable_keys()

    def attention_projections(self) -> list[str]:
        """Linear / Conv1D modules directly inside a module named *attn* or *attention*."""
        from transformers.pytorch_utils import Conv1D

        out = []
        for name, mod in self._skeleton.named_modules():
            parent = name.rpartition(".")[0].rpartition(".")[2].lower()
            if isinstance(mod, (nn.Linear, Conv1D)) and any(c in parent for c in ATTENTION_CONTAINERS):
                out.append(name)
        if not out:
            raise MismatchError(f"hf-causal: cannot tell the attention projections of {type(self._skeleton).__name__} (no Linear inside a module named *attn* or *attention*); use --mode full")
        return out

    def maskable_keys(self) -> list[str]:
        """Every Linear / Conv1D weight and bias and every norm, except the frozen embeddings and head."""
        from transformers.pytorch_utils import Conv1D

        frozen = self._frozen() if not self.train_embeddings else set()
        out = []
        for name, mod in self._skeleton.named_modules():
            norm = "norm" in type(mod).__name__.lower()
            if isinstance(mod, (nn.Linear, Conv1D)) or norm:
                out += [f"{name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
        params = {n for n, _ in self._skeleton.named_parameters()}
        return sorted(k for k in set(out) if k in params and k not in frozen and k not in self._output_keys())

    def _output_keys(self) -> set[str]:
        skel = self._skeleton
        out = skel.get_output_embeddings()
        return {n for n, p in skel.named_parameters() if out is not None and p is out.weight}

    # -- head and scoring ------------------------------------------------------------------------
    def make_head(self, model: nn.Module | None, task: Mapping[str, Any]) -> ContinuationHead:
        """The shared choices of a text task and its metric (``model`` is not used)."""
        metric = str(task.get("metric") or "acc")
        if metric not in METRICS:
            raise UsageError(f"--metric {metric!r}: a causal LM's choice tasks are scored by {' or '.join(METRICS)}")
        choices = task.get("choices")
        return ContinuationHead(tuple(str(c) for c in choices) if choices else None, metric)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval-harness's _encode_pair: (context tokens, continuation tokens), where the
        continuation's tokens are those tokenizing context + continuation adds after the context's
        (trailing spaces of the context move to the continuation); a BOS token leads the context
        when the tokenizer has one (the end-of-text token when the context is empty and it has none)."""
        tok = self.tokenizer
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx) :]
        if whole[: len(ctx)] != ctx or not cont:  # the boundary merged into one token: tokenize apart
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
        lead = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id if not ctx else None)
        return ([lead] if lead is not None else []) + ctx, cont

    def collate(self, examples: Sequence[TextExample], head: ContinuationHead | None = None) -> tuple[TokenBatch, Tensor]:
        """Examples -> (rows, labels). A batch holds ``input_ids`` / ``cont`` ``[B, C, L]`` (the tokens of
        context + choice, right-padded, and a mask of the choice's tokens), ``valid`` ``[B, C]`` and
        ``chars`` ``[B, C]`` (each choice's length in characters). The choices are the head's, else
        each example's own; an example without choices scores its ``target`` (C = 1)."""
        if not examples:
            raise UsageError("an empty batch")
        shared = head.choices if head is not None else None
        rows: list[list[str]] = []
        for ex in examples:
            if shared is not None:
                if ex.label is None:
                    raise UsageError("an example without choices in a task with shared choices")
                rows.append(list(shared))
            else:
                rows.append(list(ex.choices) if ex.choices else [ex.target])
        width = max(len(r) for r in rows)
        seqs: list[list[tuple[list[int], list[int]]]] = []
        for ex, choices in zip(examples, rows, strict=True):
            seqs.append([self._fit(*self.encode_pair(ex.input, " " + c if ex.input and not c.startswith(" ") else c)) for c in choices])
            for c, (_, t) in zip(choices, seqs[-1], strict=True):
                if not t:  # it would score 0 (and train on nothing) whatever the model
                    raise DataError(f"the continuation {c!r} (after {ex.input[:40]!r}) has no tokens under this tokenizer ({type(self.tokenizer).__name__}): it cannot be scored")
        length = max(len(c) + len(t) for row in seqs for c, t in row)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(examples), width, length), pad, dtype=torch.long)
        cont = torch.zeros((len(examples), width, length), dtype=torch.bool)
        valid = torch.zeros((len(examples), width), dtype=torch.bool)
        chars = torch.ones((len(examples), width), dtype=torch.float32)
        for i, row in enumerate(seqs):
            for j, (c, t) in enumerate(row):
                ids[i, j, : len(c) + len(t)] = torch.tensor(c + t)
                cont[i, j, len(c) : len(c) + len(t)] = True
                valid[i, j] = True
                chars[i, j] = max(1, len(rows[i][j]))
        labels = torch.tensor([ex.label or 0 for ex in examples], dtype=torch.long)
        return TokenBatch({"input_ids": ids, "cont": cont, "valid": valid, "chars": chars}), labels

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so that context + continuation fits max_length tokens."""
        continuation = continuation[: self.max_length - 1]
        keep = self.max_length - len(continuation)
        return (context[-keep:] if len(context) > keep else context), continuation

    def scores(self, model: nn.Module, inputs: TokenBatch | Mapping[str, Tensor] | Sequence[TextExample], head: ContinuationHead | None) -> Tensor:
        """``[B, C]``: the summed log-likelihood of each choice's tokens given the context (divided
        by the choice's length in characters under ``acc_norm``); a missing choice scores -inf.

        No attention mask is passed: padding is on the right, so no real token attends to it."""
        if head is not None and head.metric == "exact_match":
            if isinstance(inputs, (TokenBatch, Mapping)):
                raise UsageError("exact_match scores raw examples (it decodes), not token batches")
            return self.exact_match(model, inputs)
        if isinstance(inputs, TokenBatch):
            t = inputs.tensors
        elif isinstance(inputs, Mapping):
            t = dict(inputs)
        else:
            t = self.collate(inputs, head)[0].tensors
        device = next(model.parameters()).device
        ids, cont = t["input_ids"].to(device), t["cont"].to(device)
        b, c, length = ids.shape
        logits = model(input_ids=ids.reshape(b * c, length), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        tokens = logp.gather(-1, ids.reshape(b * c, length)[:, 1:, None]).squeeze(-1)
        out = (tokens * cont.reshape(b * c, length)[:, 1:]).sum(-1).view(b, c)
        if head is not None and head.metric == "acc_norm":
            out = out / t["chars"].to(device)
        return out.masked_fill(~t["valid"].to(device), float("-inf"))


    def exact_match(self, model: nn.Module, examples: Sequence[TextExample]) -> Tensor:
        """``[B, 2]``: one-hot [miss, match] of greedy decoding. For each example the context is
        tokenized as in :meth:`encode_pair` with its ``target`` as the continuation; as many tokens
        as the target has are decoded greedily (argmax, no sampling), and the example matches when
        they are exactly the target's tokens."""
        device = next(model.parameters()).device
        out = torch.zeros((len(examples), 2))
        for i, ex in enumerate(examples):
            target = ex.target if not ex.input or ex.target.startswith(" ") else " " + ex.target
            ctx, cont = self._fit(*self.encode_pair(ex.input, target))
            ids = torch.tensor([ctx], device=device)
            got = []
            for _ in cont:
                nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                got.append(int(nxt))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            out[i, int(got == cont)] = 1.0
        return out.to(device)

    def token_nll(self, model: nn.Module, texts: Sequence[str]) -> Tensor:
        """``[2]``: the summed negative log-likelihood of the texts' tokens and how many tokens were
        predicted (perplexity = exp(sum / count)). Each text is BOS (when the tokenizer has one) +
        its tokens, cut into windows of max_length tokens; every token after a window's first is
        predicted from the window's earlier tokens."""
        tok = self.tokenizer
        lead = [tok.bos_token_id] if tok.bos_token_id is not None else []
        windows = []
        for text in texts:
            ids = lead + tok(text, add_special_tokens=False)["input_ids"]
            windows += [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length) if len(ids[i : i + self.max_length]) > 1]
        device = next(model.parameters()).device
        if not windows:
            return torch.zeros(2, device=device)
        length = max(len(w) for w in windows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(windows), length), pad, dtype=torch.long)
        real = torch.zeros((len(windows), length), dtype=torch.bool)
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.tensor(w)
            real[i, : len(w)] = True
        ids, real = ids.to(device), real.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        kept = real[:, 1:]
        return torch.stack([-(logp * kept).sum(), kept.sum().to(logp.dtype)])

def is_causal_directory(path: str | Path) -> bool:
    """A Hugging Face directory whose config is not an encoder-decoder."""
    from tvedit.models.hf_seq2seq import read_hf_config

    return is_hf_directory(path) and not read_hf_config(path).get("is_encoder_decoder", False)
