"""The table of merge methods used by ``add``: one entry per method, nothing else to touch.

Tensors handed to a method are views into reusable buffers: valid during the call only, and the
method must not modify them. ``ctx.out`` is an uninitialised buffer of the key's shape that a method may
fill and return (the caller then scales it in place).

A method turns the task vectors' tensors for one key into one merged tensor; ``add`` then applies
theta0 + alpha * merged. Methods that need a first pass over all inputs (e.g. a global threshold)
implement ``prepare``. Semantics: docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tvedit._lazy import lazy
from tvedit.checks import finite_number
from tvedit.errors import UsageError
from tvedit.keys import KeyFilter

if TYPE_CHECKING:
    import torch

    from tvedit.ops import arith, sparsify, svd
else:  # `tvedit methods` reads the table without importing torch
    torch, arith, sparsify = lazy("torch", globals()), lazy("tvedit.ops.arith", globals()), lazy("tvedit.ops.sparsify", globals())
    svd = lazy("tvedit.ops.svd", globals())


@dataclass
class MergeContext:
    """What a method may look at besides the tensors: the key, the inputs' weights, options."""

    key: str
    weights: Sequence[float]
    options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # filled by prepare()
    out: torch.Tensor | None = None  # an uninitialised scratch buffer of the key's shape a method may fill and return
    numel: int = 0  # entries of the whole tensor
    start: int = 0  # flat index of the first entry handed over: > 0 for the later chunks of a huge tensor
    key_state: dict[str, Any] = field(default_factory=dict)  # one key's state, shared by its chunks (filled by key_pass or the first chunk)
    shape: tuple[int, ...] = ()  # the whole tensor's shape (chunks of a huge key)


MergeFn = Callable[[Sequence["torch.Tensor"], MergeContext], "torch.Tensor"]
PrepareFn = Callable[[Any, dict[str, Any]], dict[str, Any]]  # (VectorSources, options) -> state


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: MergeFn
    summary: str
    options: tuple[str, ...] = ()  # option names this method reads (validated by the CLI)
    prepare: PrepareFn | None = None
    # Each output entry depends only on the same entry of each input (given what key_pass found):
    # huge tensors go in chunks of consecutive flattened entries. A function of (options, key) when
    # that depends on them.
    elementwise: bool | Callable[[dict[str, Any], str], bool] = False
    # Before the chunks of a huge key: key_pass(chunks, ctx), where chunks(step=None) iterates the
    # inputs' chunks (lists of tensors; ``step`` entries each) and may be called more than once; it
    # fills ctx.key_state, and key_state["step"] sets the entries per chunk of the merge (e.g. rows).
    key_pass: Callable[[Callable[[], Any], MergeContext], None] | None = None

    def chunkable(self, options: dict[str, Any], key: str) -> bool:
        return bool(self.elementwise(options, key) if callable(self.elementwise) else self.elementwise)


def _sum(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    return arith.weighted_sum(vectors, ctx.weights, out=ctx.out)


def _mean(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    total = sum(ctx.weights)
    if total == 0:
        raise ValueError("mean: the weights sum to zero")
    return arith.weighted_sum(vectors, ctx.weights, out=ctx.out).div_(total)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


register(MergeMethod("sum", _sum, "plain task arithmetic: sum_i w_i tau_i (the default)", elementwise=True))
register(MergeMethod("mean", _mean, "weighted mean: sum_i w_i tau_i / sum_i w_i", elementwise=True))


# --------------------------------------------------------------------------------------------
# interference-resolving methods (ALGORITHMS.md section 4; semantics in docs/methods.md)
# --------------------------------------------------------------------------------------------
# Defaults of every method option. prepare() writes the resolved values back into the options
# dict, so the manifest provenance of ``add`` records them (the DARE seed included).
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.2, "scope": "tensor", "weighted_election": False, "divisor": "count"},
    "dare-ties": {"density": 0.1, "seed": 0, "rescale": "inverse", "weighted_election": False, "divisor": "count"},
    "consensus": {"lambda": 0.6, "min_agree": 2},
}


def _choice(options: dict[str, Any], name: str, choices: Sequence[str]) -> str:
    value = str(options[name])
    if value not in choices:
        raise UsageError(f"--option {name}={value}: choose one of {', '.join(choices)}")
    return value


