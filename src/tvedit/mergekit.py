"""mergekit recipes of the task-arithmetic family, run by ``tvedit add recipe.yml``.

A YAML file with a ``merge_method`` key is a mergekit configuration. This module parses and
validates it (every error is one line, exit 2, before any tensor is read) and supplies the merge
method that ``api.add`` streams key by key, with mergekit's semantics (generalized task arithmetic:
per-model sparsification, weighting, optional TIES sign consensus, normalisation, lambda).
mergekit is not a dependency: the semantics are written down in docs/mergekit.md and implemented
here from that description. The random draws (DARE, DELLA) use tvedit's seeded per-(input, key)
generators instead of torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
            from tvedit.tensorio import parse_dtype

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
def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """tensor * mask, scaled to the l1 norm of tensor (unless either norm is below 1e-7)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.sort(values, descending=descending, stable=True).indices


def magnitude_count(density: float, n: int, key: str) -> int:
    """Entries ``magnitude`` keeps: k = floor(density * n), refused when 0 (as mergekit)."""
    k = int(density * n)
    if k <= 0:
        raise UsageError(f"key {key!r}: density {density} keeps no entry of its {n} (mergekit refuses this too)")
    return k


def magnitude(tau: torch.Tensor, density: float, rescale: bool, key: str) -> torch.Tensor:
    """Keep the k = floor(density * n) largest |tau| (ties: lower flat index first), ranked by
    float32 magnitudes: the k-th largest by kthvalue, every entry above it, and of the entries equal
    to it the first ones in row-major order (the order of a stable descending sort, without one)."""
    if density >= 1:
        return tau
    n = tau.numel()
    k = magnitude_count(density, n, key)
    keep = sparsify.largest_mask(tau.detach().to(torch.float32).abs().reshape(-1), k)
    return rescaled(tau, keep.to(tau.dtype).view(tau.shape), rescale)


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs as mergekit: drop the n_top = floor(gamma n) largest and the smallest, keeping
    floor(density n); over the whole flattened tensor. n_top = 0 keeps nothing (mergekit's slice
    ``sorted[n_bot:-0]`` is empty): reproduced, and counted for a warning."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    mask = torch.zeros(n, dtype=tau.dtype)
    if n_top > 0:
        mask[_order(tau.abs().reshape(-1), False)[n_bot : n - n_top]] = 1
    return rescaled(tau, mask.view(tau.shape), rescale)


def bernoulli(tau: torch.Tensor, density: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability density (m = 1[u < density]), l1-rescaled."""
    if density >= 1:
        return tau
    mask = (torch.rand(tau.shape, generator=gen, dtype=torch.float32) < density).to(tau.dtype)
    return rescaled(tau, mask, rescale)


def della_magprune(tau: torch.Tensor, density: float, epsilon: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    """DELLA: per row (dim 1; 1-D tensors are one row), rank r = 1..n by |tau| ascending; keep with
    probability p = (density - eps) + 2 eps (r - 1)/(n - 1); l1-rescaled over the whole tensor."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    shape = tau.shape
    t = tau.unsqueeze(0) if tau.dim() < 2 else tau
    ranks = torch.argsort(_order_rows(t.abs()), dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1)  # a one-entry row: rank_norm 0 (mergekit divides 0 by 0 there)
    probs = (density - epsilon) + ((ranks - lo) / span).clamp(0, 1) * 2 * epsilon
    mask = (torch.rand(t.shape, generator=gen, dtype=torch.float32) < probs).to(tau.dtype)
    return rescaled(t, mask, rescale).reshape(shape)


def _order_rows(mag: torch.Tensor) -> torch.Tensor:
    return torch.sort(mag, dim=1, descending=False, stable=True).indices


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
        divisor = torch.tensor(1.0 if abs(s) < 1e-8 else s, dtype=mixed.dtype)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


# --------------------------------------------------------------------------------------------
# the merge method handed to api.add
# --------------------------------------------------------------------------------------------
def merge_method(recipe: Recipe, seed: int = 0) -> tuple[MergeMethod, list[str]]:
    """The method for ``api.add(custom=...)`` and the list it fills with the keys that breadcrumbs
    zeroed because gamma * n < 1 (for a warning)."""
    zeroed: list[str] = []

    def merge(vectors: Sequence[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        key = ctx.key
        m = recipe.method
        rescale = bool(recipe.param("rescale", key))
        cuts = ctx.key_state.get("cuts")  # chunks of a huge key (magnitude without rescaling)
        out, weights = [], []
        for i, tau in enumerate(vectors):
            tau = tau.to(torch.float64 if tau.dtype == torch.float64 else torch.float32)
            weights.append(float(recipe.param("weight", key, i)))
            density = float(recipe.param("density", key, i))
            if cuts is not None:
                tau = tau if cuts[i] is None else rescaled(tau, cuts[i].take(tau).to(tau.dtype), False)
            elif m.sparsify == "magnitude":
                tau = magnitude(tau, density, rescale, key)
            elif m.sparsify == "magnitude_outliers":
                tau = magnitude_outliers(tau, density, float(recipe.param("gamma", key, i)), rescale)
                if density < 1 and int(float(recipe.param("gamma", key, i)) * tau.numel()) == 0 and key not in zeroed:
                    zeroed.append(key)
            elif m.sparsify in ("random", "della_magprune"):
                gen = torch.Generator().manual_seed(sparsify.derived_seed(seed, i, key))
                if m.sparsify == "random":
                    tau = bernoulli(tau, density, rescale, gen)
                else:
                    tau = della_magprune(tau, density, float(recipe.param("epsilon", key, i)), rescale, gen)
            out.append(tau)
        lam = float(recipe.param("lambda", key))
        if not math.isfinite(lam):
            raise UsageError(f"{recipe.path}: lambda {lam} is not finite")
        return gta_merge(out, weights, consensus=m.consensus, normalize=bool(recipe.param("normalize", key)), lam=lam)

    def elementwise(_options: dict[str, Any], key: str) -> bool:
        """Huge tensors go in chunks without sparsification (task_arithmetic), and for magnitude
        (ties) without rescaling once key_pass found each input's cut; the other sparsifiers rank
        rows or l1-rescale whole tensors."""
        m = recipe.method
        return m.sparsify is None or (m.sparsify == "magnitude" and not bool(recipe.param("rescale", key)))

    def key_pass(chunks: Callable[[], Any], ctx: MergeContext) -> None:
        """Each input's magnitude cut for one huge key, by an exact radix select over its chunks."""
        if recipe.method.sparsify != "magnitude":
            return
        densities = [float(recipe.param("density", ctx.key, i)) for i in range(len(ctx.weights))]
        cuts = sparsify.chunk_cuts(chunks, [0 if d >= 1 else magnitude_count(d, ctx.numel, ctx.key) for d in densities])
        ctx.key_state["cuts"] = [None if d >= 1 else cut for d, cut in zip(densities, cuts, strict=True)]

    method = MergeMethod(f"mergekit:{recipe.method_name}", merge, f"mergekit {recipe.method_name}", elementwise=elementwise, key_pass=key_pass)
    return method, zeroed


def provenance_options(recipe: Recipe, seed: int) -> dict[str, Any]:
    """What ``add`` records as method options: the recipe as written (paths resolved) and the seed."""
    raw = {k: v for k, v in recipe.raw.items() if k not in ("models", "base_model")}
    raw["models"] = [{"model": str(p), "parameters": mp} for p, mp in zip(recipe.models, recipe.model_params, strict=True)]
    raw["base_model"] = str(recipe.base)
    raw["seed"] = seed
    return raw
