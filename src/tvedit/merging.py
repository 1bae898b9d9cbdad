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
from typing import Any

import torch

from tvedit import arith, sparsify
from tvedit.errors import UsageError


@dataclass
class MergeContext:
    """What a method may look at besides the tensors: the key, the inputs' weights, options."""

    key: str
    weights: Sequence[float]
    options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # filled by prepare()
    out: torch.Tensor | None = None  # an uninitialised scratch buffer of the key's shape a method may fill and return


MergeFn = Callable[[Sequence[torch.Tensor], MergeContext], torch.Tensor]
PrepareFn = Callable[[Any, dict[str, Any]], dict[str, Any]]  # (VectorSources, options) -> state


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: MergeFn
    summary: str
    options: tuple[str, ...] = ()  # option names this method reads (validated by the CLI)
    prepare: PrepareFn | None = None


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


register(MergeMethod("sum", _sum, "plain task arithmetic: sum_i w_i tau_i (the default)"))
register(MergeMethod("mean", _mean, "weighted mean: sum_i w_i tau_i / sum_i w_i"))


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
        try:
            options["lambda"] = float(options["lambda"])
        except (TypeError, ValueError):
            raise UsageError(f"--option lambda={options['lambda']}: must be a number") from None
        if not options["lambda"] >= 0:
            raise UsageError(f"--option lambda={options['lambda']}: must be >= 0")
    return options


def _vector_stream(sources: Any) -> sparsify.Stream:
    """Each input's task-vector tensors, key by key (sources: api.VectorSources); re-iterable."""

    def stream():
        for key in sources.keys:
            for i, tau in enumerate(sources.vectors(key)):
                yield i, key, tau

    return stream


def _prepare_ties(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
    resolve_options("ties", options)
    if options["scope"] != "global":
        return {}
    return {"plans": sparsify.global_topk_plan(_vector_stream(sources), len(sources.inputs), options["density"])}


def _ties(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    density = ctx.options["density"]
    plans = ctx.state.get("plans")
    trimmed = []
    for i, tau in enumerate(vectors):
        keep = plans[i].mask(ctx.key, tau) if plans else sparsify.topk_mask(tau, density)
        trimmed.append(sparsify.masked(tau, keep))
    return sparsify.ties_merge(trimmed, ctx.weights, weighted_election=ctx.options["weighted_election"], divisor=ctx.options["divisor"])


def _prepare_dare_ties(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
    resolve_options("dare-ties", options)
    return {}


def _dare_ties(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    o = ctx.options
    dropped = []
    for i, tau in enumerate(vectors):
        gen = torch.Generator().manual_seed(sparsify.derived_seed(o["seed"], i, ctx.key))
        dropped.append(sparsify.dare(tau, o["density"], gen, o["rescale"])[0])
    return sparsify.ties_merge(dropped, ctx.weights, weighted_election=o["weighted_election"], divisor=o["divisor"])


def _prepare_consensus(sources: Any, options: dict[str, Any]) -> dict[str, Any]:
    resolve_options("consensus", options)
    return {}


def _consensus(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    weighted = [v.to(torch.float32) * float(w) for v, w in zip(vectors, ctx.weights, strict=True)]
    return sparsify.consensus_merge(weighted, ctx.options["lambda"], ctx.options["min_agree"])


register(MergeMethod(
    "ties", _ties, "TIES: trim each tau_i to density (top-|tau|), elect sign(sum), disjoint mean",
    options=tuple(OPTION_DEFAULTS["ties"]), prepare=_prepare_ties,
))  # fmt: skip
register(MergeMethod(
    "dare-ties", _dare_ties, "DARE drop-and-rescale each tau_i (seeded), then TIES elect + disjoint mean",
    options=tuple(OPTION_DEFAULTS["dare-ties"]), prepare=_prepare_dare_ties,
))  # fmt: skip
register(MergeMethod(
    "consensus", _consensus, "TALL consensus: sum_i w_i tau_i where >= min_agree TALL masks agree",
    options=tuple(OPTION_DEFAULTS["consensus"]), prepare=_prepare_consensus,
))  # fmt: skip


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