def _flag(options: dict[str, Any], name: str) -> bool:
    value = options[name]
    if not isinstance(value, bool):
        raise UsageError(f"--option {name}={value}: must be true or false")
    return value


def _int(options: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--option {name}={value}: must be an integer >= {minimum}")
    return value


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults into ``options`` (in place) and validate every value; returns it."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS.get(method, {})))
    if unknown:
        raise UsageError(f"--option: {method} does not take {unknown[0]!r} (it takes: {', '.join(OPTION_DEFAULTS[method])})")
    for name, default in OPTION_DEFAULTS.get(method, {}).items():
        options.setdefault(name, default)
    if "density" in options:
        options["density"] = sparsify.check_fraction(options["density"], "--option density")
    if "scope" in options:
        _choice(options, "scope", sparsify.SCOPES)
    if "divisor" in options:
        _choice(options, "divisor", sparsify.DIVISORS)
    if "rescale" in options:
        _choice(options, "rescale", sparsify.RESCALES)
    if "weighted_election" in options:
        _flag(options, "weighted_election")
    if "seed" in options:
        _int(options, "seed")
    if "min_agree" in options:
        _int(options, "min_agree")
    if "lambda" in options:
        options["lambda"] = finite_number(options["lambda"], "--option lambda", minimum=0)
    if method in OPTION_CHECKS:
        OPTION_CHECKS[method](options)
    return options


# method-specific option checks, run by resolve_options after the defaults are filled in
OPTION_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def _vector_stream(sources: Any) -> sparsify.Stream:
    """Each input's task-vector tensors, key by key (sources: engine.VectorSources); re-iterable."""

    def stream():
        for key in sources.keys:
            for vectors in sources.vector_chunks(key):
                for i, tau in enumerate(vectors):
                    yield i, key, tau

    return stream


def _prepare_ties(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
    resolve_options("ties", options)
    if options["scope"] != "global":
        return {}
    return {"plans": sparsify.global_topk_plan(_vector_stream(sources), len(sources.inputs), options["density"])}


def _ties_key_pass(chunks: Callable[[], Any], ctx: MergeContext) -> None:
    """Each input's magnitude cut for one huge key: from the global plan, or by an exact radix
    select over the key's chunks (two passes)."""
    plans = ctx.state.get("plans")
    if plans:
        ctx.key_state["cuts"] = [sparsify.Cut.of_plan(p, ctx.key) for p in plans]
        return

    ctx.key_state["cuts"] = sparsify.chunk_cuts(chunks, [sparsify.keep_count(ctx.options["density"], ctx.numel)] * len(ctx.weights))


def _ties(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    density = ctx.options["density"]
    plans = ctx.state.get("plans")
    cuts = ctx.key_state.get("cuts")  # chunks of a huge key
    trimmed = []
    for i, tau in enumerate(vectors):
        if cuts is not None:
            keep = cuts[i].take(tau)
        else:
            keep = plans[i].mask(ctx.key, tau) if plans else sparsify.topk_mask(tau, density)
        trimmed.append(sparsify.masked(tau, keep))
    return sparsify.ties_merge(trimmed, ctx.weights, weighted_election=ctx.options["weighted_election"], divisor=ctx.options["divisor"])


def _prepare_dare_ties(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
    resolve_options("dare-ties", options)
    return {}


def _dare_ties(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    o = ctx.options
    if "generators" not in ctx.key_state:  # one per input, drawn on by every chunk of the key in turn
        ctx.key_state["generators"] = [torch.Generator().manual_seed(sparsify.derived_seed(o["seed"], i, ctx.key)) for i in range(len(vectors))]
    norms = ctx.key_state.get("norms") or [None] * len(vectors)  # l1 over the chunks of a huge key
    dropped = []
    for tau, gen, nm in zip(vectors, ctx.key_state["generators"], norms, strict=True):
        dropped.append(sparsify.dare_rescale(tau, sparsify.dare_mask(tau.shape, o["density"], gen, tau.device), o["density"], o["rescale"], nm))
    return sparsify.ties_merge(dropped, ctx.weights, weighted_election=o["weighted_election"], divisor=o["divisor"])


def _dare_ties_key_pass(chunks: Callable[[], Any], ctx: MergeContext) -> None:
    """l1 rescaling of a huge key: each input's exact ||tau||_1 and ||tau * m||_1 summed over the
    chunks, the masks drawn as the merge will draw them (a generator per input, chunk after chunk)."""
    o = ctx.options
    if o["rescale"] != "l1":
        return
    gens = [torch.Generator().manual_seed(sparsify.derived_seed(o["seed"], i, ctx.key)) for i in range(len(ctx.weights))]
    parts = [[torch.zeros(256, dtype=torch.int64, device="cpu"), torch.zeros(256, dtype=torch.int64, device="cpu")] for _ in gens]  # l1_parts are on the host
    for pieces in chunks():
        for (total, kept), tau, gen in zip(parts, pieces, gens, strict=True):
            total += sparsify.l1_parts(tau.to(sparsify.COMPUTE))  # as dare_rescale converts it
            kept += sparsify.l1_parts(sparsify.masked(tau, sparsify.dare_mask(tau.shape, o["density"], gen, tau.device)))
    ctx.key_state["norms"] = [(sparsify.l1_value(a), sparsify.l1_value(b)) for a, b in parts]


def _prepare_consensus(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
    resolve_options("consensus", options)
    return {}


def _consensus(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    weighted = [v.to(torch.float32) * float(w) for v, w in zip(vectors, ctx.weights, strict=True)]
    return sparsify.consensus_merge(weighted, ctx.options["lambda"], ctx.options["min_agree"])


register(MergeMethod(
    "ties", _ties, "TIES: trim each tau_i to density (top-|tau|), elect sign(sum), disjoint mean",
    options=tuple(OPTION_DEFAULTS["ties"]), prepare=_prepare_ties, elementwise=True, key_pass=_ties_key_pass,
))  # fmt: skip
register(MergeMethod(
    "dare-ties", _dare_ties, "DARE drop-and-rescale each tau_i (seeded), then TIES elect + disjoint mean",
    options=tuple(OPTION_DEFAULTS["dare-ties"]), prepare=_prepare_dare_ties, elementwise=True, key_pass=_dare_ties_key_pass,
))  # fmt: skip
register(MergeMethod(
    "consensus", _consensus, "TALL consensus: sum_i w_i tau_i where >= min_agree TALL masks agree",
    options=tuple(OPTION_DEFAULTS["consensus"]), prepare=_prepare_consensus, elementwise=True,
))  # fmt: skip


# --------------------------------------------------------------------------------------------
# singular-value merges: TSV-M, Iso-C, Iso-CTS (math in tvedit/ops/svd.py; docs/methods.md)
# --------------------------------------------------------------------------------------------
# Every 2-D floating tensor selected by include/exclude goes through the SVD path, computed on the
# weighted matrices w_i tau_i; every other tensor is merged by ``other`` (mean: sum_i w_i tau_i /
# sum_i w_i, the reference implementations' rule; sum: sum_i w_i tau_i). add applies alpha last.
_SVD_COMMON: dict[str, Any] = {"other": "mean", "include": [], "exclude": [], "device": "inputs"}
OPTION_DEFAULTS.update({
    "tsv": {"rank_fraction": None, "lowrank": False, **_SVD_COMMON},  # rank_fraction None: 1/N
    "iso-c": dict(_SVD_COMMON),
    "iso-cts": {"common_fraction": 0.8, "sizing": "fill", "spectrum": "combined", **_SVD_COMMON},
})  # fmt: skip
SVD_OTHER = ("mean", "sum")
ISO_CTS_SIZINGS = ("fill", "floor")
ISO_CTS_SPECTRA = ("combined", "sum")


def _fraction(options: dict[str, Any], name: str, upper_closed: bool) -> None:
    value = options[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value and (value <= 1 if upper_closed else value < 1)
    if not ok:
        interval = "(0, 1]" if upper_closed else "(0, 1)"
        raise UsageError(f"--option {name}={value}: must be a number in {interval}")
    options[name] = float(value)


def _globs(options: dict[str, Any], name: str) -> None:
    value = options[name]
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"--option {name}={options[name]}: must be a glob or a list of globs")
    options[name] = list(value)


def _device(options: dict[str, Any]) -> None:
    """The SVD device: inputs (default: where the command computes, ``--device``), cpu, cuda or
    cuda:N, checked by the one device picker (models.base)."""
    from tvedit.models.base import pick_device

    name = str(options["device"])
    if name == "inputs":
        return
    try:
        device = pick_device(name) if name != "auto" else None
    except UsageError as exc:
        reason = "CUDA is not available on this machine" if "CUDA" in str(exc) else "expected cpu, cuda or cuda:N"
        raise UsageError(f"--option device={name}: {reason}") from None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--option device={name}: expected cpu, cuda or cuda:N")
    options["device"] = name


def _check_svd_options(options: dict[str, Any]) -> None:
    _choice(options, "other", SVD_OTHER)
    _globs(options, "include")
    _globs(options, "exclude")
    _device(options)
    if options.get("rank_fraction") is not None:
        _fraction(options, "rank_fraction", upper_closed=True)
    if "lowrank" in options:
        _flag(options, "lowrank")
    if "common_fraction" in options:
        _fraction(options, "common_fraction", upper_closed=False)
        _choice(options, "sizing", ISO_CTS_SIZINGS)
        _choice(options, "spectrum", ISO_CTS_SPECTRA)


def svd_route() -> str:
    """$TVEDIT_SVD: ``auto`` (default: the refined and Gram routes where they are as exact and faster) or ``exact``
    (LAPACK's full SVD everywhere); tvedit.ops.svd explains both. A bad value is a usage error."""
    import os

    route = os.environ.get("TVEDIT_SVD", "auto")
    if route not in svd.ROUTES:
        raise UsageError(f"TVEDIT_SVD={route!r}: choose {' or '.join(svd.ROUTES)}")
    return route


def _prepare_svd(method: str) -> PrepareFn:
    def prepare(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
        resolve_options(method, options)
        if "rank_fraction" in options and options["rank_fraction"] is None:
            options["rank_fraction"] = 1.0 / len(sources.inputs)  # recorded resolved, like the DARE seed
        return {
            "filter": KeyFilter(tuple(options["include"]), tuple(options["exclude"])),
            "device": None if options["device"] == "inputs" else torch.device(options["device"]),
            "route": svd_route(),
        }  # fmt: skip

    return prepare


def _svd_method(fn: Callable[[Sequence[torch.Tensor], MergeContext], Any]) -> Callable[[Sequence[torch.Tensor], MergeContext], Any]:
    """Route a key: 2-D and selected -> fn on the inputs' matrices (on the chosen device), else ``other``."""

    def merge(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> Any:
        if vectors[0].dim() != 2 or 0 in vectors[0].shape or not ctx.state["filter"].selects(ctx.key):
            return (_mean if ctx.options["other"] == "mean" else _sum)(vectors, ctx)
        device = ctx.state["device"] or vectors[0].device
        result = fn([v.to(device) for v in vectors], ctx)
        return result.to(vectors[0].device)  # back where the command computes (a no-op when there)

    return merge


def _tsv(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> Any:
    factors = svd.tsv_merge(vectors, ctx.weights, ctx.options["rank_fraction"], ctx.state["route"])
    return factors if ctx.options["lowrank"] else factors.dense()


def _iso_c(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> Any:
    return svd.iso_c(vectors, ctx.weights, ctx.state["route"])


def _iso_cts(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> Any:
    o = ctx.options
    return svd.iso_cts(vectors, ctx.weights, o["common_fraction"], o["sizing"], o["spectrum"], ctx.state["route"])


for _name, _fn, _summary in (
    ("tsv", _tsv, "TSV-M: top rank_fraction of each w_i tau_i's singular triplets, concatenated, U and V orthogonalised"),
    ("iso-c", _iso_c, "Iso-C: SVD of sum_i w_i tau_i with every singular value replaced by their mean"),
    ("iso-cts", _iso_cts, "Iso-CTS: common top directions of the sum + per-input directions outside them, flat spectrum"),
):
    OPTION_CHECKS[_name] = _check_svd_options
    register(MergeMethod(_name, _svd_method(_fn), _summary + " (2-D tensors; others: other=mean|sum)",
                         options=tuple(OPTION_DEFAULTS[_name]), prepare=_prepare_svd(_name)))  # fmt: skip


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
