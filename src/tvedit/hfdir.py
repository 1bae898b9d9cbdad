"""Hugging Face model directories as outputs (and the checks on them as inputs).

A directory output holds the weights as sharded safetensors (``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` as ``save_pretrained`` names
them), the tvedit manifest in every shard's header, the config / generation-config / tokenizer files
of the source directory copied byte for byte (never loaded, converted or fetched) and a README.md
model card. It is built in a temporary directory beside the target and renamed into place.
Semantics: docs/hf.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvedit import safeio
from tvedit.errors import InputError, MismatchError, OutputError, UsageError
from tvedit.manifest import Manifest
from tvedit.reader import Checkpoint, combine_digests
from tvedit.writer import Artifact, CheckpointWriter, WrittenData, layout_of

FAMILY = "hf"
INDEX_NAME = "model.safetensors.index.json"
# Files never copied from a source directory: weights (tvedit writes its own), cards, VCS files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")
SKIP_NAMES = ("README.md", ".gitattributes")
CONFIG_FILES = ("config.json", "generation_config.json")
# Tokenizer files: compared between base and inputs (a warning when they differ).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# A tokenizer is there when one of these is (tokenizer_config.json alone is not enough).
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")
# config.json fields that must agree between the directories merged together (when both have them).
CONFIG_FIELDS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
    "d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads",
    "n_embd", "n_layer", "n_head", "n_positions", "max_position_embeddings",
)  # fmt: skip
FALLBACK_MAX_SHARD = "5GB"
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}


def warn(message: str) -> None:
    """A one-line warning on standard error (standard output may be a pipe of JSON lines)."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# directories as inputs
# --------------------------------------------------------------------------------------------
def hf_root(path: str | os.PathLike[str]) -> Path | None:
    """The Hugging Face directory (one with a config.json) a checkpoint path belongs to, if any."""
    p = Path(path)
    if p.is_dir():
        return p if (p / "config.json").is_file() else None
    if (p.name == "model.safetensors" or p.name.endswith(".safetensors.index.json")) and (p.parent / "config.json").is_file():
        return p.parent
    return None


def read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: is not a JSON object")
    return data


def model_info(root: Path) -> dict[str, Any]:
    """The manifest's ``model`` for weights of this directory's architecture."""
    config = read_config(root)
    archs = config.get("architectures") or []
    return {
        "family": FAMILY,
        "architecture": archs[0] if archs else config.get("model_type"),
        "architectures": list(archs),
        "model_type": config.get("model_type"),
        "source": str(root.resolve()),
    }


def check_configs(roots: Sequence[Path]) -> None:
    """Directories whose configs disagree on an architecture field: one-line error (exit 4)."""
    if len(roots) < 2:
        return
    ref = roots[0]
    ref_cfg = read_config(ref)
    for other in roots[1:]:
        cfg = read_config(other)
        for name in CONFIG_FIELDS:
            if name in ref_cfg and name in cfg and ref_cfg[name] != cfg[name]:
                raise MismatchError(
                    f"{other / 'config.json'}: field {name!r} is {json.dumps(cfg[name])}, but {ref / 'config.json'} has {json.dumps(ref_cfg[name])}"
                )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tokenizers(base: Path, others: Iterable[Path]) -> list[str]:
    """Warn (and return the warnings) for each tokenizer file that differs between base and an input."""
    out = []
    for other in others:
        if other.resolve() == base.resolve():
            continue
        for name in TOKENIZER_FILES:
            a, b = base / name, other / name
            if a.is_file() and b.is_file() and file_sha256(a) != file_sha256(b):
                msg = f"{b} differs from {a}: the inputs may use different tokenizers (the output gets the base's)"
                warn(msg)
                out.append(msg)
    return out


def check_inputs(base: Checkpoint | None, inputs: Sequence[Checkpoint]) -> None:
    """Config agreement and tokenizer warnings over every Hugging Face directory among the inputs."""
    roots = [r for r in (hf_root(c.path) for c in [base, *inputs] if c is not None) if r is not None]
    check_configs(roots)
    base_root = hf_root(base.path) if base is not None else None
    if base_root is not None:
        check_tokenizers(base_root, roots[1:])


# --------------------------------------------------------------------------------------------
# output options
# --------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000000' -> bytes (decimal units as transformers, binary with 'i')."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if s.endswith(u)), None)
        try:
            value = int(float(s[: -len(unit)]) * SIZE_UNITS[unit]) if unit else int(s)
        except ValueError:
            raise UsageError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB, 2GiB or bytes)") from None
    if value <= 0:
        raise UsageError(f"--max-shard-size: {text!r} must be positive")
    return value


