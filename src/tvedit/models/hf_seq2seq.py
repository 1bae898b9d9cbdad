"""Hugging Face sequence-to-sequence models (T5, Flan-T5, BART, ...): the ``hf-seq2seq`` family.

The model is rebuilt from the manifest alone: ``model_info()`` keeps the full ``config.json`` dict
and where the tokenizer comes from (its directory, or a tokenizer class that needs no files, such
as ByT5's). Checkpoint keys are exactly those of the Hugging Face ``model.safetensors``: every
parameter once (tied weights, e.g. T5's ``shared`` / ``encoder.embed_tokens`` / ``lm_head``, under
their first name only) plus persistent buffers.

A text task is scored by rank classification: ``scores`` returns, for each example and each answer
choice, the choice's total log-likelihood (sum over its tokens) given the input. The head of a text
task is its tuple of choice strings (or ``None`` when each example carries its own choices). See
docs/text-models.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tvedit.data.text import TextExample
from tvedit.errors import InputError, MismatchError, OutputError, UsageError
from tvedit.manifest import Manifest
from tvedit.models.base import ModelAdapter, adapter_for, check_fits, check_mode, register_adapter
from tvedit.reader import open_checkpoint
from tvedit.writer import Artifact, save_tensors

FAMILY = "hf-seq2seq"
DEFAULT_MAX_LENGTH = 128  # TaLoS text setup (input and answer, in tokens)
# The TaLoS paper's T5 recipe where it differs from the shared (CLIP) defaults of FinetuneConfig;
# a --config file and flags override it. bf16 autocast on GPU is the loop's default already.
# TaLoS text setup: lr 1e-4, batch 1024, early stopping with patience 5 (validation every 100 steps:
# the paper does not say how often; our choice).
RECIPE = {"lr": 1e-4, "batch_size": 1024, "eval_every": 100, "patience": 5}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "sentencepiece.bpe.model",
)  # fmt: skip
# Tokenizers that are built without any vocabulary file (recorded by class name).
FILELESS_TOKENIZERS = ("ByT5Tokenizer",)
ATTENTION_CONTAINERS = ("attention", "attn")  # module-name fragments (case-insensitive)
ATTENTION_PROJECTIONS = ("q", "k", "v", "o", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
OUTPUT_LAYERS = ("lm_head",)


def is_hf_directory(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (has a config.json)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


@register_adapter
class HFSeq2SeqAdapter(ModelAdapter):
    """An ``AutoModelForSeq2SeqLM`` architecture, its tokenizer, and the text recipe's limits."""

    family = FAMILY
    # f_lin linearizes the whole scores (each choice's log-likelihood), the base class's default
    # ``features``/``head_logits`` split: a rank-classification score has no encoder output that is
    # normalised before a head (the papers' T5 experiments fine-tune non-linearly; there is no
    # published definition to follow), and the log-likelihood is what the loss consumes.
    flin = "scores"
    # what from_directory requires of a directory's config, and what it says of one that is not so
    encoder_decoder = True
    wrong_kind = "is not an encoder-decoder (sequence-to-sequence) model"

    def __init__(self, config: Mapping[str, Any], tokenizer: Mapping[str, Any], max_length: int = DEFAULT_MAX_LENGTH):
        if "model_type" not in config:
            raise InputError("hf-seq2seq model info: the config has no 'model_type'")
        self.config = dict(config)
        self.tokenizer_info = dict(tokenizer)
        self.max_length = int(max_length)

    # -- identity ------------------------------------------------------------------------------
    @classmethod
    def from_directory(cls, path: str | Path, max_length: int = DEFAULT_MAX_LENGTH) -> HFSeq2SeqAdapter:
        """The adapter of a local Hugging Face directory (config.json + tokenizer files), of this
        class's kind (``encoder_decoder``); errors are one line naming the directory."""
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path).resolve()
        if not is_hf_directory(path):
            raise InputError(f"{path}: not a Hugging Face model directory (no config.json)")
        try:
            config = AutoConfig.from_pretrained(str(path))
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot load the config or tokenizer: {str(exc).splitlines()[0]}") from None
        if bool(getattr(config, "is_encoder_decoder", False)) != cls.encoder_decoder:
            raise InputError(f"{path}: {config.model_type!r} {cls.wrong_kind}")
        return cls(config.to_dict(), {"class": type(tok).__name__, "source": str(path)}, max_length)

    def model_info(self) -> dict[str, Any]:
        archs = self.config.get("architectures") or [self.config["model_type"]]
        return {
            "family": FAMILY,
            "architecture": archs[0],
            "config": self.config,
            "tokenizer": self.tokenizer_info,
            "max_length": self.max_length,
        }

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> HFSeq2SeqAdapter:
        if "config" not in info or "tokenizer" not in info:
            raise InputError("hf-seq2seq model info needs 'config' and 'tokenizer'")
        return cls(info["config"], info["tokenizer"], info.get("max_length", DEFAULT_MAX_LENGTH))

    def describe(self) -> str:
        return f"{FAMILY}:{self.model_info()['architecture']}"

    # -- building --------------------------------------------------------------------------------
    def hf_config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(**self.config)
        except (ValueError, TypeError) as exc:
            raise InputError(f"hf-seq2seq: cannot rebuild the config: {exc}") from None

    @staticmethod
    def auto_class() -> Any:
        """The transformers Auto class of this family's models."""
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def _instantiate(self) -> nn.Module:
        # Eager attention: fused SDPA kernels have no forward-mode AD (linearized fine-tuning).
        return self.auto_class().from_config(self.hf_config(), attn_implementation="eager")

    @cached_property
    def _skeleton(self) -> nn.Module:
        """The architecture on the meta device: names and shapes, no memory."""
        with torch.device("meta"):
            return self._instantiate()

    def keys(self) -> list[str]:
        """The checkpoint keys: parameters (tied ones once) and persistent buffers."""
        return sorted(_canonical(self._skeleton))

    def build(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        model = self._instantiate()
        if state is not None:
            _load_canonical(model, state)
        return model.float().eval()

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in _canonical(model).items()}

    # -- which tensors train -----------------------------------------------------------------------
    def trainable_keys(self, mode: str, *, attn_bias: bool = False) -> list[str]:
        check_mode(mode)
        params = [n for n, _ in self._skeleton.named_parameters()]
        if mode in ("full", "linearized"):
            return sorted(params)
        if mode == "attn":
            kinds = ("weight", "bias") if attn_bias else ("weight",)
            return sorted(f"{m}.{kind}" for m in self._attention_projections() for kind in kinds if f"{m}.{kind}" in params)
        return self.maskable_keys()

    def _attention_projections(self) -> list[str]:
        out = []
        for name, mod in self._skeleton.named_modules():
            parent, _, leaf = name.rpartition(".")
            if isinstance(mod, nn.Linear) and leaf in ATTENTION_PROJECTIONS and any(c in parent.lower() for c in ATTENTION_CONTAINERS):
                out.append(name)
        return out

    def maskable_keys(self) -> list[str]:
        """Every Linear except the output layer, plus the layer norms; embeddings stay frozen."""
        params = {n for n, _ in self._skeleton.named_parameters()}
        out = []
        for name, mod in self._skeleton.named_modules():
            leaf = name.rpartition(".")[2]
            is_linear = isinstance(mod, nn.Linear) and leaf not in OUTPUT_LAYERS
            is_norm = "layernorm" in type(mod).__name__.lower() or "rmsnorm" in type(mod).__name__.lower()
            if is_linear or is_norm:
                out += [f"{name}.{p}" for p, _ in mod.named_parameters(recurse=False) if f"{name}.{p}" in params]
        return sorted(out)

    # -- tokenizer, head and scoring ---------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        import transformers

        cls_name = self.tokenizer_info.get("class")
        source = self.tokenizer_info.get("source")
        if source and Path(source).is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source)
        if cls_name in FILELESS_TOKENIZERS:
            return getattr(transformers, cls_name)()
        raise InputError(f"hf-seq2seq: the tokenizer directory {source!r} is not there (pass --model DIR or --like DIR)")

    def make_head(self, model: nn.Module | None, task: Mapping[str, Any]) -> ChoiceHead | None:
        """The tokenized choice strings of a text task (``None``: each example has its own).

        ``model`` is not used: the head of a text task does not depend on the weights."""
        choices = task.get("choices")
        if not choices:
            return None
        ids, mask = self._tokenize([str(c) for c in choices])
        return ChoiceHead(tuple(str(c) for c in choices), ids, mask)

    def _tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def collate(self, examples: Sequence[TextExample], head: ChoiceHead | None = None) -> tuple[TokenBatch, Tensor]:
        """Examples -> (their token tensors, labels ``[B]``: the right choice, 0 for a target).

        A batch holds ``input_ids``/``attention_mask`` ``[B, L]`` and, unless a shared ``head``
        supplies the choices, either the examples' own choices (``choice_ids``/``choice_mask``
        ``[B, C, T]``, ``choice_valid`` ``[B, C]``) or their targets (``target_ids``/``target_mask``
        ``[B, T]``, generation-style examples without choices)."""
        if not examples:
            raise UsageError("an empty batch")
        input_ids, attention_mask = self._tokenize([ex.input for ex in examples])
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        own = [ex.choices for ex in examples]
        if head is None and all(own):
            width = max(len(c) for c in own if c)
            flat = [c[j] if j < len(c) else "" for c in own if c for j in range(width)]
            ids, mask = self._tokenize(flat)
            tensors["choice_ids"] = ids.view(len(examples), width, -1)
            tensors["choice_mask"] = mask.view(len(examples), width, -1)
            tensors["choice_valid"] = torch.tensor([[j < len(c) for j in range(width)] for c in own if c])
        elif head is None:
            tensors["target_ids"], tensors["target_mask"] = self._tokenize([ex.target for ex in examples])
        elif any(ex.label is None for ex in examples):
            raise UsageError("an example without choices in a task with shared choices")
        labels = torch.tensor([ex.label or 0 for ex in examples], dtype=torch.long)
        return TokenBatch(tensors), labels

    def scores(self, model: nn.Module, inputs: TokenBatch | Mapping[str, Tensor] | Sequence[TextExample], head: ChoiceHead | None) -> Tensor:
        """``[B, C]``: the total log-likelihood of each choice given each input (rank classification).

        ``inputs`` is a batch from :meth:`collate` (or a list of examples, collated here). The
        choices are the head's, else the batch's own (a missing choice scores ``-inf``); a batch
        of generation-style examples scores its targets (``[B, 1]``)."""
        if isinstance(inputs, TokenBatch):
            inputs = inputs.tensors
        elif not isinstance(inputs, Mapping):
            inputs = self.collate(inputs, head)[0].tensors
        device = _device(model)
        input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        batch = input_ids.shape[0]
        if head is not None:
            width = head.ids.shape[0]
            ids, mask = head.ids.to(device).repeat(batch, 1), head.mask.to(device).repeat(batch, 1)
        elif "choice_ids" in inputs:
            width = inputs["choice_ids"].shape[1]
            ids, mask = inputs["choice_ids"].to(device).flatten(0, 1), inputs["choice_mask"].to(device).flatten(0, 1)
        else:
            width = 1
            ids, mask = inputs["target_ids"].to(device), inputs["target_mask"].to(device)
        out = sequence_loglik(model, input_ids, attention_mask, ids, mask, repeat=width).view(batch, width)
        if "choice_valid" in inputs and head is None:
            out = out.masked_fill(~inputs["choice_valid"].to(device), float("-inf"))
        return out

    def loss(self, scores: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The seq2seq training loss, summed over the batch: the negative log-likelihood of each
        example's target (its labelled choice, or its ``target``), as in the papers' T5 recipe.
        ``label_smoothing`` does not apply (there is no softmax over the choices)."""
        return -scores.gather(1, labels.view(-1, 1).to(scores.device)).sum()

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        if enable:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        else:
            model.gradient_checkpointing_disable()  # type: ignore[operator]

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The blocks transformers itself never splits (``_no_split_modules``: LlamaDecoderLayer, T5Block, ...), then the model."""
        names = set(getattr(model, "_no_split_modules", None) or [])
        return [m for m in model.modules() if type(m).__name__ in names and m is not model] + [model]

    # -- export ----------------------------------------------------------------------------------
    def save_pretrained(self, state: Mapping[str, Tensor], out_dir: str | Path, like: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write ``state`` as a Hugging Face directory (weights, config, tokenizer, generation config).

        ``like``: a Hugging Face directory whose config and tokenizer files are copied verbatim
        (its config must describe the same architecture); default: the recorded config and tokenizer.
        """
        out = Path(out_dir)
        model = self.build(state)
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(str(out), safe_serialization=True)
        if like is not None:
            like = Path(like)
            for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
                if (like / name).is_file():
                    shutil.copyfile(like / name, out / name)
        else:
            self.tokenizer.save_pretrained(str(out))
        return out


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """The token tensors of a batch of text examples, used like one tensor by the training loop
    (``.to``, ``.shape``, indexing along the batch) and a pytree, so ``torch.func.vmap`` maps over it."""

    tensors: dict[str, Tensor]

    @property
    def shape(self) -> torch.Size:
        return self.tensors["input_ids"].shape

    def __len__(self) -> int:
        return int(self.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> TokenBatch:
        return TokenBatch({k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    def __getitem__(self, index: Any) -> TokenBatch:
        return TokenBatch({k: v[index] for k, v in self.tensors.items()})


def _flatten(batch: TokenBatch) -> tuple[list[Tensor], list[str]]:
    keys = sorted(batch.tensors)
    return [batch.tensors[k] for k in keys], keys


torch.utils._pytree.register_pytree_node(
    TokenBatch, _flatten, lambda values, keys: TokenBatch(dict(zip(keys, values, strict=True))),
    serialized_type_name="tvedit.models.hf_seq2seq.TokenBatch",
)  # fmt: skip


@dataclass(frozen=True)
class ChoiceHead:
    """The frozen head of a text task: its choice strings, tokenized once (``[C, T]``)."""

    choices: tuple[str, ...]
    ids: Tensor
    mask: Tensor


def sequence_loglik(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, label_mask: Tensor, repeat: int = 1) -> Tensor:
    """Sum of log p(label tokens | input) per label row. The encoder runs once per input; with
    ``repeat`` > 1, rows ``i*repeat .. i*repeat+repeat-1`` of ``labels`` belong to input ``i``."""
    # An additive [B, 1, 1, L] mask is used as is by transformers (its 2D-mask preprocessing has
    # data-dependent branches that torch.func.vmap cannot trace); it serves encoder and cross attention.
    dtype = next(model.parameters()).dtype
    attention_mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # type: ignore[operator]
    if repeat > 1:
        hidden = hidden.repeat_interleave(repeat, dim=0)
        attention_mask = attention_mask.repeat_interleave(repeat, dim=0)
    decoder_input_ids = model._shift_right(labels)  # type: ignore[operator]
    logits = model(encoder_outputs=(hidden,), attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False).logits
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * label_mask).sum(dim=-1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _canonical(model: nn.Module) -> dict[str, Tensor]:
    """Parameters under their first name (tied weights once) and persistent buffers."""
    out = dict(model.named_parameters())
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    out.update({k: v for k, v in model.named_buffers() if k not in non_persistent})
    return out


def _load_canonical(model: nn.Module, state: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Strict load over the canonical keys (tied aliases follow their parameter)."""
    own = _canonical(model)
    check_fits(own, state, where)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face directory as a dict."""
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read config.json: {exc}") from None


# ------------------------------------------------------------------------------------------------
# library entry points: theta0 from a Hugging Face directory, and back
# ------------------------------------------------------------------------------------------------
TEXT_FAMILIES = (FAMILY, "hf-causal")


def directory_adapter(hf_dir: str | Path, max_length: int = DEFAULT_MAX_LENGTH) -> HFSeq2SeqAdapter:
    """The adapter of a Hugging Face directory: hf-seq2seq for an encoder-decoder config, else
    hf-causal (models/hf_causal.py)."""
    from tvedit.models.base import adapter_class

    family = FAMILY if read_hf_config(hf_dir).get("is_encoder_decoder") else "hf-causal"
    return adapter_class(family).from_directory(hf_dir, max_length=max_length)  # type: ignore[attr-defined,no-any-return]


def init_from_directory(hf_dir: str | Path, output: str | Path, *, force: bool = False, max_length: int = DEFAULT_MAX_LENGTH) -> Artifact:
    """Materialise theta0 of a local Hugging Face directory (seq2seq or causal LM) as a tvedit
    checkpoint. The tensors keep their stored dtype; the manifest records the full config and the
    tokenizer."""
    adapter = directory_adapter(hf_dir, max_length=max_length)
    try:
        model = adapter.auto_class().from_pretrained(str(hf_dir), dtype="auto", attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise InputError(f"{hf_dir}: cannot load the weights: {str(exc).splitlines()[0]}") from None
    manifest = Manifest(kind="checkpoint", model=adapter.model_info()).with_step(
        "init", {"model": str(Path(hf_dir).resolve()), "family": adapter.family}, []
    )
    return save_tensors(output, adapter.state_dict(model), manifest, force=force)


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, like: str | Path | None = None, dtype: torch.dtype | None = None, force: bool = False, max_shard_size: int | None = None) -> Artifact:
    """Write a tvedit checkpoint as a Hugging Face directory (any architecture: hfdir.export). A
    seq2seq checkpoint that records no directory (a tokenizer that needs no file, e.g. ByT5, and its
    config in the manifest) is written through this adapter instead."""
    from tvedit import hfdir
    from tvedit.reader import Checkpoint

    ckpt = Checkpoint(checkpoint)
    manifest = ckpt.manifest or Manifest()
    if like is None and manifest.family == FAMILY and ckpt.kind == "checkpoint" and manifest.regime != "linearized" and hfdir.recorded_source(manifest) is None:
        path = export_with_adapter(checkpoint, out_dir, dtype=dtype, force=force)
        return Artifact(path, Checkpoint(path).manifest or manifest)
    return hfdir.export(checkpoint, out_dir, like=like, dtype=dtype, force=force, max_shard_size=max_shard_size)


def export_directory(checkpoint: str | Path, out_dir: str | Path, *, like: str | Path | None = None, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """``export_hf``'s directory."""
    return export_hf(checkpoint, out_dir, like=like, dtype=dtype, force=force).path


def export_with_adapter(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """An hf-seq2seq checkpoint whose recorded tokenizer directory is gone: the model is rebuilt
    from the recorded config and saved with ``save_pretrained``, the tokenizer from its class
    (tokenizers that need no file, e.g. ByT5's)."""
    ckpt = open_checkpoint(checkpoint)
    assert ckpt.manifest is not None and ckpt.manifest.family == FAMILY
    adapter = HFSeq2SeqAdapter.from_model_info(ckpt.manifest.model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: exists and is not empty (use --force to overwrite)")
    state = {k: ckpt.get(k) for k in ckpt.keys()}
    dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        adapter.save_pretrained(state, tmp, dtype=dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_text_model(model: str | None, pretrained: str | None) -> bool:
    """Whether ``tvedit init/finetune/calibrate`` were given a text model: a Hugging Face
    directory (as --model or --pretrained) or a tvedit checkpoint of a text family."""
    if any(x and is_hf_directory(x) for x in (model, pretrained)):
        return True
    if pretrained and str(pretrained).endswith(".safetensors") and Path(pretrained).is_file():
        ckpt = open_checkpoint(pretrained)
        return ckpt.manifest is not None and ckpt.manifest.family in TEXT_FAMILIES
    return False


def load_theta0(model: str | None, pretrained: str | None, materialise: Path) -> tuple[HFSeq2SeqAdapter, dict[str, Tensor], str, Path]:
    """(adapter, tensors, content hash, path) of theta0 for fine-tuning. A tvedit checkpoint is used
    as is; a Hugging Face directory is materialised at ``materialise`` (reused when that file already
    holds the same tensors) so that every output records the base's hash."""
    source = next((x for x in (pretrained, model) if x and is_hf_directory(x)), None)
    if pretrained and not is_hf_directory(pretrained):  # a tvedit checkpoint wins over --model DIR
        ckpt = open_checkpoint(pretrained)
        if ckpt.kind != "checkpoint" or ckpt.manifest is None:
            raise InputError(f"{pretrained}: theta0 must be a checkpoint with a manifest")
        if ckpt.manifest.family not in TEXT_FAMILIES:
            raise MismatchError(f"{pretrained}: is a {ckpt.manifest.family!r} checkpoint, not a text model ({', '.join(TEXT_FAMILIES)})")
        return adapter_for(ckpt.manifest.model), dict(ckpt.items()), ckpt.sha256, Path(pretrained)  # type: ignore[return-value]
    if source is None:
        raise UsageError("a text theta0 is a Hugging Face directory or a tvedit checkpoint")
    tmp = materialise.with_name(materialise.name + ".tmp")
    art = init_from_directory(source, tmp, force=True)
    if materialise.exists():
        existing = open_checkpoint(materialise).sha256
        tmp.unlink()
        if existing != art.sha256:
            raise MismatchError(f"{materialise}: exists and holds a different theta0; remove it or choose another output")
    else:
        tmp.rename(materialise)
    ckpt = open_checkpoint(materialise)
    return adapter_for(ckpt.manifest.model), dict(ckpt.items()), ckpt.sha256, materialise  # type: ignore[union-attr,return-value]
