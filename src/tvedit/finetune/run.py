"""Library entry points behind ``tvedit init``, ``tvedit calibrate`` and ``tvedit finetune``."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tvedit import safeio
from tvedit.data.images import ImageData, ImageDataset, load_image_data, resolve_templates
from tvedit.data.splits import split_indices, stream_batches
from tvedit.data.text import TextFinetuneTask, is_text_task, load_finetune_task
from tvedit.errors import MismatchError, UsageError
from tvedit.finetune.config import FinetuneConfig
from tvedit.manifest import Manifest, base_ref
from tvedit.models import hf_seq2seq
from tvedit.models.base import pick_device
from tvedit.models.open_clip import OpenClipAdapter, load_pretrained
from tvedit.reader import open_checkpoint
from tvedit.writer import Artifact, check_output, save_tensors

Progress = Callable[[int, int, str], None]


def sibling(output: Path, suffix: str) -> Path:
    """OUT.safetensors -> OUT.<suffix> (theta0.safetensors, mask.safetensors, train.jsonl, resume)."""
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(f"{stem}.{suffix}")


# ------------------------------------------------------------------------------------------------
# theta0
# ------------------------------------------------------------------------------------------------
@dataclass
class Theta0:
    adapter: OpenClipAdapter
    state: dict[str, Tensor]
    sha256: str
    path: Path

    def ref(self) -> dict[str, Any]:
        return base_ref(self.sha256, str(self.path))

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "kind": "checkpoint", "role": "base"}


def _adapter(model: str | None) -> OpenClipAdapter | None:
    return OpenClipAdapter.from_name(model) if model else None


def init(model: str | None, pretrained: str | None, output: Path, *, seed: int = 0, force: bool = False) -> Artifact:
    """Materialise theta0 as a tvedit checkpoint (kind checkpoint, model info in the manifest)."""
    check_output(output, force)
    if hf_seq2seq.is_text_model(model, pretrained):  # a Hugging Face seq2seq directory
        return hf_seq2seq.init_from_directory(str(next(x for x in (pretrained, model) if x and hf_seq2seq.is_hf_directory(x))), output, force=force)
    if pretrained is None:
        raise UsageError("--pretrained is required for open_clip models")
    adapter, state, source = load_pretrained(_adapter(model), pretrained, seed)
    manifest = Manifest(kind="checkpoint", model=adapter.model_info()).with_step("init", {"model": model, **source}, [])
    return save_tensors(output, state, manifest, force=force)


def resolve_theta0(model: str | None, pretrained: str, *, seed: int, materialise: Path) -> Theta0:
    """theta0 from a tvedit checkpoint (its own hash), or materialised at ``materialise`` (reused
    when it already holds the same tensors) so that every output can record the base's hash."""
    if hf_seq2seq.is_text_model(model, pretrained):
        return Theta0(*hf_seq2seq.load_theta0(model, pretrained, materialise))  # type: ignore[arg-type]
    path = Path(pretrained)
    if path.exists() and path.suffix == ".safetensors":
        ckpt = open_checkpoint(path)
        if ckpt.manifest is not None and ckpt.manifest.family != "unknown" and ckpt.kind == "checkpoint":
            adapter, state, _ = load_pretrained(_adapter(model), pretrained, seed)
            return Theta0(adapter, state, ckpt.sha256, path)
    adapter, state, source = load_pretrained(_adapter(model), pretrained, seed)
    manifest = Manifest(kind="checkpoint", model=adapter.model_info()).with_step("init", {"model": model, **source}, [])
    if materialise.exists():
        existing = open_checkpoint(materialise)
        tmp = save_tensors(materialise.with_name(materialise.name + ".check"), state, manifest, force=True)
        tmp.path.unlink()
        if existing.sha256 != tmp.sha256:
            raise MismatchError(f"{materialise}: exists and holds a different theta0; remove it or choose another output")
        return Theta0(adapter, state, existing.sha256, materialise)
    art = save_tensors(materialise, state, manifest)
    return Theta0(adapter, state, art.sha256, materialise)


