"""The table of merge methods used by ``add``: one entry per method, nothing else to touch.

A method turns the task vectors' tensors for one key into one merged tensor; ``add`` then applies
theta0 + alpha * merged. Methods that need a first pass over all inputs (e.g. a global threshold)
implement ``prepare``. Semantics: docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tvedit import arith


@dataclass
class MergeContext:
    """What a method may look at besides the tensors: the key, the inputs' weights, options."""

    key: str
    weights: Sequence[float]
    options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # filled by prepare()


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
    return arith.weighted_sum(vectors, ctx.weights)


def _mean(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
    total = sum(ctx.weights)
    if total == 0:
        raise ValueError("mean: the weights sum to zero")
    return arith.weighted_sum(vectors, ctx.weights) / total


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


register(MergeMethod("sum", _sum, "plain task arithmetic: sum_i w_i tau_i (the default)"))
register(MergeMethod("mean", _mean, "weighted mean: sum_i w_i tau_i / sum_i w_i"))


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None