def default_max_shard_size() -> int:
    """The installed transformers' ``save_pretrained`` default (5GB before transformers 5), read from
    its source file: importing transformers' model code would cost seconds and ~185 MiB of memory."""
    import importlib.metadata
    import re

    try:
        source = importlib.metadata.distribution("transformers").locate_file("transformers/modeling_utils.py")
        found = re.findall(r"max_shard_size:[^=\n]*=\s*\"(\d+[KMGT]?B)\"", Path(str(source)).read_text())
        if len(set(found)) == 1:
            return parse_size(found[0])
    except Exception:  # noqa: S110 - transformers missing or laid out differently: the fallback below
        pass
    return parse_size(FALLBACK_MAX_SHARD)


@dataclass
class HFOutput:
    """Write a Hugging Face directory instead of one file (see OutputTarget.hf)."""

    max_shard_size: int | None = None  # None: transformers' default
    like: Path | None = None  # config/tokenizer source when the base is not a Hugging Face directory

    def params(self) -> dict[str, Any]:
        return {"format": "hf", "max_shard_size": self.max_shard_size}


def wants_directory(output: str | None, flag: str) -> bool:
    """--format auto: a directory when -o ends with '/' or is an existing directory."""
    if flag not in ("auto", "safetensors", "hf"):
        raise UsageError(f"--format must be auto, safetensors or hf, not {flag!r}")
    if flag != "auto":
        return flag == "hf"
    return output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())


# --------------------------------------------------------------------------------------------
# tied weights
# --------------------------------------------------------------------------------------------
TIED_NAME_HINTS = ("lm_head", "embed", "shared", "wte", "word_embeddings")


def _identical_pairs(base: Checkpoint, keys: Sequence[str]) -> set[frozenset[str]]:
    """Pairs of head/embedding-like keys the base stores with identical bytes (cheap pre-check, so
    that transformers is imported only when tied weights may really be stored twice)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for k in keys:
        if k in base and any(h in k for h in TIED_NAME_HINTS) and base.is_floating(k):
            info = base.info(k)
            groups.setdefault((info.shape, info.dtype), []).append(k)
    pairs = set()
    for names in groups.values():
        tensors = {k: base.get(k) for k in names} if len(names) > 1 else {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if torch.equal(tensors[a], tensors[b]):
                    pairs.add(frozenset((a, b)))
    return pairs


def tied_aliases(root: Path | None, base: Checkpoint | None, keys: Sequence[str]) -> dict[str, str]:
    """{alias: source} of tied weights that ``save_pretrained`` would leave out of the files.

    A pair counts when the base stores both keys with identical bytes and the architecture class's
    ``_tied_weights_keys`` names it. A base that already lacks the alias (the usual case, since
    ``save_pretrained`` leaves it out) needs nothing, and transformers is not even imported."""
    if root is None or base is None:
        return {}
    identical = _identical_pairs(base, keys)
    if not identical:
        return {}
    archs = read_config(root).get("architectures") or []
    pairs: dict[str, str] = {}
    try:
        import transformers

        for arch in archs:
            tied = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None) or {}
            if isinstance(tied, dict):
                pairs.update({a: s for a, s in tied.items() if isinstance(a, str) and isinstance(s, str)})
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {}
    return {a: s for a, s in sorted(pairs.items()) if frozenset((a, s)) in identical}


# --------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------
def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """huggingface_hub's greedy split, over sorted keys: a new shard when the next tensor would
    overflow the current one; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key in sorted(sizes):
        n = sizes[key]
        if n > max_shard_size:
            shards.append([key])
            continue
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def check_directory_output(out: Path, force: bool, inputs: Iterable[Path]) -> None:
    """Refuse an output that is (or holds) an input, or an existing non-empty target without force."""
    target = out.resolve()
    for inp in inputs:
        p = Path(inp).resolve()
        if p == target or target in p.parents:
            raise OutputError(f"{out}: output would overwrite the input {inp}; choose another directory")
    if out.exists() and not force:
        if out.is_dir() and not any(out.iterdir()):
            return
        raise OutputError(f"{out}: exists and is not empty (use --force to replace it)")


