"""The arithmetic commands: extract, add, scale, negate (ALGORITHMS.md section 1).

Each is a plan over the engine (``tvedit.engine``): every operation streams — inputs are
memory-mapped, one key is processed at a time (its tensors from every input, computed in float32),
written, and freed. All checks that can be made from the headers (keys, shapes, bases, regimes) are
made before the first tensor is read, so bad input fails fast and leaves no output behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from tvedit import engine, hfdir
from tvedit.engine import (
    ArithOptions,
    Progress,
    Slot,
    VectorSources,
    as_spec,
    as_target,
    check_base,
    check_families,
    check_finite,
    goes_in_chunks,
    hash_of,
    input_record,
    model_of,
    numel,
    open_all,
    open_writer,
    out_dtype,
    regime_of,
    resolve_base,
    vector_keys,
    verify_end,
    verify_start,
)
from tvedit.errors import InputError, UsageError
from tvedit.manifest import Manifest, base_ref
from tvedit.merging import OPTION_DEFAULTS, MergeContext, MergeMethod, get_method, resolve_options
from tvedit.ops.svd import Factors
from tvedit.pipeline import InputSpec, OutputTarget, consume_ephemeral
from tvedit.reader import Checkpoint, open_checkpoint
from tvedit.writer import Artifact


# --------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------
def extract(
    finetuned: Sequence[InputSpec | str | os.PathLike[str]],
    base: InputSpec | str | os.PathLike[str],
    target: OutputTarget | str | os.PathLike[str] | None,
    opts: ArithOptions | None = None,
    progress: Progress | None = None,
) -> list[Artifact]:
    """tau = theta* - theta0 for each fine-tuned checkpoint (floating tensors only)."""
    opts = opts or ArithOptions()
    specs = [as_spec(f) for f in finetuned]
    base_spec = as_spec(base)
    target = as_target(target)
    base_ckpt = open_checkpoint(base_spec.path)
    if base_ckpt.kind != "checkpoint":
        raise InputError(f"{base_spec.path}: --base must be a checkpoint, not a {base_ckpt.kind}")
    ckpts = open_all(specs)
    for c in ckpts:
        if c.kind != "checkpoint":
            raise InputError(f"{c.path}: is a {c.kind}; extract takes fine-tuned checkpoints")
    check_families([base_ckpt, *ckpts], opts)
    hfdir.check_inputs(base_ckpt, ckpts)
    keys_per = [vector_keys([c], base_ckpt, opts) for c in ckpts]
    paths = [target.path_for(s, "tv", len(specs)) for s in specs]
    verify_start([base_ckpt, *ckpts], opts)
    artifacts = []
    for spec, ckpt, keys, out in zip(specs, ckpts, keys_per, paths, strict=True):
        src = ckpt.manifest or Manifest()

        def manifest_for(final: bool, src: Manifest = src, spec: InputSpec = spec, ckpt: Checkpoint = ckpt) -> Manifest:
            return Manifest(
                kind="task-vector",
                model=model_of(ckpt, base_ckpt),
                regime=src.regime,
                base=base_ref(hash_of(base_ckpt, final), None if base_spec.ephemeral else str(base_spec.path)),
                task=src.task,
                provenance=list(src.provenance),
            ).with_step("extract", opts.params(), [input_record(spec, ckpt, final=final), input_record(base_spec, base_ckpt, final=final)])

        inputs = [s.path for s in specs] + [base_spec.path]
        sources = VectorSources([ckpt], base_ckpt, opts, keys)
        with open_writer(target, out, manifest_for(False), keys, inputs, opts, [base_ckpt, ckpt], base_ckpt) as w:
            for i, key in enumerate(keys):
                dtype = out_dtype(opts, base_ckpt.info(key).dtype)
                if sources.chunked(key):
                    engine.write_in_chunks(w, key, sources._shape(key), dtype, lambda s, c, k=key, src=sources: src.vector_ranges(k, s, c)[0], out, opts)
                else:
                    (tau,) = sources.vectors(key)  # theta* - theta0 (zero where allowed missing)
                    check_finite(tau, out, key, opts)
                    w.write(key, tau.to(dtype))
                if progress:
                    progress(i + 1, len(keys), key)
            verify_end([base_ckpt, ckpt])
            w.manifest = manifest_for(True)  # the input hashes, computed while streaming
            artifacts.append(w.commit())
    consume_ephemeral(specs + [base_spec])
    return artifacts


# --------------------------------------------------------------------------------------------
# add (and every merge method)
# --------------------------------------------------------------------------------------------
def add(
    inputs: Sequence[InputSpec | str | os.PathLike[str]],
    target: OutputTarget | str | os.PathLike[str] | None,
    *,
    base: InputSpec | str | os.PathLike[str] | None = None,
    alpha: float = 1.0,
    weights: Sequence[float] | None = None,
    method: str = "sum",
    method_options: dict[str, Any] | None = None,
    emit: str = "checkpoint",
    opts: ArithOptions | None = None,
    progress: Progress | None = None,
    custom: MergeMethod | None = None,
) -> Artifact:
    """theta0 + alpha * merge(w_i tau_i) as a checkpoint, or alpha * merge(...) as a task vector.

    ``custom``: a merge method built outside the table (a mergekit recipe: mergekit.py)."""
    opts = opts or ArithOptions()
    merge = custom or get_method(method)
    method_options = dict(method_options or {})
    if method in OPTION_DEFAULTS:
        resolve_options(method, dict(method_options))  # bad option values fail before any file is opened
    if emit not in ("checkpoint", "vector"):
        raise UsageError(f"--emit must be 'checkpoint' or 'vector', not {emit!r}")
    specs = [as_spec(s) for s in inputs]
    if not specs:
        raise UsageError("add needs at least one input")
    if weights is None:
        weights = [s.weight if s.weight is not None else 1.0 for s in specs]
    if len(weights) != len(specs):
        raise UsageError(f"{len(weights)} weights for {len(specs)} inputs")
    target = as_target(target)
    base_spec = as_spec(base) if base is not None else None
    ckpts = open_all(specs)
    base_ckpt = resolve_base(base_spec, ckpts, specs, emit == "checkpoint", opts)
    if base_ckpt is not None and base_spec is None:
        base_spec = InputSpec(base_ckpt.path)
    check_families([c for c in [base_ckpt, *ckpts] if c is not None], opts)
    hfdir.check_inputs(base_ckpt, ckpts)
    regime = regime_of(ckpts, opts)
    keys = vector_keys(ckpts, base_ckpt, opts)
    out = target.path_for(None, "merged" if emit == "checkpoint" else "sum", 1)
    verify_start([base_ckpt, *ckpts], opts)
    sources = VectorSources(ckpts, base_ckpt, opts, keys)
    state = merge.prepare(sources, method_options) if merge.prepare else {}

    params = {"alpha": alpha, "method": method, "method_options": method_options, "emit": emit, **opts.params()}
    if target.hf is not None:
        params.update(target.hf.params())

    def manifest_for(final: bool) -> Manifest:
        records = [input_record(s, c, w, nested=True, final=final) for s, c, w in zip(specs, ckpts, weights, strict=True)]
        if base_ckpt is not None and base_spec is not None:
            records.append({**input_record(base_spec, base_ckpt, final=final), "role": "base"})
        return Manifest(
            kind="checkpoint" if emit == "checkpoint" else "task-vector",
            model=model_of(base_ckpt, *ckpts, like=target.hf.like if target.hf is not None else None),
            regime=regime,
            base=base_ref(hash_of(base_ckpt, final), str(base_ckpt.path)) if base_ckpt is not None else (ckpts[0].manifest.base if ckpts[0].manifest else None),
            task={"merged": [c.manifest.task for c in ckpts if c.manifest and c.manifest.task]} if emit == "vector" else None,
        ).with_step("add", params, records)

    manifest = manifest_for(False)

    protect = [s.path for s in specs] + ([base_spec.path] if base_spec else [])
    all_keys = base_ckpt.keys() if (emit == "checkpoint" and base_ckpt is not None) else keys
    key_set = set(keys)
    acc = Slot(opts.compute_dtype, opts.device)
    with open_writer(target, out, manifest, all_keys, protect, opts, [base_ckpt, *ckpts], base_ckpt) as w:
        for i, key in enumerate(all_keys):
            if key not in key_set:  # integer/bool tensors: copied from theta0
                assert base_ckpt is not None
                w.write(key, base_ckpt.get(key))
                continue
            shape = sources._shape(key)
            ref = base_ckpt if base_ckpt is not None else next(c for c in ckpts if key in c)
            dtype = out_dtype(opts, ref.info(key).dtype)
            if merge.chunkable(method_options, key) and sources.chunked(key):
                ctx = MergeContext(key, list(weights), method_options, state)
                compute = _merge_ranges(sources, key, merge, ctx, alpha, emit == "checkpoint", acc)
                engine.write_in_chunks(w, key, shape, dtype, compute, out, opts, step=ctx.key_state.get("step"))
                if progress:
                    progress(i + 1, len(all_keys), key)
                continue
            ctx = MergeContext(key, list(weights), method_options, state, out=acc.buffer(shape), numel=numel(shape))
            merged = merge.merge(sources.vectors(key), ctx)
            if isinstance(merged, Factors):  # a low-rank result (tsv lowrank=true)
                if emit == "vector":
                    merged.S.mul_(alpha)
                    for part in (merged.U, merged.S, merged.V):
                        check_finite(part, out, key, opts)
                    w.write_lowrank(key, merged.to(dtype))
                    if progress:
                        progress(i + 1, len(all_keys), key)
                    continue
                merged = merged.dense()
            if emit == "checkpoint":
                result = merged.mul_(alpha).add_(sources.base(key))  # theta0 + alpha * merged, in place
            else:
                result = merged.mul_(alpha)
            check_finite(result, out, key, opts)
            w.write(key, result.to(dtype))
            if progress:
                progress(i + 1, len(all_keys), key)
        check_base(base_ckpt)  # before anything is committed
        verify_end([base_ckpt, *ckpts])
        w.manifest = manifest_for(True)  # the input hashes, computed while streaming
        artifact = w.commit()
    consume_ephemeral(specs)
    return artifact


def _merge_ranges(sources: VectorSources, key: str, merge: MergeMethod, ctx: MergeContext, alpha: float, checkpoint: bool, acc: Slot) -> Callable[[int, int], torch.Tensor]:
    """``(start, count) -> [theta0 +] alpha * merge(tau_i)`` over a range of one huge key, for a
    method that works chunk by chunk (after its per-key pass, e.g. TIES's magnitude cuts)."""
    ctx.shape = sources._shape(key)
    ctx.numel = numel(ctx.shape)
    if merge.key_pass is not None:  # it may set key_state["step"]: entries per chunk (e.g. whole rows)
        merge.key_pass(lambda step=None: sources.vector_chunks(key, step), ctx)

    def compute(start: int, count: int) -> torch.Tensor:
        base = sources.base_range(key, start, count) if checkpoint else None
        vectors = sources.vector_ranges(key, start, count, base)
        merged = merge.merge(vectors, replace(ctx, out=acc.buffer((count,)), start=start)).mul_(alpha)
        return merged.add_(base) if base is not None else merged

    return compute



# --------------------------------------------------------------------------------------------
# scale / negate
# --------------------------------------------------------------------------------------------
def scale(
    inputs: Sequence[InputSpec | str | os.PathLike[str]],
    by: float,
    target: OutputTarget | str | os.PathLike[str] | None,
    opts: ArithOptions | None = None,
    progress: Progress | None = None,
    _op: str = "scale",
) -> list[Artifact]:
    """c * tau for each task vector (negate is c = -1)."""
    opts = opts or ArithOptions()
    specs = [as_spec(s) for s in inputs]
    target = as_target(target)
    ckpts = open_all(specs)
    for c in ckpts:
        if c.kind != "task-vector":
            raise InputError(f"{c.path}: is a {c.kind}; {_op} works on task vectors (run tvedit extract first)")
    suffix = "neg" if _op == "negate" else "scaled"
    paths = [target.path_for(s, suffix, len(specs)) for s in specs]
    artifacts = []
    for spec, ckpt, out in zip(specs, ckpts, paths, strict=True):
        assert ckpt.manifest is not None
        params = {"by": by, **opts.params()} if _op == "scale" else opts.params()
        manifest = Manifest.from_dict({**ckpt.manifest.to_dict(), "sparse": {}}).with_step(_op, params, [input_record(spec, ckpt)])
        keys = ckpt.keys()
        slot = Slot(opts.compute_dtype, opts.device)
        verify_start([ckpt], opts)
        with open_writer(target, out, manifest, keys, [s.path for s in specs], opts, [ckpt]) as w:
            for i, key in enumerate(keys):
                dtype = out_dtype(opts, ckpt.info(key).dtype) if ckpt.is_floating(key) else None
                if dtype is not None and goes_in_chunks(ckpt, key):
                    engine.write_in_chunks(w, key, ckpt.info(key).shape, dtype, lambda s, c, k=key, ck=ckpt, sl=slot: sl.load_range(ck, k, s, c).mul_(by), out, opts)
                elif dtype is not None:
                    r = slot.load(ckpt, key).mul_(by)  # c * tau, in place, in the compute dtype
                    check_finite(r, out, key, opts)
                    w.write(key, r.to(dtype))
                else:
                    w.write(key, ckpt.get(key))
                if progress:
                    progress(i + 1, len(keys), key)
            verify_end([ckpt])
            artifacts.append(w.commit())
    consume_ephemeral(specs)
    return artifacts


def negate(
    inputs: Sequence[InputSpec | str | os.PathLike[str]],
    target: OutputTarget | str | os.PathLike[str] | None,
    opts: ArithOptions | None = None,
    progress: Progress | None = None,
) -> list[Artifact]:
    """-tau for each task vector."""
    return scale(inputs, -1.0, target, opts, progress, _op="negate")
