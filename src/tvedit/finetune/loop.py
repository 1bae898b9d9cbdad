"""The training loop, written once for every regime; resumable from safetensors + JSON state."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tvedit import safeio
from tvedit.errors import UsageError
from tvedit.finetune.config import FinetuneConfig
from tvedit.finetune.optim import MaskedAdamW, lr_at
from tvedit.finetune.regimes import Regime
from tvedit.finetune.sharding import local

Progress = Callable[[int, int, str], None]


@dataclass
class Dist:
    """torchrun's environment (rank 0 of 1 without it); ``sharded``: the model is FSDP-sharded (each
    rank holds and saves its own shard; FSDP averages the gradients itself)."""

    rank: int = 0
    world: int = 1
    sharded: bool = False

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def close(self) -> None:
        """Wait for every rank, then tear the process group down: a rank that exits with its gloo
        group alive while another still works can abort at exit ("terminate called without an
        active exception")."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                self.barrier()
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_mean(self, tensors: list[Tensor]) -> None:
        if self.world > 1:
            import torch.distributed as dist

            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world)


# -- resume state: safetensors (tensors) + JSON (counters, fingerprint); no pickle -----------------
@dataclass
class EarlyStopping:
    """Best validation loss so far, the parameters that reached it, and validations since."""

    patience: int = 0  # 0: never stop early (the best weights are still kept)
    best: float = float("inf")
    best_step: int = 0
    bad: int = 0
    snapshot: dict[str, Tensor] | None = None

    def update(self, loss: float, step: int, params: dict[str, Tensor]) -> bool:
        """Record a validation; True when patience has run out."""
        if loss < self.best:
            self.best, self.best_step, self.bad = loss, step, 0
            self.snapshot = {k: p.detach().clone() for k, p in params.items()}
        else:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def restore(self, params: dict[str, Tensor]) -> None:
        if self.snapshot is not None:
            with torch.no_grad():
                for k, p in params.items():
                    local(p).copy_(local(self.snapshot[k]))

    def meta(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}


def _state_file(directory: Path, dist: Dist) -> Path:
    """Rank 0's file holds the whole state (replicas are identical); FSDP: one file per rank's shard."""
    return directory / (f"state.rank{dist.rank}.safetensors" if dist.sharded else "state.safetensors")


def save_state(directory: Path, step: int, regime: Regime, opt: MaskedAdamW, fingerprint: dict[str, Any], early: EarlyStopping | None = None, dist: Dist | None = None) -> None:
    """Called by rank 0, or by every rank when sharded: state.json (written last, by rank 0, after
    every rank's tensors) commits the step."""
    from safetensors.torch import save_file

    dist = dist or Dist()
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{k}": local(p).detach().cpu().contiguous() for k, p in regime.params.items()}
    tensors.update({k: v.cpu().contiguous() for k, v in opt.state_tensors().items()})
    if early is not None and early.snapshot is not None:
        tensors.update({f"best/{k}": local(v).cpu().contiguous() for k, v in early.snapshot.items()})
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    tensors["meta/step"] = torch.tensor([step], dtype=torch.int64)
    with safeio.replacing(_state_file(directory, dist)) as tmp:
        save_file(tensors, str(tmp))
    if dist.sharded:
        dist.barrier()
    if dist.rank != 0:
        return
    meta = {"step": step, "optimizer_steps": opt.step_count, "fingerprint": fingerprint}
    if early is not None:
        meta["early_stopping"] = early.meta()
    with safeio.replacing(directory / "state.json") as tmp:
        tmp.write_text(json.dumps(meta, sort_keys=True, indent=1))


def load_state(directory: Path, regime: Regime, opt: MaskedAdamW, fingerprint: dict[str, Any], early: EarlyStopping | None = None, dist: Dist | None = None) -> int:
    from safetensors.torch import load_file

    dist = dist or Dist()
    try:
        meta = json.loads((directory / "state.json").read_text())
        tensors = load_file(str(_state_file(directory, dist)))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: no usable resume state in {directory}: {exc}") from None
    if meta.get("fingerprint") != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(meta.get("fingerprint", {})) if fingerprint.get(k) != meta.get("fingerprint", {}).get(k))
        raise UsageError(f"--resume: {directory} was written by a different run (differs in: {', '.join(diff)})")
    if "meta/step" in tensors and int(tensors["meta/step"]) != int(meta["step"]):  # killed between the rank files and state.json
        raise UsageError(f"--resume: {_state_file(directory, dist)} holds step {int(tensors['meta/step'])}, state.json step {meta['step']}: the state is incomplete; start again without --resume")
    with torch.no_grad():
        for k, p in regime.params.items():
            local(p).copy_(tensors[f"param/{k}"])
    opt.load_state_tensors(tensors, int(meta["optimizer_steps"]))
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    if early is not None and "early_stopping" in meta:
        e = meta["early_stopping"]
        early.best, early.best_step, early.bad = float(e["best"]), int(e["best_step"]), int(e["bad"])
        best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")}
        early.snapshot = {k: best[k].to(local(p).device) for k, p in regime.params.items()} if best else None
    return int(meta["step"])