def commit_directory(tmp: Path, path: Path, force: bool) -> None:
    """Put the finished temporary directory ``tmp`` at ``path``. Durable (every file and the
    directories fsynced) and, without force, exclusive: rename(2) replaces only an empty directory,
    so an output that appeared meanwhile is not replaced."""
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            safeio.fsync_path(f)
    safeio.fsync_dir(tmp)
    if not force:
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise OutputError(f"{path}: exists and is not empty (use --force to replace it)") from None
            raise
        safeio.fsync_dir(path.parent)
        return
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.tvedit-old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    safeio.fsync_dir(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


class HFDirWriter(safeio.Transaction):
    """The CheckpointWriter interface (write in sorted key order, commit, abort) for a directory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest,
        sizes: dict[str, int],
        *,
        options: HFOutput,
        force: bool = False,
        inputs: Iterable[Path] = (),
        layout: str = "dense",
        source: Path | None = None,
        drop: dict[str, str] | None = None,
    ):
        """``sizes``: output bytes per key (dense; sparse task-vector tensors may come out smaller).
        ``source``: directory whose config and tokenizer files are copied (checkpoints only).
        ``drop``: tied aliases left out of the files ({alias: source})."""
        self.path = Path(path)
        check_directory_output(self.path, force, inputs)
        self.force = force
        self.manifest = manifest
        self.layout = layout
        self.source = source
        self.drop = dict(drop or {})
        self.options = options
        limit = options.max_shard_size or default_max_shard_size()
        self.shards = plan_shards({k: v for k, v in sizes.items() if k not in self.drop}, limit)
        self.names = shard_names(len(self.shards))
        self._shard_of = {k: i for i, keys in enumerate(self.shards) for k in keys}
        self._all_keys = sorted(self._shard_of)
        safeio.make_output_dir(self.path.parent)
        safeio.remove_stale(self.path.parent)  # left by killed runs
        self._tmp = safeio.temp_path(self.path)
        shutil.rmtree(self._tmp, ignore_errors=True)
        try:
            self._tmp.mkdir()
        except OSError as exc:
            raise safeio.cannot_write(self.path, exc) from None
        safeio.register(self._tmp)
        self._writers: list[CheckpointWriter | None] = [None] * len(self.shards)
        self._done = False
        self._dtypes: set[torch.dtype] = set()

    def _writer(self, i: int) -> CheckpointWriter:
        w = self._writers[i]
        if w is None:
            # a task vector's shared manifest lists every sparse key: reserve header room for all
            reserve = self._all_keys if self.manifest.kind != "checkpoint" else self.shards[i]
            w = CheckpointWriter(self._tmp / self.names[i], self.manifest, reserve, layout=self.layout)
            self._writers[i] = w
            if i > 0 and self._writers[i - 1] is not None:
                self._writers[i - 1].finish_data()  # type: ignore[union-attr]
        return w

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.drop:
            return
        if key not in self._shard_of:
            raise ValueError(f"{key!r} was not announced to the writer")
        if tensor.is_floating_point():
            self._dtypes.add(tensor.dtype)
        self._writer(self._shard_of[key]).write(key, tensor)

    def write_chunks(self, key: str, shape: Sequence[int], dtype: torch.dtype, chunks: Iterable[torch.Tensor]) -> None:
        """CheckpointWriter.write_chunks into the key's shard (huge tensors in bounded memory)."""
        if key in self.drop:
            return
        if key not in self._shard_of:
            raise ValueError(f"{key!r} was not announced to the writer")
        if dtype.is_floating_point:
            self._dtypes.add(dtype)
        self._writer(self._shard_of[key]).write_chunks(key, shape, dtype, chunks)

    def commit(self) -> Artifact:
        try:
            writers = [self._writer(i) for i in range(len(self.shards))]  # empty shards too
            written: list[WrittenData] = [w.finish_data() for w in writers]
            manifest = self._shared_manifest(written)
            for w in writers:
                w.commit(manifest)
            weight_map = {k: self.names[i] for i, d in enumerate(written) for k in d.nbytes}
            if len(self.shards) > 1:
                total = sum(n for d in written for n in d.nbytes.values())
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            copied = copy_support_files(self.source, self._tmp) if (self.source and manifest.kind == "checkpoint") else []
            if "config.json" in copied:
                self._check_config_dtype()
            (self._tmp / "README.md").write_text(model_card(manifest, self.path.name, copied, missing_support_files(self._tmp, manifest.kind), self.drop, self.names))
            commit_directory(self._tmp, self.path, self.force)
            safeio.unregister(self._tmp)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return Artifact(self.path, manifest)

    def _check_config_dtype(self) -> None:
        config = read_config(self._tmp)
        declared = config.get("dtype") or config.get("torch_dtype")
        written = sorted(str(d).replace("torch.", "") for d in self._dtypes)
        if isinstance(declared, str) and written and written != [declared]:
            warn(
                f"{self.path}: weights are {', '.join(written)} but the copied config.json says {declared}: "
                f"from_pretrained(dtype='auto') will cast them; pass dtype= to keep {written[0]}"
            )

    def _shared_manifest(self, written: Sequence[WrittenData]) -> Manifest:
        data = self.manifest.to_dict()
        sparse = {k: v for d in written for k, v in d.sparse.items()}
        data["sparse"] = sparse
        data["layout"] = layout_of(sparse, self.manifest.kind)
        if self.manifest.kind in ("task-vector", "mask"):
            numel = sum(d.float_numel for d in written)
            data["density"] = sum(d.nonzero for d in written) / numel if numel else None
        data["sha256"] = combine_digests({k: v for d in written for k, v in d.digests.items()})
        return Manifest.from_dict(data)

    def abort(self) -> None:
        self._done = True
        for w in self._writers:
            if w is not None:
                w.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)
        safeio.unregister(self._tmp)


