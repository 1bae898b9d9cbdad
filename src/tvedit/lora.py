"""LoRA adapters (PEFT's format) in and out of task vectors.

``import_adapter``: a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) becomes a
task vector against the adapter's base. Each adapted matrix ΔW = scale · B · A (scale = lora_alpha / r,
or lora_alpha / √r with rsLoRA; per-module ``rank_pattern``/``alpha_pattern`` honoured; transposed
for ``fan_in_fan_out`` layers and for embeddings, as PEFT's ``get_delta_weight``) is stored in the
low-rank layout as its exact thin SVD (ops.svd.product_svd); full values the adapter saves
(``modules_to_save``, trained biases) become dense differences to the base; every other floating
tensor of the base is zero. Variants that are not ΔW = scale · B · A (DoRA, ...) are refused.

``export_adapter``: a task vector becomes a PEFT LoRA directory: per 2-D tensor of a Linear,
Conv1D (``fan_in_fan_out``) or Embedding module, the truncated SVD at ``--rank`` or ``--energy``,
split evenly into B and A with lora_alpha = r (scale 1). Other non-zero entries are dropped (and
reported) or, with ``modules_to_save``, their whole modules are saved as full values θ0 + τ.
Semantics: docs/lora.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvedit import hfdir, safeio
from tvedit.engine import chunk_numel
from tvedit.errors import InputError, MismatchError, UsageError
from tvedit.manifest import Manifest, base_ref
from tvedit.ops import svd
from tvedit.reader import Checkpoint, open_checkpoint
from tvedit.writer import Artifact, CheckpointWriter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# adapter-key suffix -> (role, is an embedding pair)
LORA_SUFFIXES = {
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False), ".lora_B.bias": ("bias", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}  # fmt: skip
# adapter_config.json fields that make an adapter something other than ΔW = scale · B · A (or that
# change which weights exist): refused when set, with the variant's name.
VARIANT_FIELDS = {
    "use_dora": "DoRA", "use_qalora": "QALoRA", "layer_replication": "layer replication",
    "alora_invocation_tokens": "aLoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA", "arrow_config": "Arrow", "kasa_config": "KaSA",
    "target_parameters": "LoRA on nn.Parameter targets", "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron-parallel LoRA",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# the adapter config
# --------------------------------------------------------------------------------------------
def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of a plain LoRA adapter (exit 3 for anything else)."""
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir}: not a directory (a PEFT adapter is a directory with {CONFIG_NAME})")
    if not path.is_file():
        raise InputError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type}: tvedit imports LoRA adapters only (merge it with peft's merge_and_unload, then tvedit extract)")
    for name, variant in VARIANT_FIELDS.items():
        if config.get(name):
            raise InputError(f"{path}: {name} is set ({variant}): not a plain LoRA (ΔW = scale·B·A); merge it with peft's merge_and_unload, then tvedit extract")
    for name in ("r", "lora_alpha"):
        if not isinstance(config.get(name), (int, float)) or config[name] <= 0:
            raise InputError(f"{path}: field {name!r} must be a positive number, not {config.get(name)!r}")
    return config


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern P with re.match(rf"(.*\\.)?({P})$", module)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """scale = alpha / r (alpha / sqrt(r) with use_rslora), alpha from alpha_pattern or lora_alpha."""
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------
@dataclass
class _Pair:
    """One adapted module's tensors, by role (A, B, bias), with the adapter keys they came from."""

    module: str
    embedding: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def _read_weights(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor], str]:
    """(weights file, its tensors, its sha256): safetensors, or a pickled .bin read with
    torch.load(weights_only=True), which rebuilds tensors only."""
    st = adapter_dir / WEIGHTS_NAME
    if st.is_file():
        ckpt = Checkpoint(st)
        return st, {k: ckpt.get(k) for k in ckpt.keys()}, ckpt.sha256
    pickled = adapter_dir / PICKLED_WEIGHTS_NAME
    if pickled.is_file():
        from tvedit.convert import load_pickled_state

        return pickled, load_pickled_state(pickled), hfdir.file_sha256(pickled)
    raise InputError(f"{adapter_dir}: no {WEIGHTS_NAME} (or {PICKLED_WEIGHTS_NAME})")