# ------------------------------------------------------------------------------------------------
# task, data, head
# ------------------------------------------------------------------------------------------------
@dataclass
class Task:
    data: ImageData
    name: str
    templates: list[str]
    train_idx: list[int]
    heldout_idx: list[int]
    data_sha256: str
    cfg: FinetuneConfig

    def record(self) -> dict[str, Any]:
        held = hashlib.sha256(json.dumps(self.heldout_idx).encode()).hexdigest()
        return {
            "name": self.name,
            "classes": self.data.classes,
            "templates": self.templates,
            "data": {"source": str(self.data.root), "sha256": self.data_sha256, "n": len(self.data)},
            "split": {"seed": self.cfg.split_seed, "heldout_fraction": self.cfg.heldout_fraction, "heldout_max": self.cfg.heldout_max,
                      "n_train": len(self.train_idx), "n_heldout": len(self.heldout_idx), "heldout_sha256": held},
        }  # fmt: skip


def load_task(train: Path, cfg: FinetuneConfig, *, task: str | None = None, class_names: Path | None = None, templates: Path | None = None) -> Task:
    if is_text_task(train):  # JSONL text task (seq2seq family): same duck-typed interface
        return load_finetune_task(train, name=task, mode=cfg.mode, heldout_fraction=cfg.heldout_fraction, split_seed=cfg.split_seed, heldout_max=cfg.heldout_max)  # type: ignore[return-value]
    data = load_image_data(train, class_names)
    name = task or (train.stem if train.is_file() else train.resolve().name)
    tr, held = split_indices(len(data), cfg.heldout_fraction, cfg.split_seed, cfg.heldout_max)
    return Task(data, name, resolve_templates(name, templates), tr, held, data.fingerprint(), cfg)


def zero_shot_head(theta0: Theta0, model: torch.nn.Module, task: Task) -> Tensor:
    """The frozen head from theta0's text encoder, cached by hash of (theta0, classes, templates)."""
    if isinstance(task, TextFinetuneTask):
        return task.head(theta0.adapter)
    from safetensors.torch import load_file, save_file

    from tvedit.headers import cache_dir

    key = hashlib.sha256(json.dumps([theta0.sha256, task.data.classes, task.templates]).encode()).hexdigest()
    cache = cache_dir() / "heads" / f"{key}.safetensors"
    device = next(model.parameters()).device
    if cache.exists():
        try:
            return load_file(str(cache))["head"].to(device)
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            pass
    head = theta0.adapter.make_head(model, {"classes": task.data.classes, "templates": task.templates})
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with safeio.replacing(cache) as tmp:
            save_file({"head": head.cpu().contiguous()}, str(tmp))
    except OSError:
        pass
    return head


def _loader(task: Task, indices: list[int], adapter: OpenClipAdapter, batch: int, seed: int, cfg: FinetuneConfig, start: int = 0, rank: int = 0, world: int = 1, train: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(task, TextFinetuneTask):
        return task.loader(indices, adapter, batch, seed, start, rank, world)
    ds = ImageDataset(task.data, indices, adapter.transform(train=train), seed)
    sampler = stream_batches(len(indices), batch, seed, start, rank, world)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers)  # type: ignore[arg-type]
    return iter(loader)