# --------------------------------------------------------------------------------------------
# support files and the model card
# --------------------------------------------------------------------------------------------
def support_files(source: Path) -> list[str]:
    """Top-level files of a Hugging Face directory that are not weights: config, generation config,
    tokenizer, chat template, processor configs, custom code."""
    out = []
    for p in sorted(source.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in SKIP_NAMES:
            continue
        if any(p.name.endswith(s) for s in WEIGHT_SUFFIXES):
            continue
        out.append(p.name)
    return out


def copy_support_files(source: Path, dest: Path) -> list[str]:
    names = support_files(source)
    for name in names:
        shutil.copyfile(source / name, dest / name)  # bytes only: never parsed or converted
    return names


def missing_support_files(directory: Path, kind: str) -> list[str]:
    """What a loadable directory would usually have and this one lacks."""
    if kind != "checkpoint":
        return []
    missing = [n for n in CONFIG_FILES if not (directory / n).is_file()]
    if not any((directory / n).is_file() for n in TOKENIZER_VOCABS):
        missing.append("a tokenizer (" + ", ".join(TOKENIZER_VOCABS) + ")")
    return missing


def _fmt(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def model_card(manifest: Manifest, name: str, copied: Sequence[str], missing: Sequence[str], dropped: dict[str, str], shards: Sequence[str]) -> str:
    """README.md: what this directory is, the recipe, the inputs with their hashes."""
    step = manifest.provenance[-1] if manifest.provenance else {"op": "?", "params": {}, "inputs": []}
    model = manifest.model
    base = next((i for i in step.get("inputs", []) if i.get("role") == "base"), None)
    lines = ["---", "library_name: transformers", "tags:", "- tvedit", "- merge", "---", "", f"# {name}", ""]
    what = "model weights (θ)" if manifest.kind == "checkpoint" else f"a tvedit {manifest.kind} (not loadable model weights)"
    lines.append(f"This directory holds {what}, written by tvedit {step.get('tvedit', '')} (`tvedit {step.get('op')}`).")
    if model.get("architectures"):
        lines.append(f"Architecture: {', '.join(model['architectures'])} (model_type `{model.get('model_type')}`).")
    lines += ["", "## Recipe", "", f"- operation: `{step.get('op')}`"]
    params = step.get("params", {})
    for key in sorted(params):
        lines.append(f"- {key}: `{_fmt(params[key])}`")
    lines += ["", "## Inputs", "", "| role | path | sha256 | weight |", "|---|---|---|---|"]
    for rec in step.get("inputs", []):
        role = rec.get("role", "input")
        lines.append(f"| {role} | {rec.get('path') or '(pipeline intermediate)'} | `{rec.get('sha256')}` | {rec.get('weight', '')} |")
    lines += ["", "## Files", "", f"- weights: {', '.join(shards)}" + (f" (+ {INDEX_NAME})" if len(shards) > 1 else "")]
    lines.append(f"- content sha256 (tvedit, over every stored tensor): `{manifest.sha256}`")
    if copied:
        src = model.get("source") or (base or {}).get("path") or "the base directory"
        lines.append(f"- copied byte for byte from {src}: {', '.join(copied)}")
    if missing:
        lines.append(f"- not present in the source: {', '.join(missing)}")
    for alias, source in sorted(dropped.items()):
        lines.append(f"- `{alias}` is tied to `{source}` and left out of the files, as `save_pretrained` does")
    lines += ["", "The full manifest (provenance included) is in every shard's safetensors header under the key `tvedit`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# export-hf: a checkpoint file (any architecture) as a Hugging Face directory
# --------------------------------------------------------------------------------------------
def recorded_source(manifest: Manifest | None) -> Path | None:
    """The Hugging Face directory a checkpoint's manifest names (if it is still there)."""
    if manifest is None:
        return None
    model = manifest.model
    candidates = [model.get("source"), (model.get("tokenizer") or {}).get("source")]
    for c in candidates:
        if c and hf_root(c) is not None:
            return Path(c)
    return None


def _architectures(model: dict[str, Any]) -> list[str]:
    archs = model.get("architectures") or ([model["architecture"]] if model.get("architecture") else [])
    return [a for a in archs if a]


def _check_against_source(ckpt: Checkpoint, source: Path) -> None:
    """The checkpoint must be weights of the architecture the source's config describes."""
    config_archs = read_config(source).get("architectures") or []
    recorded = _architectures(ckpt.manifest.model) if ckpt.manifest else []
    if recorded and config_archs and not set(recorded) & set(config_archs):
        raise MismatchError(f"{ckpt.path}: holds {recorded[0]} weights, but {source / 'config.json'} describes {config_archs[0]}")
    if not ((source / "model.safetensors").is_file() or (source / INDEX_NAME).is_file()):
        return
    ref = Checkpoint(source)
    ours, theirs = set(ckpt.keys()), set(ref.keys())
    for key in sorted(theirs - ours):
        raise MismatchError(f"{ckpt.path}: key {key!r} of {source} is missing")
    for key in sorted(ours - theirs):
        raise MismatchError(f"{ckpt.path}: key {key!r} is not in {source}")
    for key in sorted(ours):
        if ckpt.info(key).shape != ref.info(key).shape:
            raise MismatchError(f"{ckpt.path}: key {key!r}: shape {list(ckpt.info(key).shape)} does not match {list(ref.info(key).shape)} in {source}")


def export(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: int | None = None,
) -> Artifact:
    """A tvedit checkpoint as a Hugging Face directory: its tensors (cast to ``dtype`` if given),
    and the config and tokenizer files of ``like`` or of the directory its manifest records."""
    ckpt = Checkpoint(checkpoint)
    if ckpt.kind != "checkpoint":
        raise InputError(f"{checkpoint}: is a {ckpt.kind}; export-hf writes checkpoints (apply it first: tvedit add --base)")
    src_manifest = ckpt.manifest or Manifest()
    if src_manifest.regime == "linearized":
        raise MismatchError(f"{checkpoint}: holds linearized weights, which only mean something under f_lin; a Hugging Face model would run them non-linearly")
    source = Path(like) if like is not None else recorded_source(ckpt.manifest)
    if source is None:  # (models/hf_seq2seq.export_hf writes a seq2seq checkpoint from its recorded config)
        raise MismatchError(f"{checkpoint}: model family {src_manifest.family!r} records no Hugging Face directory to take the config and tokenizer from; pass --like HF_DIR")
    if hf_root(source) is None:
        raise InputError(f"{source}: not a Hugging Face directory (no config.json)")
    _check_against_source(ckpt, source)
    keys = ckpt.keys()
    model = dict(src_manifest.model) if src_manifest.family != "unknown" else model_info(source)
    params = {"dtype": str(dtype).replace("torch.", "") if dtype else None, "max_shard_size": max_shard_size}
    record = {"path": str(checkpoint), "sha256": ckpt.sha256, "kind": ckpt.kind}
    manifest = Manifest.from_dict({**src_manifest.to_dict(), "model": model, "sparse": {}}).with_step("export-hf", params, [record])
    sizes = {}
    for k in keys:
        info = ckpt.info(k)
        d = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        sizes[k] = torch.Size(info.shape).numel() * d.itemsize
    missing = missing_support_files(source, "checkpoint")
    if missing:
        warn(f"{source}: has no {', '.join(missing)}; the directory is written without it")
    options = HFOutput(max_shard_size, Path(like) if like is not None else None)
    drop = tied_aliases(source, ckpt, keys)
    with HFDirWriter(out_dir, manifest, sizes, options=options, force=force, inputs=[Path(checkpoint), source], source=source, drop=drop) as w:
        for key in keys:
            t = ckpt.get(key)
            w.write(key, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
        return w.commit()
