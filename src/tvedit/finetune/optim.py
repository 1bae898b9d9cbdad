"""The learning-rate schedule and a masked AdamW whose state exists only for the trained entries."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from tvedit.finetune.sharding import local

SCHEDULES = ("cosine", "constant")


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (step is 0-based);
    ``constant``: the same warm-up, then ``base_lr`` to the end."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr


class MaskedAdamW:
    """AdamW (decoupled weight decay, bias-corrected, PyTorch's update rule) over named parameters.

    With a mask for a parameter, only its kept entries are gathered, updated (weight decay included)
    and scattered back: the others never move, and the moment buffers hold only kept entries.
    Sharded (FSDP) parameters, gradients and masks are DTensors: the update runs on this rank's
    local shard of each (elementwise, so it is the unsharded update restricted to the shard).
    """

    def __init__(self, params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.1):
        self.params = dict(params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.index: dict[str, Tensor | None] = {}
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        for name, p in self.params.items():
            m = None if masks is None or name not in masks else local(masks[name])
            shard = local(p)
            idx = None if m is None or bool(m.all()) else m.reshape(-1).nonzero().squeeze(1).to(shard.device)
            self.index[name] = idx
            n = shard.numel() if idx is None else idx.numel()
            self.exp_avg[name] = torch.zeros(n, dtype=torch.float32, device=shard.device)
            self.exp_avg_sq[name] = torch.zeros(n, dtype=torch.float32, device=shard.device)
        self.step_count = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        c1 = 1 - b1**self.step_count
        c2 = 1 - b2**self.step_count
        for name, p in self.params.items():
            if p.grad is None:
                continue
            idx = self.index[name]
            flat = local(p).view(-1)
            g = local(p.grad).reshape(-1)
            if idx is None:  # float32 parameters are updated in place (.float() returns them)
                w, g = flat.float(), g.float()
            else:  # index_select / index_copy_: about 3x faster than flat[idx] / flat[idx] = w
                w, g = flat.index_select(0, idx).float(), g.index_select(0, idx).float()
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            w.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            w.addcdiv_(m, denom, value=-lr / c1)
            if idx is not None:
                flat.index_copy_(0, idx, w.to(flat.dtype))
            elif w.data_ptr() != flat.data_ptr():
                flat.copy_(w)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_tensors(self) -> dict[str, Tensor]:
        out = {}
        for name in self.params:
            out[f"exp_avg/{name}"] = self.exp_avg[name]
            out[f"exp_avg_sq/{name}"] = self.exp_avg_sq[name]
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor], step_count: int) -> None:
        for name in self.params:
            self.exp_avg[name].copy_(tensors[f"exp_avg/{name}"])
            self.exp_avg_sq[name].copy_(tensors[f"exp_avg_sq/{name}"])
        self.step_count = step_count