def _parse(weights: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, _Pair], dict[str, tuple[str, torch.Tensor]]]:
    """({module: its LoRA tensors}, {base key: (adapter key, full value)})."""
    pairs: dict[str, _Pair] = {}
    full: dict[str, tuple[str, torch.Tensor]] = {}
    for key in sorted(weights):
        if not key.startswith(PREFIX):
            raise InputError(f"{source}: key {key!r} does not start with {PREFIX!r} (not a PEFT adapter state dict)")
        rest = key[len(PREFIX) :]
        suffix = next((s for s in LORA_SUFFIXES if rest.endswith(s)), None)
        if suffix is not None:
            role, embedding = LORA_SUFFIXES[suffix]
            module = rest[: -len(suffix)]
            pair = pairs.setdefault(module, _Pair(module, embedding))
            pair.tensors[role] = weights[key]
            pair.keys[role] = key
            continue
        if any(part.startswith("lora_") for part in rest.split(".")):
            raise InputError(f"{source}: key {key!r}: not a LoRA A/B tensor (a LoRA variant tvedit does not import)")
        if not weights[key].is_floating_point():
            raise InputError(f"{source}: key {key!r}: a {weights[key].dtype} tensor; adapters hold floating tensors")
        full[rest.replace(".base_layer.", ".")] = (key, weights[key])
    for pair in pairs.values():
        for role in ("A", "B"):
            if role not in pair.tensors:
                other = next(iter(pair.keys.values()))
                raise InputError(f"{source}: key {other!r} has no lora_{role} partner")
    return pairs, full


