"""FSDP (``--sharding fsdp``): each rank holds 1/N of every parameter, gradient and optimizer moment.

Under ``torchrun`` with ``--sharding fsdp`` the model is split with torch's ``fully_shard`` (FSDP2):
each unit the adapter names (its transformer blocks, then the module that holds everything that
trains: the model, or CLIP's image tower) becomes an FSDP module whose parameters are DTensors
sharded along dim 0. The loop's arithmetic then runs on the local shards:

* gradients: FSDP's reduce-scatter already averages them over ranks (the DDP path's all-reduce is
  skipped); the clip norm is the global one (``clip_grad_norm_`` over DTensors);
* sparse: the TaLoS mask is distributed like its parameter (:func:`like`), so masking the gradient
  and the masked AdamW (which gathers the kept entries of the LOCAL shard, :func:`local`) never need
  the whole tensor;
* the output: every rank takes part in gathering the full tensors (:func:`full_state`); rank 0 writes.

Elementwise, the update of each entry is the one DDP (or one process) computes: the trained weights
agree to rounding (tests/test_fsdp.py). Not sharded: TaLoS calibration (rank 0 scores the whole
model before training, as with DDP) and the ``linearized`` regime (torch.func's jvp does not run
through FSDP's parameter hooks: refused with a usage error).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

SHARDINGS = ("ddp", "fsdp")


def sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (it has a device mesh), without importing torch.distributed."""
    return getattr(t, "device_mesh", None) is not None


def local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view: in-place updates reach the parameter); a plain tensor as is."""
    return t.to_local() if sharded(t) else t


def like(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (the whole tensor, the same on every rank) placed like ``param``: a DTensor with its mesh
    and placements when ``param`` is sharded; else ``t`` on ``param``'s device."""
    if not sharded(param):
        return t.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(local(param).device), param.device_mesh, param.placements)


def shard(units: list[nn.Module], device: torch.device) -> None:
    """``fully_shard`` each unit in order (innermost first, the outermost last) over one mesh of every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)


def unsharded(named: dict[str, Tensor]) -> list[str]:
    """Names of tensors that are not sharded (every trained tensor must be: FSDP averages only those)."""
    return sorted(k for k, t in named.items() if not sharded(t))


def full_state(model: nn.Module, rank: int) -> dict[str, Any] | None:
    """The whole state dict on CPU, gathered from the shards (a collective: every rank calls it);
    rank 0 gets it, the others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rank == 0 else None
