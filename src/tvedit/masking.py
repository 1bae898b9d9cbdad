"""The library entry point behind ``tvedit mask``: post-hoc masking of task vectors, and mask algebra.

One table (``MASK_METHODS``) lists every method: what it reads (task vectors or masks), whether
its inputs are processed jointly (TALL, consensus, intersect, union) or one by one, and a pure
per-key function built on tvedit.ops.sparsify. Like arith.py, everything streams key by key in sorted
order, and every check that the headers allow (method, option values, key filters, input kinds,
keys and shapes of masks against vectors, output paths) is made before the first tensor is read,
so bad input fails fast and leaves no output. Semantics: docs/methods.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvedit import engine
from tvedit.checks import finite_number
from tvedit.engine import ArithOptions, Progress, Slot, as_spec, as_target, input_record
from tvedit.errors import InputError, MismatchError, UsageError
from tvedit.keys import KeyFilter
from tvedit.manifest import Manifest
from tvedit.ops import sparsify
from tvedit.pipeline import InputSpec, OutputTarget, consume_ephemeral
from tvedit.reader import Checkpoint, open_checkpoint
from tvedit.writer import Artifact, CheckpointWriter, check_output


@dataclass
class KeyContext:
    """What a per-key function sees besides the tensors."""

    key: str
    indices: list[int]  # positions of the tensors' inputs on the command line (DARE seeds)
    options: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)  # global thresholds, by input position
    mask: torch.Tensor | None = None  # the --mask tensor for this key (apply)


# (tensors of one key, one per input of the group; context) -> (outputs, masks to save)
KeyFn = Callable[[list[torch.Tensor], KeyContext], tuple[list[torch.Tensor], list[torch.Tensor]]]


@dataclass
class ChunkPlan:
    """How one huge key goes in chunks: ``fn(pieces, start)`` gives (outputs, masks) for the flat
    entries start .. start+len of each input's piece; ``before(start, count)`` runs before those
    pieces are read (a key pass over a segment); ``step``: entries per chunk (None: chunk_numel())."""

    fn: Callable[[list[torch.Tensor], int], tuple[list[torch.Tensor], list[torch.Tensor]]]
    step: int | None = None
    before: Callable[[int, int], None] | None = None


# (ranges: (start, count) -> the pieces of those entries, chunk after chunk, one per input; context;
# the key's shape) -> the key's plan, after any key pass it needs over ``ranges``
Ranges = Callable[[int, int], Iterator[list[torch.Tensor]]]
PlanFn = Callable[[Ranges, KeyContext, tuple[int, ...]], ChunkPlan]


@dataclass(frozen=True)
class MaskMethod:
    name: str
    summary: str
    fn: KeyFn
    options: tuple[str, ...] = ()  # option names this method reads
    takes: str = "task-vector"  # "task-vector" | "mask"
    joint: bool = False  # all inputs together (same keys and shapes), else one input at a time
    outputs: str = "each"  # "each": one output per input; "one": a single output
    masks: str = "each"  # masks --save-mask can write: "each" | "one" | "none"
    # How a huge key goes in chunks (bounded memory, the same bytes as the whole-tensor path):
    # elementwise: ``fn`` on each chunk as it is; else ``plan`` builds the key's ChunkPlan.
    elementwise: bool = False
    plan: PlanFn | None = None

    @property
    def output_kind(self) -> str:
        return self.takes


# --------------------------------------------------------------------------------------------
# per-key functions (pure; sparsify does the math)
# --------------------------------------------------------------------------------------------
def _with_masks(taus: list[torch.Tensor], keeps: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [sparsify.masked(t, m) for t, m in zip(taus, keeps, strict=True)], keeps


def _topk(taus: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    plans = ctx.state.get("plans")
    density = ctx.options["density"]
    keeps = [plans[i].mask(ctx.key, t) if plans else sparsify.topk_mask(t, density) for i, t in zip(ctx.indices, taus, strict=True)]
    return _with_masks(taus, keeps)


def _dare(taus: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    o = ctx.options
    outs, keeps = [], []
    for i, t in zip(ctx.indices, taus, strict=True):
        gen = torch.Generator().manual_seed(sparsify.derived_seed(o["seed"], i, ctx.key))
        out, keep = sparsify.dare(t, o["density"], gen, o["rescale"])
        outs.append(out)
        keeps.append(keep)
    return outs, keeps


def _breadcrumbs(taus: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    o = ctx.options
    keeps = [sparsify.breadcrumbs_mask(t, o["density"], o["beta"], per_row=o["scope"] == "row") for t in taus]
    return _with_masks(taus, keeps)


def _topk_plan(ranges: Ranges, ctx: KeyContext, shape: tuple[int, ...]) -> ChunkPlan:
    """Each input's cut: from the global plan, or an exact radix select over the key's chunks."""
    plans, n = ctx.state.get("plans"), math.prod(shape)
    if plans:
        cuts = [sparsify.Cut.of_plan(plans[i], ctx.key) for i in ctx.indices]
    else:
        cuts = sparsify.chunk_cuts(lambda: ranges(0, n), [sparsify.keep_count(ctx.options["density"], n)] * len(ctx.indices))
    return ChunkPlan(lambda pieces, _start: _with_masks(pieces, [c.take(p) for c, p in zip(cuts, pieces, strict=True)]))


def _dare_plan(ranges: Ranges, ctx: KeyContext, shape: tuple[int, ...]) -> ChunkPlan:
    """Each input's generator drawn on chunk after chunk (the draws of one whole draw); l1
    rescaling first sums the exact norms of tau and of the survivors over the chunks (a key pass
    that draws the same masks)."""
    o = ctx.options
    seeds = [sparsify.derived_seed(o["seed"], i, ctx.key) for i in ctx.indices]
    norms: list[tuple[float, float] | None] = [None] * len(seeds)
    if o["rescale"] == "l1":
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        parts = [[torch.zeros(256, dtype=torch.int64, device="cpu"), torch.zeros(256, dtype=torch.int64, device="cpu")] for _ in seeds]  # l1_parts are on the host
        for pieces in ranges(0, math.prod(shape)):
            for (total, kept), p, g in zip(parts, pieces, gens, strict=True):
                total += sparsify.l1_parts(p.to(sparsify.COMPUTE))  # as dare_rescale converts it
                kept += sparsify.l1_parts(sparsify.masked(p, sparsify.dare_mask(p.shape, o["density"], g, p.device)))
        norms = [(sparsify.l1_value(a), sparsify.l1_value(b)) for a, b in parts]
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def fn(pieces: list[torch.Tensor], _start: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keeps = [sparsify.dare_mask(p.shape, o["density"], g, p.device) for p, g in zip(pieces, gens, strict=True)]
        return [sparsify.dare_rescale(p, k, o["density"], o["rescale"], nm) for p, k, nm in zip(pieces, keeps, norms, strict=True)], keeps

    return ChunkPlan(fn)


def _breadcrumbs_plan(ranges: Ranges, ctx: KeyContext, shape: tuple[int, ...]) -> ChunkPlan:
    """Rows that fit in a chunk: chunks of whole rows, each ranked as on the whole tensor. Longer
    segments (rows, or the whole tensor with scope=tensor): ranks n_top .. n_top+n_keep are the
    n_top+n_keep largest minus the n_top largest (ties to the lower index): two exact cuts per
    segment, found by a radix select over the segment's chunks before its first chunk is read."""
    o = ctx.options
    n = math.prod(shape)
    seg = shape[-1] if (o["scope"] == "row" and len(shape) >= 1) else n
    step = engine.chunk_numel()
    if 0 < seg <= step:
        def rows(pieces: list[torch.Tensor], _start: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            keeps = [sparsify.breadcrumbs_mask(p.view(-1, seg), o["density"], o["beta"]).reshape(-1) for p in pieces]
            return _with_masks(pieces, keeps)

        return ChunkPlan(rows, step=step // seg * seg)
    n_top = min(seg, sparsify.round_half_up(o["beta"] * seg))
    n_keep = min(sparsify.keep_count(o["density"], seg), seg - n_top)
    cuts: dict[int, list[tuple[sparsify.Cut, sparsify.Cut]]] = {}

    def before(start: int, count: int) -> None:
        first, last = start // seg, (start + count - 1) // seg
        for s in [s for s in cuts if s < first]:
            del cuts[s]
        for s in range(first, last + 1):
            if s not in cuts:
                pairs = sparsify.chunk_cuts(lambda s=s: ([p for p in pieces for _ in (0, 1)] for pieces in ranges(s * seg, seg)),
                                            [n_top + n_keep, n_top] * len(ctx.indices))  # fmt: skip
                cuts[s] = list(zip(pairs[::2], pairs[1::2], strict=True))

    def fn(pieces: list[torch.Tensor], start: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keeps = []
        for j, p in enumerate(pieces):
            parts, at = [], start
            while at < start + p.numel():
                s = at // seg
                end = min((s + 1) * seg, start + p.numel())
                wide, narrow = cuts[s][j]
                sub = p[at - start : end - start]
                parts.append(wide.take(sub) & ~narrow.take(sub))
                at = end
            keeps.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return _with_masks(pieces, keeps)

    return ChunkPlan(fn, before=before)


def _tall(taus: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return _with_masks(taus, sparsify.tall_masks(taus, ctx.options["lambda"]))


def _consensus(taus: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    keep = sparsify.consensus_mask(sparsify.tall_masks(taus, ctx.options["lambda"]), ctx.options["min_agree"])
    return [sparsify.masked(t, keep) for t in taus], [keep]


def _apply(taus: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    assert ctx.mask is not None
    return [sparsify.masked(t, ctx.mask) for t in taus], []


def _invert(masks: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [~m for m in masks], []


def _intersect(masks: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.stack(masks).all(0)], []


def _union(masks: list[torch.Tensor], ctx: KeyContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.stack(masks).any(0)], []


MASK_METHODS: dict[str, MaskMethod] = {
    m.name: m
    for m in (
        MaskMethod("topk", "keep the top density of |tau| (per tensor or one global threshold)", _topk, ("density", "scope"), plan=_topk_plan),
        MaskMethod("dare", "DARE: keep each entry with probability density (seeded), rescale survivors", _dare, ("density", "seed", "rescale"), plan=_dare_plan),
        MaskMethod("breadcrumbs", "per row: drop the top beta of |tau| (outliers), keep the next density", _breadcrumbs, ("density", "beta", "scope"), plan=_breadcrumbs_plan),
        MaskMethod("tall", "TALL: m_t = 1[|tau_t| >= lambda |tau_MTL - tau_t|], tau_t * m_t for each input", _tall, ("lambda",), joint=True, elementwise=True),
        MaskMethod("consensus", "consensus of TALL masks (>= min_agree tasks), tau_t * consensus for each input", _consensus, ("lambda", "min_agree"), joint=True, masks="one", elementwise=True),
        MaskMethod("apply", "tau * m with the mask file given by --mask", _apply, (), masks="none"),
        MaskMethod("invert", "not m, for each mask file", _invert, (), takes="mask", masks="none", elementwise=True),
        MaskMethod("intersect", "m_1 and m_2 and ... (one mask)", _intersect, (), takes="mask", joint=True, outputs="one", masks="none", elementwise=True),
        MaskMethod("union", "m_1 or m_2 or ... (one mask)", _union, (), takes="mask", joint=True, outputs="one", masks="none", elementwise=True),
    )
}  # fmt: skip

DEFAULTS: dict[str, Any] = {"seed": 0, "rescale": "inverse", "beta": 0.01, "lambda": 0.6, "min_agree": 2}
SCOPE_CHOICES = {"topk": ("tensor", "global"), "breadcrumbs": ("row", "tensor")}


def resolve_options(method: MaskMethod, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked (UsageError); unknown options rejected."""
    unknown = sorted(k for k, v in options.items() if v is not None and k not in method.options)
    if unknown:
        allowed = ", ".join(method.options) or "none"
        raise UsageError(f"mask {method.name}: option {unknown[0]!r} does not apply (it takes: {allowed})")
    out = {k: options.get(k) for k in method.options}
    for k in method.options:
        if out[k] is None:
            if k == "density":
                raise UsageError(f"mask {method.name}: --density is required (the fraction of entries kept, 0..1)")
            out[k] = SCOPE_CHOICES[method.name][0] if k == "scope" else DEFAULTS[k]
    if "density" in out:
        out["density"] = sparsify.check_fraction(out["density"], "--density")
    if "beta" in out:
        out["beta"] = sparsify.check_fraction(out["beta"], "--beta")
    if "scope" in out and out["scope"] not in SCOPE_CHOICES[method.name]:
        raise UsageError(f"--scope for {method.name} must be one of {', '.join(SCOPE_CHOICES[method.name])}, not {out['scope']!r}")
    if "rescale" in out and out["rescale"] not in sparsify.RESCALES:
        raise UsageError(f"--rescale must be one of {', '.join(sparsify.RESCALES)}, not {out['rescale']!r}")
    if "lambda" in out:
        out["lambda"] = finite_number(out["lambda"], "--lambda", minimum=0)
    for k in ("seed", "min_agree"):
        if k in out and int(out[k]) < 0:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 0, not {out[k]!r}")
    return out


# --------------------------------------------------------------------------------------------
# key selection
# --------------------------------------------------------------------------------------------
@dataclass
class MaskResult:
    """What ``mask`` wrote: the outputs (task vectors, or masks for the mask algebra) and saved masks."""

    outputs: list[Artifact]
    masks: list[Artifact]


# --------------------------------------------------------------------------------------------
# header-level checks
# --------------------------------------------------------------------------------------------
def _check_kind(ckpt: Checkpoint, method: MaskMethod) -> None:
    if method.takes == "mask":
        for k in ckpt.keys():
            if ckpt.info(k).dtype != torch.bool:
                raise InputError(f"{ckpt.path}: is not a mask (key {k!r} is {str(ckpt.info(k).dtype).replace('torch.', '')}); mask {method.name} takes mask files")
    elif ckpt.kind != "task-vector":
        raise InputError(f"{ckpt.path}: is a {ckpt.kind}; mask {method.name} works on task vectors (run tvedit extract first)")


def _selected(ckpt: Checkpoint, keys_filter: KeyFilter, method: MaskMethod) -> list[str]:
    if method.takes == "mask":
        return ckpt.keys()
    keys = [k for k in ckpt.keys() if ckpt.is_floating(k) and keys_filter.selects(k)]
    if not keys:
        raise UsageError(f"{ckpt.path}: --include/--exclude select no tensor")
    return keys


def _same_keys(ref: Checkpoint, ref_keys: list[str], other: Checkpoint, other_keys: list[str], what: str) -> None:
    missing = sorted(set(ref_keys) - set(other_keys))
    if missing:
        raise MismatchError(f"{other.path}: key {missing[0]!r} (selected in {ref.path}) is not in this {what}")
    extra = sorted(set(other_keys) - set(ref_keys))
    if extra:
        raise MismatchError(f"{other.path}: key {extra[0]!r} is not among the selected keys of {ref.path}")
    for k in ref_keys:
        a, b = ref.info(k).shape, other.info(k).shape
        if a != b:
            raise MismatchError(f"{other.path}: key {k!r}: shape {list(b)} does not match {list(a)} in {ref.path}")


def _mask_manifest(src: Manifest | None, step: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> Manifest:
    src = src or Manifest()
    return Manifest(kind="mask", model=dict(src.model), regime=src.regime, base=src.base, task=src.task).with_step(*step)


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def mask(
    method: str,
    inputs: Sequence[InputSpec | str | os.PathLike[str]],
    target: OutputTarget | str | os.PathLike[str] | None,
    *,
    options: dict[str, Any] | None = None,
    mask_file: InputSpec | str | os.PathLike[str] | None = None,
    save_mask: str | os.PathLike[str] | None = None,
    keys_filter: KeyFilter | None = None,
    opts: ArithOptions | None = None,
    progress: Progress | None = None,
) -> MaskResult:
    """Run one method of MASK_METHODS over the inputs; see docs/methods.md for each formula.

    ``save_mask``: a file when the run yields one mask, a directory (STEM.METHOD-mask.safetensors)
    when it yields one per input. ``mask_file``: the mask of ``apply``.
    """
    if method not in MASK_METHODS:
        raise UsageError(f"unknown mask method {method!r}; choose one of: {', '.join(MASK_METHODS)}")
    m = MASK_METHODS[method]
    opts = opts or ArithOptions()
    keys_filter = keys_filter or KeyFilter()
    resolved = resolve_options(m, dict(options or {}))
    if m.takes == "mask" and keys_filter.active:
        raise UsageError(f"mask {method}: --include/--exclude/--zero-unselected apply to task vectors, not to masks")
    if save_mask is not None and m.masks == "none":
        raise UsageError(f"mask {method}: --save-mask does not apply (the output is already the result)")
    if (mask_file is None) != (method != "apply"):
        raise UsageError("--mask MASK is required by mask apply" if mask_file is None else f"mask {method}: --mask applies only to mask apply")
    specs = [as_spec(s) for s in inputs]
    if not specs:
        raise UsageError("mask needs at least one input")
    if m.outputs == "one" and len(specs) < 2:
        raise UsageError(f"mask {method} needs at least two masks")
    target = as_target(target)

    ckpts = [open_checkpoint(s.path) for s in specs]
    for c in ckpts:
        _check_kind(c, m)
    selected = [_selected(c, keys_filter, m) for c in ckpts]
    if m.joint:
        for c, keys in zip(ckpts[1:], selected[1:], strict=True):
            _same_keys(ckpts[0], selected[0], c, keys, "input")
    mask_spec = as_spec(mask_file) if mask_file is not None else None
    mask_ckpt = open_checkpoint(mask_spec.path) if mask_spec is not None else None
    if mask_ckpt is not None:
        _check_kind(mask_ckpt, MASK_METHODS["invert"])
        for c, keys in zip(ckpts, selected, strict=True):
            _same_keys(c, keys, mask_ckpt, mask_ckpt.keys(), "mask")

    # output paths, all checked before any work
    protect = [s.path for s in specs] + ([mask_spec.path] if mask_spec else [])
    suffix = method if m.takes == "task-vector" else f"{method}.mask"
    if m.outputs == "one":
        out_paths = [target.path_for(None, suffix, 1)]
    else:
        out_paths = [target.path_for(s, suffix, len(specs)) for s in specs]
    n_masks = {"each": len(specs), "one": 1, "none": 0}[m.masks]
    mask_paths: list[Path] = []
    if save_mask is not None:
        where = Path(save_mask)
        if n_masks == 1:
            mask_paths = [where]
        else:
            if where.exists() and not where.is_dir():
                raise UsageError(f"--save-mask {where}: {n_masks} masks need a directory")
            mask_paths = [where / f"{s.stem}.{method}-mask.safetensors" for s in specs]
    if len({*out_paths, *mask_paths}) < len(out_paths) + len(mask_paths):
        raise UsageError("two outputs would share one path (inputs with the same name?); use distinct names")
    if not target.ephemeral:
        for p in [*out_paths, *mask_paths]:
            check_output(p, target.force, protect)

    # provenance
    params = {"method": method, **resolved, **({} if m.takes == "mask" else keys_filter.params()), **opts.params()}
    if mask_ckpt is not None and mask_ckpt.manifest is not None and mask_ckpt.manifest.density is not None:
        params["mask_density"] = mask_ckpt.manifest.density  # the kept fraction: evaluate widens alpha by its inverse
    records = [input_record(s, c, nested=m.joint) for s, c in zip(specs, ckpts, strict=True)]
    mask_record = [{**input_record(mask_spec, mask_ckpt), "role": "mask"}] if mask_spec and mask_ckpt else []

    state: dict[str, Any] = {}
    if resolved.get("scope") == "global":
        state["plans"] = sparsify.global_topk_plan(_stream(ckpts, selected, opts), len(ckpts), resolved["density"])

    groups = [list(range(len(specs)))] if m.joint else [[i] for i in range(len(specs))]
    total = sum(len(c.keys()) for c in ckpts)
    done = 0
    outputs: list[Artifact] = []
    saved: list[Artifact] = []
    for group in groups:
        g_ckpts = [ckpts[i] for i in group]
        g_keys = sorted({k for c in g_ckpts for k in c.keys()})
        g_selected = set(selected[group[0]])
        step = ("mask", params, [records[i] for i in group] + mask_record)
        with ExitStack() as stack:
            if m.outputs == "one":
                out_specs = [(out_paths[0], g_ckpts[0], g_keys)]
            else:
                out_specs = [(out_paths[i], ckpts[i], ckpts[i].keys()) for i in group]
            writers = []
            for path, src, keys in out_specs:
                if m.takes == "mask":
                    manifest = _mask_manifest(src.manifest, step)
                else:
                    assert src.manifest is not None
                    manifest = Manifest.from_dict({**src.manifest.to_dict(), "sparse": {}}).with_step(*step)
                writers.append(stack.enter_context(CheckpointWriter(path, manifest, keys, force=target.force, inputs=protect, layout=opts.layout, ephemeral=target.ephemeral)))
            g_mask_paths = mask_paths[group[0] : group[-1] + 1] if n_masks == len(specs) else mask_paths
            mask_writers = [
                stack.enter_context(CheckpointWriter(p, _mask_manifest(ckpts[i].manifest, step), sorted(g_selected), force=target.force, inputs=protect))
                for p, i in zip(g_mask_paths, group if n_masks == len(specs) else group[:1], strict=False)
            ]  # fmt: skip
            slot = Slot(opts.compute_dtype, opts.device)  # the chunks of mask apply
            sources = engine.VectorSources(g_ckpts, None, opts, [])  # the chunks of the other methods
            for key in g_keys:
                if key in g_selected and (m.elementwise or m.plan is not None) and _goes_in_chunks(g_ckpts, key, m):
                    ctx = KeyContext(key, group, resolved, state)
                    _write_key_in_chunks(m, ctx, g_ckpts, sources, writers, mask_writers, out_paths[group[0]], opts)
                elif key in g_selected and m.name == "apply" and g_ckpts[0].is_floating(key) and engine.goes_in_chunks(g_ckpts[0], key) and mask_ckpt is not None:
                    c = g_ckpts[0]  # apply: one input per group; tau * m a chunk at a time

                    def apply_range(start: int, count: int, c: Checkpoint = c, key: str = key, slot: Slot = slot) -> torch.Tensor:
                        assert mask_ckpt is not None
                        return sparsify.masked(slot.load_range(c, key, start, count), engine.on_device(mask_ckpt.get_mask_range(key, start, count), opts))

                    engine.write_in_chunks(writers[0], key, c.info(key).shape, opts.dtype or c.info(key).dtype, apply_range, out_paths[group[0]], opts, check=False)
                elif key in g_selected:
                    tensors = [_load(c, key, m, opts) for c in g_ckpts]
                    ctx = KeyContext(key, group, resolved, state, engine.on_device(mask_ckpt.get(key), opts) if mask_ckpt is not None else None)
                    results, keeps = m.fn(tensors, ctx)
                    for w, c, r in zip(writers, g_ckpts, results, strict=False):
                        w.write(key, r if m.takes == "mask" else r.to(opts.dtype or c.info(key).dtype))
                    for w, keep in zip(mask_writers, keeps, strict=False):
                        w.write(key, keep)
                else:  # unselected: passed through (or zeroed) for each input that has it
                    for w, c in zip(writers, g_ckpts, strict=True):
                        if key in c:
                            t = c.get(key)
                            w.write(key, torch.zeros_like(t) if keys_filter.zero_unselected and t.is_floating_point() else t)
                done += len(g_ckpts)
                if progress:
                    progress(min(done, total), total, key)
            outputs.extend(w.commit() for w in writers)
            saved.extend(w.commit() for w in mask_writers)
    consume_ephemeral(specs + ([mask_spec] if mask_spec else []))
    return MaskResult(outputs, saved)


def _goes_in_chunks(ckpts: list[Checkpoint], key: str, method: MaskMethod) -> bool:
    """Every input holds ``key`` huge and stored densely (masks: bit-packed)."""
    if method.takes == "mask":
        return all(key in c and math.prod(c.info(key).shape) > engine.chunk_numel() and c.encoding(key) == "mask" for c in ckpts)
    return all(key in c and engine.goes_in_chunks(c, key) for c in ckpts)


def _write_key_in_chunks(m: MaskMethod, ctx: KeyContext, ckpts: list[Checkpoint], sources: engine.VectorSources,
                         writers: list[CheckpointWriter], mask_writers: list[CheckpointWriter], out: Path, opts: ArithOptions) -> None:
    """One huge key of every output and saved mask, a chunk at a time, from one pass over the
    inputs (after the key pass the method's plan makes): the bytes of the whole-tensor path."""
    key = ctx.key
    shape = tuple(ckpts[0].info(key).shape)

    def pieces(start: int, count: int) -> list[torch.Tensor]:
        if m.takes == "mask":
            return [engine.on_device(c.get_mask_range(key, start, count), opts) for c in ckpts]
        return sources.vector_ranges(key, start, count)

    def ranges(start: int, count: int) -> Iterator[list[torch.Tensor]]:
        step = engine.chunk_numel()
        for at in range(start, start + count, step):
            yield pieces(at, min(step, start + count - at))

    plan = m.plan(ranges, ctx, shape) if m.plan is not None else ChunkPlan(lambda p, _start: m.fn(p, ctx))
    sources.keys = [key]

    def compute(start: int, count: int) -> list[torch.Tensor]:
        if plan.before is not None:
            plan.before(start, count)
        results, keeps = plan.fn(pieces(start, count), start)
        return [*results[: len(writers)], *keeps[: len(mask_writers)]]

    dtypes = [torch.bool if m.takes == "mask" else (opts.dtype or c.info(key).dtype) for c in ckpts][: len(writers)]
    engine.write_in_chunks([*writers, *mask_writers], key, shape, [*dtypes, *[torch.bool] * len(mask_writers)], compute, out, opts, check=False, step=plan.step)


def _load(ckpt: Checkpoint, key: str, method: MaskMethod, opts: ArithOptions) -> torch.Tensor:
    t = engine.on_device(ckpt.get(key), opts)
    return t if method.takes == "mask" else t.to(opts.compute_dtype)


def _stream(ckpts: list[Checkpoint], selected: list[list[str]], opts: ArithOptions) -> sparsify.Stream:
    """Each input's selected tensors in sorted key order, huge ones in consecutive chunks."""

    def stream():
        for i, (c, keys) in enumerate(zip(ckpts, selected, strict=True)):
            sources = engine.VectorSources([c], None, opts, keys)
            for key in keys:
                for (piece,) in sources.vector_chunks(key):
                    yield i, key, piece

    return stream
