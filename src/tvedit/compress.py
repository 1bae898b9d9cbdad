"""``compress``: store task vectors' matrices as truncated SVD factors (the low-rank layout).

Streams key by key: each selected 2-D floating tensor is read (in float32), decomposed once (the
route of $TVEDIT_SVD, tvedit.ops.svd), cut to the rank chosen by exactly one of ``rank``,
``rank_fraction`` or ``energy`` (svd.choose_rank), and
written as ``KEY::U``, ``KEY::S``, ``KEY::V`` (writer.CheckpointWriter.write_lowrank; the dense
truncated product when the factors would not be smaller). Every other tensor is copied. Semantics
and layout: docs/methods.md ("Low-rank task vectors"), docs/manifest.md ("Low-rank layout").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from tvedit.engine import ArithOptions, Progress, Slot, as_spec, as_target, input_record
from tvedit.errors import InputError, UsageError
from tvedit.manifest import Manifest
from tvedit.merging import svd_route
from tvedit.ops import svd
from tvedit.pipeline import InputSpec, OutputTarget, consume_ephemeral
from tvedit.reader import open_checkpoint
from tvedit.writer import Artifact, CheckpointWriter


def check_rank_options(rank: int | None, rank_fraction: float | None, energy: float | None) -> dict[str, Any]:
    """Exactly one criterion, in range; returns the criterion as svd.choose_rank keywords."""
    given = {k: v for k, v in (("rank", rank), ("fraction", rank_fraction), ("energy", energy)) if v is not None}
    if len(given) != 1:
        raise UsageError("compress: give exactly one of --rank, --rank-fraction, --energy")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: must be an integer >= 1")
    for flag, value in (("--rank-fraction", rank_fraction), ("--energy", energy)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag} {value}: must be in (0, 1]")
    return given


def compress(
    inputs: Sequence[InputSpec | str | os.PathLike[str]],
    target: OutputTarget | str | os.PathLike[str] | None,
    *,
    rank: int | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
    keys_filter: Any = None,  # keys.KeyFilter: the matrices to factor (default: every 2-D floating tensor)
    factor_dtype: torch.dtype | None = None,  # storage dtype of U, S, V; default the tensor's
    opts: ArithOptions | None = None,
    progress: Progress | None = None,
) -> list[Artifact]:
    """One low-rank task vector per input task vector."""
    criterion = check_rank_options(rank, rank_fraction, energy)
    route = svd_route()
    opts = opts or ArithOptions()
    specs = [as_spec(s) for s in inputs]
    target = as_target(target)
    ckpts = [open_checkpoint(s.path) for s in specs]
    for c in ckpts:
        if c.kind != "task-vector":
            raise InputError(f"{c.path}: is a {c.kind}; compress works on task vectors (run tvedit extract first)")
    params = {
        "rank": rank, "rank_fraction": rank_fraction, "energy": energy,
        "factor_dtype": str(factor_dtype).replace("torch.", "") if factor_dtype else None,
        **(keys_filter.params() if keys_filter is not None else {}),
        **({"device": str(opts.device)} if opts.device is not None else {}),
    }  # fmt: skip
    paths = [target.path_for(s, "lr", len(specs)) for s in specs]
    artifacts = []
    for spec, ckpt, out in zip(specs, ckpts, paths, strict=True):
        assert ckpt.manifest is not None
        manifest = Manifest.from_dict({**ckpt.manifest.to_dict(), "sparse": {}}).with_step("compress", params, [input_record(spec, ckpt)])
        keys = ckpt.keys()
        slot = Slot(torch.float64 if opts.compute_dtype == torch.float64 else torch.float32, opts.device)
        with CheckpointWriter(out, manifest, keys, force=target.force, inputs=[s.path for s in specs], layout=opts.layout, ephemeral=target.ephemeral) as w:
            for i, key in enumerate(keys):
                info = ckpt.info(key)
                selected = keys_filter is None or keys_filter.selects(key)
                if info.dtype.is_floating_point and len(info.shape) == 2 and 0 not in info.shape and selected:
                    f = svd.svd(slot.load(ckpt, key), lambda s: svd.choose_rank(s, **criterion), route)
                    cut = svd.Factors(f.U.contiguous(), f.S.contiguous(), f.V.contiguous())
                    w.write_lowrank(key, cut.to(factor_dtype or info.dtype))
                else:
                    w.write(key, ckpt.get(key))
                if progress:
                    progress(i + 1, len(keys), key)
            artifacts.append(w.commit())
    consume_ephemeral(specs)
    return artifacts