def _validation(task: Task, adapter: OpenClipAdapter, regime: Any, head: Any, cfg: FinetuneConfig, device: torch.device) -> Callable[[], float] | None:
    """The mean loss on the held-out split (eval transform, one pass), for --eval-every."""
    if not cfg.eval_every:
        return None
    indices = task.heldout_idx
    if not indices:
        raise UsageError("--eval-every: the task has no held-out examples to validate on (the T5 recipe validates by default: --eval-every 0 turns it off)")
    n_batches = -(-len(indices) // cfg.batch_size)

    def validate() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in itertools.islice(_loader(task, indices, adapter, cfg.batch_size, cfg.split_seed, cfg, train=False), n_batches):
                x, y = x.to(device), y.to(device)
                total += float(adapter.loss(regime.logits(x, head).float(), y, 0.0))
                count += int(y.shape[0])
        return total / max(1, count)

    return validate


# ------------------------------------------------------------------------------------------------
# calibrate
# ------------------------------------------------------------------------------------------------
def _calibrate(theta0: Theta0, task: Task, cfg: FinetuneConfig, device: torch.device, progress: Progress | None) -> dict[str, Tensor]:
    from tvedit.finetune.calibration import calibrate_mask

    adapter = theta0.adapter
    model = adapter.build(theta0.state).to(device)
    head = zero_shot_head(theta0, model, task)
    indices = task.heldout_idx or task.train_idx
    batches = (x.to(device) for x, _ in _loader(task, indices, adapter, cfg.calib_batch_size or cfg.batch_size, cfg.seed + 1, cfg))
    return calibrate_mask(adapter, model, head, batches, density=cfg.density, rounds=cfg.rounds, calib_batches=cfg.calib_batches,
                          soft_value=cfg.soft_value, variant=cfg.fisher, seed=cfg.seed, chunk=cfg.calib_chunk, progress=progress)  # fmt: skip


def _calib_params(cfg: FinetuneConfig) -> dict[str, Any]:
    names = ("density", "rounds", "calib_batches", "calib_batch_size", "soft_value", "fisher", "seed", "split_seed", "heldout_fraction", "heldout_max")
    return {n: getattr(cfg, n) for n in names}


def _write_mask(mask: dict[str, Tensor], output: Path, theta0: Theta0, task: Task, cfg: FinetuneConfig, force: bool) -> Artifact:
    manifest = Manifest(kind="mask", model=theta0.adapter.model_info(), base=theta0.ref(), task=task.record()).with_step(
        "calibrate", _calib_params(cfg), [theta0.record(), {"path": str(task.data.root), "sha256": task.data_sha256, "kind": "data"}]
    )
    return save_tensors(output, mask, manifest, force=force)


def calibrate(model: str | None, pretrained: str, train: Path, output: Path, cfg: FinetuneConfig, *, task: str | None = None,
              class_names: Path | None = None, templates: Path | None = None, force: bool = False, progress: Progress | None = None) -> list[Artifact]:  # fmt: skip
    """A TaLoS mask (kind mask) calibrated on ``train``'s held-out split; reusable across tasks."""
    check_output(output, force)
    the_task = load_task(train, cfg, task=task, class_names=class_names, templates=templates)
    theta0 = resolve_theta0(model, pretrained, seed=cfg.seed, materialise=sibling(output, "theta0.safetensors"))
    mask = _calibrate(theta0, the_task, cfg, pick_device(cfg.device), progress)
    return [_write_mask(mask, output, theta0, the_task, cfg, force)]


def load_mask(path: Path, theta0: Theta0) -> tuple[dict[str, Tensor], str]:
    from tvedit.finetune.regimes import check_mask

    ckpt = open_checkpoint(path)
    if ckpt.kind != "mask":
        raise MismatchError(f"{path}: is a {ckpt.kind}, not a mask")
    return check_mask(theta0.adapter, {k: ckpt.get(k) for k in ckpt.keys()}, str(path)), ckpt.sha256


# ------------------------------------------------------------------------------------------------
# finetune
# ------------------------------------------------------------------------------------------------
def finetune(
    model: str | None,
    pretrained: str,
    train: Path,
    output: Path,
    cfg: FinetuneConfig,
    *,
    task: str | None = None,
    class_names: Path | None = None,
    templates: Path | None = None,
    mask: Path | None = None,
    emit: str = "checkpoint",
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    calib_progress: Progress | None = None,
) -> list[Artifact]:
    """Fine-tune the image encoder; returns [output (, mask)] or [] when stopped early (--stop-after)."""
    from tvedit.finetune.loop import Dist
    from tvedit.finetune.loop import train as train_loop
    from tvedit.finetune.regimes import make_regime

    if emit not in ("checkpoint", "vector"):
        raise UsageError(f"--emit must be 'checkpoint' or 'vector', not {emit!r}")
    if mask is not None and cfg.mode != "sparse":
        raise UsageError("--mask is only used with --mode sparse")
    check_output(output, force or resume)
    the_task = load_task(train, cfg, task=task, class_names=class_names, templates=templates)
    dist = Dist.from_env()
    if cfg.batch_size % dist.world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {dist.world} processes")
    theta0 = resolve_theta0(model, pretrained, seed=cfg.seed, materialise=sibling(output, "theta0.safetensors"))
    adapter = theta0.adapter
    if cfg.train_embeddings:
        if not hasattr(adapter, "train_embeddings"):
            raise UsageError(f"--train-embeddings: the {adapter.family} family has no frozen embeddings (it applies to hf-causal models)")
        adapter.train_embeddings = True  # recorded in the output's model record
    device = pick_device(cfg.device, dist.rank)
    artifacts: list[Artifact] = []

    masks, mask_sha = None, None
    if cfg.mode == "sparse":
        mask_path = mask or sibling(output, "mask.safetensors")
        if mask is None and not (resume and mask_path.exists()):
            if dist.rank == 0:
                artifacts.append(_write_mask(_calibrate(theta0, the_task, cfg, device, calib_progress), mask_path, theta0, the_task, cfg, force))
            if dist.world > 1:
                torch.distributed.barrier()
        masks, mask_sha = load_mask(mask_path, theta0)

    net = adapter.build(theta0.state).to(device)
    head = zero_shot_head(theta0, net, the_task)
    if cfg.grad_checkpointing:
        adapter.set_grad_checkpointing(net, True)
    if cfg.sharding == "fsdp" and dist.world > 1:  # with one process there is nothing to shard
        from tvedit.finetune.sharding import shard

        shard(adapter.shard_units(net), device)
        dist.sharded = True
    regime = make_regime(cfg.mode, adapter, net, attn_bias=cfg.attn_bias, masks=masks, clip_scope=cfg.clip_scope)
    if dist.sharded:
        from tvedit.finetune.sharding import unsharded

        outside = unsharded({**regime.params, **regime.clip_extra})
        if outside:
            raise UsageError(f"--sharding fsdp: {outside[0]!r} trains but lies outside the modules the {adapter.family} adapter shards; use --sharding ddp")
    flin = {"flin": adapter.flin} if cfg.mode == "linearized" else {}  # which f_lin trained it (evaluation checks)
    fingerprint = {"base": theta0.sha256, "data": the_task.data_sha256, "mask": mask_sha, "world": dist.world, **flin,
                   **{k: v for k, v in cfg.params().items() if k not in ("stop_after", "checkpoint_every", "num_workers", "log_every", "device")}}  # fmt: skip
    step = train_loop(
        regime, head,
        lambda start: ((x, y) for x, y in _loader(the_task, the_task.train_idx, adapter, cfg.batch_size, cfg.seed, cfg, start, dist.rank, dist.world)),
        cfg, device=device, dist=dist, log_path=sibling(output, "train.jsonl"), resume_dir=sibling(output, "resume"),
        resume=resume, fingerprint=fingerprint, progress=progress, validate=_validation(the_task, adapter, regime, head, cfg, device),
    )  # fmt: skip
    if dist.sharded and step == cfg.steps:  # every rank takes part in gathering the shards
        from tvedit.finetune.sharding import full_state

        gathered = full_state(net, dist.rank)
        if gathered is not None:
            net = adapter.build(theta0.state)
            net.load_state_dict(gathered)
    if step < cfg.steps or dist.rank != 0:
        dist.close()
        return artifacts

    state = adapter.state_dict(net)
    params = {**cfg.params(), "emit": emit, "model": model, "pretrained": pretrained, **flin}
    if masks is not None:  # the density actually trained (a --mask file's own, not --density): alpha widening reads it
        params["density"] = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    inputs = [theta0.record(), {"path": str(the_task.data.root), "sha256": the_task.data_sha256, "kind": "data"}]
    if mask_sha is not None:
        inputs.append({"path": str(mask or sibling(output, "mask.safetensors")), "sha256": mask_sha, "kind": "mask"})
    kind = "checkpoint" if emit == "checkpoint" else "task-vector"
    manifest = Manifest(kind=kind, model=adapter.model_info(), regime=regime.manifest_regime, base=theta0.ref(), task=the_task.record()).with_step("finetune", params, inputs)
    if emit == "vector":
        state = {k: (v.float() - theta0.state[k].float()).to(theta0.state[k].dtype) for k, v in state.items() if v.is_floating_point()}
    artifacts.insert(0, save_tensors(output, state, manifest, force=force or resume, layout="auto" if emit == "vector" else "dense", inputs=[theta0.path]))
    import shutil

    shutil.rmtree(sibling(output, "resume"), ignore_errors=True)
    dist.close()
    return artifacts