def _delta(pair: _Pair, config: dict[str, Any], source: Path, config_path: Path) -> tuple[svd.Factors, torch.Tensor | None]:
    """(ΔW as exact SVD factors in the base weight's orientation, bias delta or None)."""
    a, b = pair.tensors["A"], pair.tensors["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InputError(f"{source}: key {pair.keys['A']!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not a 2-D LoRA pair (convolution LoRA is not imported)")
    rank = a.shape[0]
    want = int(pattern_value(config.get("rank_pattern"), pair.module, config["r"]))
    if want != rank:
        raise InputError(f"{source}: key {pair.keys['A']!r}: rank {rank}, but {config_path} gives r = {want} for {pair.module!r}")
    scale = lora_scale(config, pair.module, rank)
    f = svd.product_svd(b, a, scale)  # scale · B @ A, [out, in]
    if pair.embedding or config.get("fan_in_fan_out"):
        f = svd.Factors(f.V, f.S, f.U)  # PEFT: transpose(B @ A) for embeddings and fan_in_fan_out
    bias = pair.tensors.get("bias")
    if bias is not None and not config.get("lora_bias"):
        raise InputError(f"{source}: key {pair.keys['bias']!r}: lora_B has a bias but {config_path} does not set lora_bias")
    return f, (bias.double() * scale if bias is not None else None)


def _tied_source(base: Checkpoint, key: str) -> str | None:
    """The stored key a missing tied alias (e.g. lm_head.weight) shares its weight with."""
    root = hfdir.hf_root(base.path)
    if root is None:
        return None
    config = hfdir.read_config(root)
    if config.get("tie_word_embeddings") is False:
        return None
    import transformers

    for arch in config.get("architectures") or []:
        tied = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None) or {}
        if isinstance(tied, dict) and isinstance(tied.get(key), str) and tied[key] in base:
            return str(tied[key])
    return None


def _base_key(base: Checkpoint, key: str, adapter_key: str, source: Path) -> str:
    if key in base:
        if not base.is_floating(key):
            raise MismatchError(f"{source}: key {adapter_key!r}: {key!r} in the base {base.path} is not a floating tensor")
        return key
    tied = _tied_source(base, key)
    if tied is None:
        raise MismatchError(f"{source}: key {adapter_key!r}: the base {base.path} has no {key!r} (an adapter for another model?)")
    return tied


def _check_shape(base: Checkpoint, key: str, shape: Sequence[int], adapter_key: str, source: Path) -> None:
    want = list(base.info(key).shape)
    if list(shape) != want:
        raise MismatchError(f"{source}: key {adapter_key!r}: gives {key!r} shape {list(shape)}, but the base {base.path} has {want} (an adapter for another base?)")


def _resolve_base(base: str | os.PathLike[str] | None, config: dict[str, Any], config_path: Path) -> Path:
    if base is not None:
        return Path(base)
    recorded = config.get("base_model_name_or_path")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    raise UsageError(f"{config_path}: base_model_name_or_path {recorded!r} is not a local path; pass --base BASE (the model the adapter was trained on)")


def import_adapter(
    adapter_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Artifact:
    """A PEFT LoRA adapter as a task vector against ``base`` (default: the adapter config's
    base_model_name_or_path when that is a local path)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    config = read_adapter_config(adapter_dir)
    base_path = _resolve_base(base, config, config_path)
    base_ckpt = open_checkpoint(base_path)
    if base_ckpt.kind != "checkpoint":
        raise InputError(f"{base_path}: --base must be a checkpoint, not a {base_ckpt.kind}")
    source, weights, adapter_hash = _read_weights(adapter_dir)
    pairs, full = _parse(weights, source)
    if not pairs and not full:
        raise InputError(f"{source}: holds no tensors")

    # per base key: low-rank factors, or a dense float64 delta (several contributions add up)
    lowrank: dict[str, svd.Factors] = {}
    dense: dict[str, torch.Tensor] = {}

    def add_dense(key: str, delta: torch.Tensor) -> None:
        if key in lowrank:
            delta = delta + lowrank.pop(key).dense().double()
        dense[key] = dense[key] + delta if key in dense else delta

    for module in sorted(pairs):
        pair = pairs[module]
        factors, bias = _delta(pair, config, source, config_path)
        key = _base_key(base_ckpt, f"{module}.weight", pair.keys["A"], source)
        _check_shape(base_ckpt, key, factors.shape, pair.keys["A"], source)
        if key in lowrank or key in dense:
            add_dense(key, factors.dense())
        else:
            lowrank[key] = factors
        if bias is not None:
            bkey = _base_key(base_ckpt, f"{module}.bias", pair.keys["bias"], source)
            _check_shape(base_ckpt, bkey, bias.shape, pair.keys["bias"], source)
            add_dense(bkey, bias)
    for name in sorted(full):
        adapter_key, value = full[name]
        key = _base_key(base_ckpt, name, adapter_key, source)
        _check_shape(base_ckpt, key, value.shape, adapter_key, source)
        delta = value.double() - base_ckpt.get(key).double()
        if bool(delta.any()):  # e.g. embed_tokens.base_layer saved unchanged: no contribution
            add_dense(key, delta)

    factor_dtype = torch.float64 if any(t.dtype == torch.float64 for t in weights.values()) else torch.float32
    params = {
        "format": "peft-lora", "r": config["r"], "lora_alpha": config["lora_alpha"],
        "use_rslora": bool(config.get("use_rslora")), "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
        "modules_to_save": config.get("modules_to_save"), "lowrank": len(lowrank), "dense": len(dense),
        "factor_dtype": str(factor_dtype).replace("torch.", ""),
    }  # fmt: skip
    root = hfdir.hf_root(base_path)
    model = dict(base_ckpt.manifest.model) if base_ckpt.manifest and base_ckpt.manifest.family != "unknown" else (hfdir.model_info(root) if root else {"family": "unknown"})
    inputs = [
        {"path": str(source), "sha256": adapter_hash, "kind": "peft-lora", "role": "adapter"},
        {"path": str(base_path), "sha256": base_ckpt.sha256, "kind": base_ckpt.kind, "role": "base"},
    ]
    manifest = Manifest(kind="task-vector", model=model, base=base_ref(base_ckpt.sha256, str(base_path))).with_step("import", params, inputs)
    keys = [k for k in base_ckpt.keys() if base_ckpt.is_floating(k)]
    step = chunk_numel()
    with CheckpointWriter(output, manifest, keys, force=force, inputs=[source, base_path], layout="auto") as w:
        for key in keys:
            info = base_ckpt.info(key)
            if key in lowrank:
                w.write_lowrank(key, lowrank[key].to(factor_dtype))
            elif key in dense:
                w.write(key, dense[key].to(info.dtype))
            else:
                numel = math.prod(info.shape)
                zeros = torch.zeros(min(step, numel), dtype=info.dtype)
                w.write_chunks(key, info.shape, info.dtype, (zeros[: min(step, numel - at)] for at in range(0, numel, step)))
        return w.commit()


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
@dataclass
class ExportedTensor:
    key: str
    shape: list[int]
    rank: int
    full_rank: int
    norm: float
    error: float  # ||τ - ΔW_k||_F
    relative_error: float  # error / ||τ||_F


@dataclass
class LoraExport:
    """What export_adapter wrote and how far the adapter is from the task vector."""

    path: Path
    tensors: list[ExportedTensor]
    dropped: list[dict[str, Any]]  # non-zero entries the adapter cannot hold: {key, shape, norm}
    modules_to_save: list[str]
    zero: int  # all-zero tensors (nothing to export)
    relative_error: float  # over every non-zero entry, dropped ones included

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "kind": "peft-lora", "relative_error": self.relative_error,
            "tensors": [t.__dict__ for t in self.tensors], "dropped": self.dropped,
            "modules_to_save": self.modules_to_save, "zero_tensors": self.zero,
        }  # fmt: skip


def module_kinds(root: Path) -> dict[str, str]:
    """{module name: 'linear' | 'conv1d' | 'embedding' | its class name} of the architecture in
    root's config.json, built on the meta device (no weights read or allocated)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for configs it cannot read
        raise InputError(f"{root / 'config.json'}: transformers cannot read it: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise InputError(f"{root / 'config.json'}: architecture {archs[0] if archs else None!r} is not a transformers model class")
    with torch.device("meta"):
        model = cls(config)
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(mod, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(mod, torch.nn.Embedding):
            kinds[name] = "embedding"
        else:
            kinds[name] = type(mod).__name__
    return kinds


def task_type(architectures: Sequence[str]) -> str | None:
    """PEFT's task_type for an architecture name (PeftModel.from_pretrained picks its class by it)."""
    for arch in architectures:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "CAUSAL_LM"
        if arch.endswith("ForConditionalGeneration") or arch.endswith("ForSeq2SeqLM"):
            return "SEQ_2_SEQ_LM"
        if arch.endswith("ForSequenceClassification"):
            return "SEQ_CLS"
    return None


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def export_adapter(
    vector: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    modules_to_save: bool = False,
    force: bool = False,
) -> LoraExport:
    """A task vector as a PEFT LoRA adapter directory for the Hugging Face model ``base``."""
    if (rank is None) == (energy is None):
        raise UsageError("export-lora: give exactly one of --rank, --energy")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: must be an integer >= 1")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy {energy}: must be in (0, 1]")
    vector, out_dir, base = Path(vector), Path(out_dir), Path(base)
    root = hfdir.hf_root(base)
    if root is None:
        raise UsageError(f"--base {base}: not a Hugging Face directory (no config.json): PEFT loads adapters onto a transformers model")
    tau = open_checkpoint(vector)
    if tau.kind != "task-vector":
        raise InputError(f"{vector}: is a {tau.kind}; export-lora takes a task vector")
    manifest = tau.manifest or Manifest()
    if manifest.regime == "linearized":
        raise MismatchError(f"{vector}: is a linearized task vector, which only means something under f_lin; a LoRA adapter would run it non-linearly")
    base_ckpt = open_checkpoint(root)
    recorded = (manifest.base or {}).get("sha256")
    if recorded and recorded != base_ckpt.sha256:
        raise MismatchError(f"{root}: base hash {base_ckpt.sha256[:12]} differs from the base {recorded[:12]} recorded in {vector}")
    hfdir.check_directory_output(out_dir, force, [vector, root])
    for key in tau.keys():
        if tau.is_floating(key) and key in base_ckpt and list(tau.info(key).shape) != list(base_ckpt.info(key).shape):
            raise MismatchError(f"{vector}: key {key!r}: shape {list(tau.info(key).shape)} does not match {list(base_ckpt.info(key).shape)} in {root}")
    kinds = module_kinds(root)

    def lora_able(key: str) -> bool:
        module, param = _split_key(key)
        return param == "weight" and kinds.get(module) in ("linear", "conv1d", "embedding") and len(tau.info(key).shape) == 2

    float_keys = [k for k in tau.keys() if tau.is_floating(k)]
    others = {k: tau.get(k) for k in float_keys if not lora_able(k)}  # biases, norms: small
    saved_modules: list[str] = []
    if modules_to_save:
        saved_modules = sorted({m for k, t in others.items() if bool(t.any()) for m in [_split_key(k)[0]] if m in kinds and m})
    tensors: dict[str, torch.Tensor] = {}
    rows: list[ExportedTensor] = []
    dropped: list[dict[str, Any]] = []
    ranks: dict[str, int] = {}
    err_sq = norm_sq = 0.0
    zero = 0
    for key in float_keys:
        module, param = _split_key(key)
        t = (others[key] if key in others else tau.get(key)).float()  # SVDs in float32 (ops.svd)
        if not bool(t.any()):
            zero += 1
            continue
        norm = float(t.double().norm())
        norm_sq += norm**2
        if module in saved_modules:
            continue
        if key in others:
            dropped.append({"key": key, "shape": list(t.shape), "norm": norm})
            err_sq += norm**2
            continue
        kind = kinds[module]
        m = t if kind == "linear" else t.T  # LoRA's [out, in] frame (Conv1D and Embedding store it transposed)
        f = svd.svd(m)
        k = svd.choose_rank(f.S, rank=rank) if rank is not None else svd.choose_rank(f.S, energy=energy)
        b, a = svd.split_factors(svd.Factors(f.U[:, :k], f.S[:k], f.V[:, :k]))
        names = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{names[0]}"] = a.float().contiguous()
        tensors[f"{PREFIX}{module}.{names[1]}"] = b.float().contiguous()
        error, rel = svd.tail_energy(f.S, k)
        err_sq += error**2
        ranks[module] = k
        rows.append(ExportedTensor(key, list(t.shape), k, int(f.S.shape[0]), norm, error, rel))
    for module in saved_modules:
        for key in base_ckpt.keys():
            if _split_key(key)[0] == module and base_ckpt.is_floating(key):
                value = base_ckpt.get(key).double() + (tau.get(key).double() if key in tau else 0.0)
                tensors[f"{PREFIX}{key}"] = value.to(base_ckpt.info(key).dtype)
    if not ranks and not saved_modules:
        raise InputError(f"{vector}: no non-zero matrix of a Linear, Conv1D or Embedding module to export as LoRA" + (f" (dropped: {dropped[0]['key']!r}, ...)" if dropped else ""))

    config = adapter_config(root, ranks, kinds, saved_modules)
    relative_error = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    result = LoraExport(out_dir, rows, dropped, saved_modules, zero, relative_error)
    vector_record = {"path": str(vector), "sha256": tau.sha256, "kind": tau.kind}
    base_record = {"path": str(root), "sha256": base_ckpt.sha256}
    criterion = {"rank": rank} if rank is not None else {"energy": energy}
    _write_directory(out_dir, tensors, config, model_card(result, config, vector_record, base_record, criterion), force)
    return result


def adapter_config(root: Path, ranks: dict[str, int], kinds: dict[str, str], saved_modules: list[str]) -> dict[str, Any]:
    """PEFT LoraConfig fields: full module names as target_modules, lora_alpha = r per module
    (scale 1), the most common rank as r and rank_pattern/alpha_pattern for the others."""
    counts: dict[int, int] = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r = max(sorted(counts), key=lambda k: counts[k]) if counts else 1
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    archs = hfdir.read_config(root).get("architectures") or []
    types = {kinds[m] for m in ranks}
    return {
        "peft_type": "LORA", "task_type": task_type(archs), "base_model_name_or_path": str(root.resolve()),
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "modules_to_save": saved_modules or None,
        "fan_in_fan_out": types == {"conv1d"}, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "revision": None,
        "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
    }  # fmt: skip


def model_card(result: LoraExport, config: dict[str, Any], vector: dict[str, Any], base: dict[str, Any], criterion: dict[str, Any]) -> str:
    from tvedit.version import __version__

    lines = [
        "---", f"base_model: {base['path']}", "library_name: peft", "tags:", "- tvedit", "- lora", "---", "",
        f"# {result.path.name}", "",
        f"A LoRA adapter written by tvedit {__version__} (`tvedit export-lora`) from the task vector "
        f"`{vector['path']}` (sha256 `{vector['sha256']}`) for the base `{base['path']}` (sha256 `{base['sha256']}`).",
        f"Each matrix is the truncated SVD of its task-vector tensor at {', '.join(f'{k} {v}' for k, v in criterion.items())}; "
        "lora_alpha equals each module's rank (scale 1).", "",
        f"Relative error over the whole task vector: {result.relative_error:.6g} (‖τ − ΔW‖_F / ‖τ‖_F, dropped entries included).", "",
        "## Truncation error per tensor", "", "| tensor | shape | rank | of | ‖τ‖_F | relative error |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for t in result.tensors:
        lines.append(f"| `{t.key}` | {t.shape} | {t.rank} | {t.full_rank} | {t.norm:.6g} | {t.relative_error:.6g} |")
    if result.dropped:
        lines += ["", "## Dropped (not a matrix of a Linear, Conv1D or Embedding module; `--modules-to-save` keeps them)", "", "| tensor | shape | ‖τ‖_F |", "|---|---|---|"]
        lines += [f"| `{d['key']}` | {d['shape']} | {d['norm']:.6g} |" for d in result.dropped]
    if result.modules_to_save:
        lines += ["", "## modules_to_save (full values θ0 + τ)", ""] + [f"- `{m}`" for m in result.modules_to_save]
    lines += ["", f"All-zero tensors of the task vector (nothing to export): {result.zero}.", ""]
    lines += ["Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER_DIR)`.", ""]
    return "\n".join(lines)


def _write_directory(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str, force: bool) -> None:
    """Built in a temporary directory beside out_dir and renamed into place (removed on failure or
    SIGINT/SIGTERM)."""
    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    safeio.remove_stale(out_dir.parent)
    tmp = safeio.temp_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safeio.register(tmp)
    try:
        save_file(dict(sorted(tensors.items())), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card)
        safeio.test_hold()
        with safeio.deferred_signals():
            hfdir.commit_directory(tmp, out_dir, force)
            safeio.unregister(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        safeio.unregister(tmp)
        raise

