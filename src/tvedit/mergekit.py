"""mergekit recipes of the task-arithmetic family, run by ``tvedit add recipe.yml``.

A YAML file with a ``merge_method`` key is a mergekit configuration. This module parses and
validates it (every error is one line, exit 2, before any tensor is read) and supplies the merge
method that ``arith.add`` streams key by key, with mergekit's semantics (generalized task arithmetic:
per-model sparsification, weighting, optional TIES sign consensus, normalisation, lambda).
mergekit is not a dependency: the semantics are written down in docs/mergekit.md and implemented
here from that description. The random draws (DARE, DELLA) use tvedit's seeded per-(input, key)
generators instead of torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tvedit.engine import chunk_numel
from tvedit.errors import InputError, UsageError
from tvedit.merging import MergeContext, MergeMethod
from tvedit.ops import sparsify


@dataclass(frozen=True)
class GTAMethod:
    """One member of mergekit's generalized task-arithmetic family."""

    consensus: bool  # TIES sign election ("sum" consensus)
    sparsify: str | None  # magnitude | random | magnitude_outliers | della_magprune
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter


METHODS: dict[str, GTAMethod] = {
    "task_arithmetic": GTAMethod(False, None, False, False),
    "ties": GTAMethod(True, "magnitude", True, False),
    "dare_ties": GTAMethod(True, "random", False, True),
    "dare_linear": GTAMethod(False, "random", False, True),
    "breadcrumbs": GTAMethod(False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": GTAMethod(True, "magnitude_outliers", False, False),
    "della": GTAMethod(True, "della_magprune", True, True),
    "della_linear": GTAMethod(False, "della_magprune", False, True),
}
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name")
GLOBAL_PARAMS = ("normalize", "rescale", "lambda", "int8_mask")
RESCALE_EPS = 1e-7  # below this l1 norm (before or after masking) mergekit does not rescale


def tensor_params(method: GTAMethod) -> dict[str, float | None]:
    """Per-model parameters and their defaults (None: required)."""
    out: dict[str, float | None] = {"weight": None, "density": 1.0}
    if method.sparsify == "magnitude_outliers":
        out["gamma"] = 0.01
    if method.sparsify == "della_magprune":
        out["epsilon"] = 0.15
    return out


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def is_mergekit_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


@dataclass
class Recipe:
    path: Path
    method_name: str
    method: GTAMethod
    base: Path
    models: list[Path]
    model_params: list[dict[str, Any]]  # raw settings per model
    global_params: dict[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    # -- per-tensor evaluation (mergekit's evaluate_setting: scalar, or filters, first match) ----
    def _value(self, setting: Any, key: str, where: str) -> Any:
        if not isinstance(setting, list):
            return setting
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or filt in key:
                return cond["value"]
        return None

    def param(self, name: str, key: str, model: int | None = None) -> Any:
        if model is not None and name in self.model_params[model]:
            v = self._value(self.model_params[model][name], key, f"models[{model}]")
            if v is not None:
                return v
        if name in self.global_params:
            v = self._value(self.global_params[name], key, "parameters")
            if v is not None:
                return v
        if model is not None:
            default = tensor_params(self.method)[name]
            if default is None:
                raise UsageError(f"{self.path}: models[{model}]: no {name!r} for tensor {key!r} (mergekit requires one)")
            return default
        return {"normalize": self.method.normalize, "rescale": self.method.rescale, "lambda": 1.0, "int8_mask": False}[name]


def _model_path(ref: Any, where: str, root: Path) -> Path:
    if isinstance(ref, dict):
        if set(ref) - {"model"}:
            raise UsageError(f"{where}: unsupported field {sorted(set(ref) - {'model'})[0]!r} (tvedit takes a local model path)")
        ref = ref.get("model")
    if not isinstance(ref, str) or not ref:
        raise UsageError(f"{where}: a model reference must be a local directory path")
    if "+" in ref:
        raise UsageError(f"{where}: {ref!r}: LoRA references (model+lora) are not supported")
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = root / p if (root / p).exists() or not p.exists() else p
    if not p.exists():
        raise InputError(f"{where}: {ref!r} is not a local path (tvedit never downloads models)")
    return p


def _check_setting(value: Any, where: str) -> None:
    """Scalars and filter lists; gradients (lists of numbers) are refused."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        if not isinstance(value, bool) and not math.isfinite(value):
            raise UsageError(f"{where}: {value!r} is not a finite number")
        return
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        for e in value:
            extra = set(e) - {"filter", "value"}
            if extra or "value" not in e:
                raise UsageError(f"{where}: a conditional value needs 'value' (and optionally 'filter'), not {sorted(extra) or 'no value'}")
            if e.get("filter") is not None and not isinstance(e["filter"], str):
                raise UsageError(f"{where}: filter {e['filter']!r} must be a string")
            _check_setting(e["value"], where)
        return
    if isinstance(value, list):
        raise UsageError(f"{where}: gradients (a list of values interpolated over layers) are not supported; use a scalar or filter list")
    raise UsageError(f"{where}: {value!r} is not a number")


def _all_values(setting: Any) -> list[Any]:
    return [e["value"] for e in setting] if isinstance(setting, list) else [setting]


def parse(path: Path, data: dict[str, Any]) -> Recipe:
    where = str(path)
    name = data.get("merge_method")
    if name not in METHODS:
        raise UsageError(f"{where}: merge_method {name!r} is not supported (tvedit runs: {', '.join(METHODS)})")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        hint = " (slices/modules: tvedit merges whole models)" if unknown[0] in ("slices", "modules") else ""
        raise UsageError(f"{where}: unsupported field {unknown[0]!r}{hint}")
    method = METHODS[name]
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        raise UsageError(f"{where}: tokenizer_source {tok!r} is not supported (tvedit keeps the base model's tokenizer: 'base')")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            from tvedit.encodings import parse_dtype

            try:
                parse_dtype(str(data[key]))
            except ValueError as exc:
                raise UsageError(f"{where}: {key}: {exc}") from None
    root = path.parent
    if data.get("base_model") is None:
        raise UsageError(f"{where}: {name} needs base_model (the task vectors are taken against it)")
    base = _model_path(data["base_model"], f"{where}: base_model", root)
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise UsageError(f"{where}: 'models' must be a non-empty list")
    allowed = tensor_params(method)
    glob = data.get("parameters") or {}
    if not isinstance(glob, dict):
        raise UsageError(f"{where}: 'parameters' must be a mapping")
    for k, v in glob.items():
        if k not in allowed and k not in GLOBAL_PARAMS:
            raise UsageError(f"{where}: parameters: {name} does not take {k!r} (it takes: {', '.join([*GLOBAL_PARAMS, *allowed])})")
        _check_setting(v, f"{where}: parameters.{k}")
    models, params = [], []
    for i, entry in enumerate(models_raw):
        w = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise UsageError(f"{w}: each entry needs a 'model'")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise UsageError(f"{w}: unsupported field {extra[0]!r}")
        p = _model_path(entry["model"], f"{w}.model", root)
        mp = entry.get("parameters") or {}
        if not isinstance(mp, dict):
            raise UsageError(f"{w}.parameters: must be a mapping")
        for k, v in mp.items():
            if k not in allowed:
                raise UsageError(f"{w}.parameters: {name} does not take {k!r} per model (it takes: {', '.join(allowed)})")
            _check_setting(v, f"{w}.parameters.{k}")
        if p.resolve() == base.resolve():
            continue  # mergekit skips the base model among the inputs (its task vector is zero)
        if "weight" not in mp and "weight" not in glob:
            raise UsageError(f"{w}: no 'weight' (mergekit requires a weight per model)")
        models.append(p)
        params.append(mp)
    if not models:
        raise UsageError(f"{where}: no model other than the base_model to merge")
    recipe = Recipe(path, name, method, base, models, params, dict(glob), data.get("dtype"), data.get("out_dtype"), data)
    _check_ranges(recipe)
    return recipe


def _check_ranges(r: Recipe) -> None:
    """Values checkable without tensors: densities in [0, 1], DELLA's density +/- epsilon in (0, 1)."""
    sources = [(f"models[{i}].parameters", mp) for i, mp in enumerate(r.model_params)] + [("parameters", r.global_params)]
    for where, mp in sources:
        for name in ("density", "gamma", "epsilon"):
            for v in _all_values(mp.get(name, 0.5)):
                if isinstance(v, bool) or not 0 <= float(v) <= 1:
                    raise UsageError(f"{r.path}: {where}.{name}: {v!r} must be in [0, 1]")
    if r.method.sparsify == "della_magprune":
        for i in range(len(r.models)):
            dens = _all_values(r.model_params[i].get("density", r.global_params.get("density", 1.0)))
            eps = _all_values(r.model_params[i].get("epsilon", r.global_params.get("epsilon", 0.15)))
            for d in dens:
                for e in eps:
                    if 0 < float(d) < 1 and not (0 < float(d) - float(e) and float(d) + float(e) < 1):
                        raise UsageError(f"{r.path}: models[{i}]: density {d} +/- epsilon {e} must stay in (0, 1) (mergekit's rule)")


# --------------------------------------------------------------------------------------------
# the math (pure per-tensor functions; float32 in, float32 out)
# --------------------------------------------------------------------------------------------
def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, norms: tuple[float, float] | None = None) -> torch.Tensor:
    """tensor * mask, scaled to the l1 norm of tensor (unless either norm is below 1e-7). The norms
    are exact (sparsify.l1_norm) and rounded to the tensor's dtype; ``norms`` = (||tensor||_1,
    ||tensor * mask||_1) of the whole tensor when ``tensor`` is one chunk of it."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = norms if norms is not None else (sparsify.l1_norm(tensor), sparsify.l1_norm(masked))
    b, a = (torch.tensor(x, dtype=masked.dtype, device=masked.device) for x in (before, after))
    if b < RESCALE_EPS or a < RESCALE_EPS:
        return masked
    return masked * (b / a)


def magnitude_count(density: float, n: int, key: str) -> int:
    """Entries ``magnitude`` keeps: k = floor(density * n), refused when 0 (as mergekit)."""
    k = int(density * n)
    if k <= 0:
        raise UsageError(f"key {key!r}: density {density} keeps no entry of its {n} (mergekit refuses this too)")
    return k


def outlier_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Breadcrumbs as mergekit, over the whole flattened tensor ranked by |tau| ascending (stable):
    ranks n_bot .. n - n_top are kept, with target = floor(density n), n_top = floor(gamma n) and
    n_bot = n - target - n_top (clamped at 0, n_top lowered to match). Returns (n_bot, n_top);
    n_top = 0 keeps nothing (mergekit's slice ``sorted[n_bot:-0]`` is empty)."""
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def della_mask(rows: torch.Tensor, density: float, epsilon: float, gen: torch.Generator) -> torch.Tensor:
    """DELLA's mask of ``rows`` (2-D or more, ranked along dim 1 as mergekit): rank r = 1..n by |tau|
    ascending; keep with probability p = (density - eps) + 2 eps (r - 1)/(n - 1), drawn from ``gen``
    (row after row for 2-D)."""
    ranks = torch.argsort(torch.sort(rows.abs(), dim=1, descending=False, stable=True).indices, dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1)  # a one-entry row: rank_norm 0 (mergekit divides 0 by 0 there)
    probs = (density - epsilon) + ((ranks - lo) / span).clamp(0, 1) * 2 * epsilon
    draws = torch.rand(rows.shape, generator=gen, dtype=torch.float32, device="cpu")  # on the host: the same on every device
    return (draws.to(rows.device) < probs).to(rows.dtype)


@dataclass
class Sparsifier:
    """One input's sparsification of one tensor, applied to its consecutive flattened pieces in
    turn (one piece: the whole tensor): the ranking cuts and l1 norms a key pass found over the
    whole tensor, and the generator drawn on piece after piece (the draws of one whole draw).

    magnitude: keep the k = floor(density n) largest |tau| (ties: lower flat index first); random
    (DARE): keep with probability density (m = 1[u < density]); magnitude_outliers (Breadcrumbs):
    ``outlier_counts``; della_magprune: ``della_mask`` per row (1-D tensors are one row). Each l1-rescaled over the whole tensor when ``rescale``. Rankings use float32 magnitudes."""

    kind: str | None  # None: kept as is (no sparsifier, or density >= 1)
    density: float = 1.0
    rescale: bool = False
    cuts: tuple[sparsify.Cut, ...] = ()  # magnitude: (keep,); outliers: (wide, narrow)
    seed: int = 0
    epsilon: float = 0.0
    rows: tuple[int, ...] = ()  # della: the shape it ranks along dim 1: (-1, row), or a >2-D tensor's own
    norms: tuple[float, float] | None = None
    gen: torch.Generator | None = None

    def fresh(self) -> Sparsifier:
        """A copy that starts again at the first piece (cuts and generator rewound)."""
        gen = torch.Generator().manual_seed(self.seed) if self.kind in ("random", "della_magprune") else None
        return replace(self, cuts=tuple(replace(c) for c in self.cuts), gen=gen)

    def mask(self, tau: torch.Tensor) -> torch.Tensor:
        if self.kind == "magnitude":
            return self.cuts[0].take(tau).to(tau.dtype)
        if self.kind == "magnitude_outliers":
            if not self.cuts:
                return torch.zeros_like(tau)
            wide, narrow = self.cuts
            return (wide.take(tau) & ~narrow.take(tau)).to(tau.dtype)
        assert self.gen is not None
        if self.kind == "random":
            draws = torch.rand(tau.shape, generator=self.gen, dtype=torch.float32, device="cpu")  # the same on every device
            return (draws < self.density).to(device=tau.device, dtype=tau.dtype)
        if self.density <= 0:
            return torch.zeros_like(tau)
        return della_mask(tau.view(self.rows), self.density, self.epsilon, self.gen).reshape(-1)

    def apply(self, tau: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            return tau
        if self.kind == "della_magprune" and self.density <= 0:
            return torch.zeros_like(tau)
        return rescaled(tau, self.mask(tau), self.rescale, self.norms)


def _running_sum(terms: Iterator[torch.Tensor]) -> torch.Tensor:
    """0 + t_0 + t_1 + ... in this order, accumulated in place: the same bits as
    torch.stack(terms).sum(0) (signed zeros included) without the stacked copy."""
    first = next(terms)
    total = torch.zeros_like(first).add_(first)
    for t in terms:
        total.add_(t)
    return total


def gta_merge(
    taus: Sequence[torch.Tensor], weights: Sequence[float], *, consensus: bool, normalize: bool, lam: float
) -> torch.Tensor:
    """Weighted deltas, optional TIES election (majority sign of the weighted sum, 0 -> +1; a zero
    delta never agrees), sum, optional division by the (agreeing) weight sum, times lambda.
    In place on the weighted copies: one copy per input and the sums, no stacked temporaries."""
    wd = [t * float(w) for t, w in zip(taus, weights, strict=True)]
    total = _running_sum(iter(wd))
    if consensus:
        majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        masks = [(torch.sign(x) == majority).to(x.dtype) for x in wd]
        del majority
        for x, m in zip(wd, masks, strict=True):
            x.mul_(m)
        mixed = _running_sum(iter(wd))
        divisor = _running_sum(m.mul_(float(w)) for m, w in zip(masks, weights, strict=True))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = total
        s = float(sum(float(w) for w in weights))
        divisor = torch.tensor(1.0 if abs(s) < 1e-8 else s, dtype=mixed.dtype, device=mixed.device)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


# --------------------------------------------------------------------------------------------
# the merge method handed to arith.add
# --------------------------------------------------------------------------------------------
def merge_method(recipe: Recipe, seed: int = 0) -> tuple[MergeMethod, list[str]]:
    """The method for ``arith.add(custom=...)`` and the list it fills with the keys that breadcrumbs
    zeroed because gamma * n < 1 (for a warning). Every method goes a chunk at a time on huge
    tensors: a key pass finds each input's cuts and l1 norms over the whole tensor; a tensor merged
    whole is one chunk, so both paths compute the same values by construction."""
    zeroed: list[str] = []

    def key_pass(chunks: Callable[..., Any], ctx: MergeContext) -> None:
        key, m, n = ctx.key, recipe.method, ctx.numel
        rescale = bool(recipe.param("rescale", key))
        plans = []
        for i in range(len(ctx.weights)):
            density = float(recipe.param("density", key, i))
            kind = m.sparsify if (m.sparsify is not None and density < 1) else None
            plans.append(Sparsifier(kind, density, rescale, seed=sparsify.derived_seed(seed, i, key)))
            if m.sparsify == "magnitude_outliers" and density < 1 and int(float(recipe.param("gamma", key, i)) * n) == 0 and key not in zeroed:
                zeroed.append(key)
        ks: list[int] = []
        for i, p in enumerate(plans):  # cuts: two per input (outliers: wide, narrow), ties "high" for an ascending sort's order
            if p.kind == "magnitude":
                ks += [magnitude_count(p.density, n, key), 0]
            elif p.kind == "magnitude_outliers":
                n_bot, n_top = outlier_counts(p.density, float(recipe.param("gamma", key, i)), n)
                ks += [n - n_bot, n_top] if n_top > 0 else [0, 0]
            else:
                ks += [0, 0]
        if any(ks):
            cuts = sparsify.chunk_cuts(lambda: ([t for t in pieces for _ in (0, 1)] for pieces in chunks()), ks,
                                       ties="high" if m.sparsify == "magnitude_outliers" else "low")  # fmt: skip
            for i, p in enumerate(plans):
                if p.kind == "magnitude":
                    p.cuts = (cuts[2 * i],)
                elif p.kind == "magnitude_outliers" and ks[2 * i + 1] > 0:
                    p.cuts = (cuts[2 * i], cuts[2 * i + 1])
        step = None
        if m.sparsify == "della_magprune":
            row = ctx.shape[1] if len(ctx.shape) == 2 else n  # mergekit ranks along dim 1; 1-D: one row
            for i, p in enumerate(plans):
                p.epsilon, p.rows = float(recipe.param("epsilon", key, i)), ((-1, row) if len(ctx.shape) <= 2 else ctx.shape)
            # chunks of whole rows (a tensor of more than two dims, or one row longer than a chunk: one chunk)
            step = max(1, chunk_numel() // row) * row if len(ctx.shape) <= 2 else n
            ctx.key_state["step"] = step
        if rescale and any(p.kind is not None for p in plans):  # the exact l1 norms, drawing the masks as the merge will
            runs = [p.fresh() for p in plans]
            parts = [[None, None] for _ in plans]
            for pieces in chunks(step):
                for j, (r, tau) in enumerate(zip(runs, pieces, strict=True)):
                    if r.kind is None:
                        continue
                    tau = tau.to(torch.float64 if tau.dtype == torch.float64 else torch.float32)
                    for slot, t in enumerate((tau, tau * r.mask(tau))):
                        got = sparsify.l1_parts(t)
                        parts[j][slot] = got if parts[j][slot] is None else parts[j][slot] + got
            for p, (before, after) in zip(plans, parts, strict=True):
                if before is not None:
                    p.norms = (sparsify.l1_value(before), sparsify.l1_value(after))
        ctx.key_state["sparsifiers"] = [p.fresh() for p in plans]

    def merge(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        key, m = ctx.key, recipe.method
        shape = None
        if "sparsifiers" not in ctx.key_state:  # a whole tensor: one chunk, after its own key pass
            shape = vectors[0].shape
            flat = [v.reshape(-1) for v in vectors]
            ctx = replace(ctx, numel=flat[0].numel(), shape=tuple(shape), key_state={})
            key_pass(lambda step=None: iter([flat]), ctx)
            vectors = flat
        out, weights = [], []
        for i, (tau, sp) in enumerate(zip(vectors, ctx.key_state["sparsifiers"], strict=True)):
            tau = tau.to(torch.float64 if tau.dtype == torch.float64 else torch.float32)
            weights.append(float(recipe.param("weight", key, i)))
            out.append(sp.apply(tau))
        lam = float(recipe.param("lambda", key))
        if not math.isfinite(lam):
            raise UsageError(f"{recipe.path}: lambda {lam} is not finite")
        merged = gta_merge(out, weights, consensus=m.consensus, normalize=bool(recipe.param("normalize", key)), lam=lam)
        return merged.view(shape) if shape is not None else merged

    method = MergeMethod(f"mergekit:{recipe.method_name}", merge, f"mergekit {recipe.method_name}", elementwise=True, key_pass=key_pass)
    return method, zeroed


def provenance_options(recipe: Recipe, seed: int) -> dict[str, Any]:
    """What ``add`` records as method options: the recipe as written (paths resolved) and the seed."""
    raw = {k: v for k, v in recipe.raw.items() if k not in ("models", "base_model")}
    raw["models"] = [{"model": str(p), "parameters": mp} for p, mp in zip(recipe.models, recipe.model_params, strict=True)]
    raw["base_model"] = str(recipe.base)
    raw["seed"] = seed
    return raw