def _agreed_signal(dist: Dist) -> int | None:
    """The postponed signal, agreed across ranks (torchrun signals them all, not at the same step)."""
    signum = safeio.take_pending()
    if dist.world > 1:
        flag = torch.tensor([0.0 if signum is None else 1.0], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce_mean([flag])
        if float(flag) > 0 and signum is None:
            signum = 15
    return signum


def train_step(
    regime: Regime,
    opt: MaskedAdamW,
    head: Any,
    inputs: Tensor,
    labels: Tensor,
    lr: float,
    cfg: FinetuneConfig,
    *,
    local_batch: int,
    micro: int,
    dist: Dist,
    autocast: Any = None,
) -> float:
    """One optimizer step over this rank's share of a global batch (gradient accumulation over
    micro-batches, mean loss over the GLOBAL batch); returns the loss."""
    loss_sum = 0.0
    for s in range(0, inputs.shape[0], micro):
        with autocast or nullcontext():
            logits = regime.logits(inputs[s : s + micro], head)
        loss = regime.adapter.loss(logits.float(), labels[s : s + micro], cfg.label_smoothing) / local_batch
        loss.backward()
        loss_sum += float(loss.detach())
    params = list(regime.params.values())
    if dist.world > 1:  # the logged loss is the global batch's mean too
        total = torch.tensor([loss_sum], device=local(params[0]).device)  # (text inputs are token batches, not tensors)
        dist.all_reduce_mean([total])
        loss_sum = float(total)
    normed = params + list(regime.clip_extra.values())  # the tensors whose gradient the clip norm covers
    if not dist.sharded:  # FSDP's reduce-scatter has averaged the (sharded) gradients already
        dist.all_reduce_mean([p.grad for p in normed if p.grad is not None])
    if cfg.grad_clip > 0 and regime.clip_before_mask:  # sparse, clip_scope full: the authors' order
        torch.nn.utils.clip_grad_norm_(normed, cfg.grad_clip)
    regime.after_backward()
    if cfg.grad_clip > 0 and not regime.clip_before_mask:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step(lr)
    opt.zero_grad()
    return loss_sum


def train(
    regime: Regime,
    head: Any,
    batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]],
    cfg: FinetuneConfig,
    *,
    device: torch.device,
    dist: Dist | None = None,
    log_path: Path | None = None,
    resume_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    progress: Progress | None = None,
    validate: Callable[[], float] | None = None,
) -> int:
    """Train ``regime.params`` for ``cfg.steps`` steps; returns the step reached (< steps when
    ``cfg.stop_after`` interrupted the run; ``cfg.steps`` when it ended, early stopping included).
    ``batches(start)`` yields this rank's share of each global batch from step ``start`` on.

    With ``cfg.eval_every`` and ``validate`` (the mean held-out loss; every rank computes the same
    value, so every rank takes the same decision), the parameters of the best validation loss are
    kept and restored at the end, and with ``cfg.patience`` the run stops after that many
    validations without improvement."""
    dist = dist or Dist()
    fingerprint = fingerprint or {}
    opt = MaskedAdamW(regime.params, regime.masks, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    early = EarlyStopping(cfg.patience) if (cfg.eval_every and validate is not None) else None
    start = load_state(resume_dir, regime, opt, fingerprint, early, dist) if resume and resume_dir is not None else 0
    regime.model.train()
    local_batch = cfg.batch_size // dist.world
    micro = cfg.micro_batch or local_batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log = open(log_path, "a") if (log_path is not None and dist.rank == 0) else None  # noqa: SIM115
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    t0, seen = time.perf_counter(), 0
    step = start
    # SIGINT/SIGTERM with checkpointing configured: finish the step, save resume state, then stop
    save_on_signal = resume_dir is not None and bool(cfg.checkpoint_every)
    try:
        guard = safeio.deferred_signals() if save_on_signal else nullcontext()
        guard.__enter__()
        stream = batches(start)
        for step in range(start, end):
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.schedule)
            inputs, labels = next(stream)
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss_sum = train_step(regime, opt, head, inputs, labels, lr, cfg, local_batch=local_batch, micro=micro, dist=dist, autocast=autocast)
            seen += cfg.batch_size
            done = step + 1
            rate = seen / max(1e-9, time.perf_counter() - t0)
            if log is not None and (done % cfg.log_every == 0 or done == end or step == start):
                log.write(json.dumps({"step": done, "loss": loss_sum, "lr": lr, "examples_per_s": round(rate, 2), "elapsed_s": round(time.perf_counter() - t0, 3)}) + "\n")
                log.flush()
            if progress is not None:
                progress(done, cfg.steps, f"loss {loss_sum:.4f}  lr {lr:.2e}  {rate:.1f} ex/s")
            stop = False
            if early is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                regime.model.eval()
                val = validate()  # type: ignore[misc]  # early exists only with validate
                regime.model.train()
                stop = early.update(val, done, regime.params)
                if log is not None:
                    log.write(json.dumps({"step": done, "val_loss": val, "best_step": early.best_step, **({"early_stop": True} if stop else {})}) + "\n")
                    log.flush()
            if stop:
                end = cfg.steps  # the run is complete: stopped early
                break
            signum = _agreed_signal(dist) if save_on_signal else None
            periodic = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or (done == end and end < cfg.steps)
            if resume_dir is not None and (dist.rank == 0 or dist.sharded) and (periodic or signum is not None):
                save_state(resume_dir, done, regime, opt, fingerprint, early, dist)
            if signum is not None:
                raise safeio.Interrupted(signum, f"resume state saved at step {done} in {resume_dir}; continue with --resume")
        step = end
    finally:
        if save_on_signal:
            try:
                guard.__exit__(None, None, None)
            except safeio.Interrupted:  # a signal after the last step's check: the run is complete anyway
                pass
        if log is not None:
            log.close()
    if early is not None and step == cfg.steps:
        early.restore(regime.params)
    regime.model.eval()
    return step
