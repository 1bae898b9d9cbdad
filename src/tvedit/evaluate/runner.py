"""The model work behind ``tvedit evaluate``: logits of theta0 + sum_i alpha_i tau_i, fast over many alphas.

What stays put across a sweep (ALGORITHMS.md section 5, "speed"):

* theta0 is built into ONE model once; an edited model is never materialised: its parameters are
  substituted with ``torch.func.functional_call`` (``models.base.functional``).
* Each task's frozen zero-shot head is built once from theta0 and cached.
* Each task's splits are decoded once into tensors (``TaskData``); batches are slices.
* Under f_lin the FEATURES are affine in the coefficients: g(x; theta0) + sum_i alpha_i J(theta0) tau_i,
  where g is the adapter's ``features`` (CLIP: the image encoder's output before normalisation) and
  the logits are ``head_logits`` of them (normalise, inner product with the head) — the encoder is
  linearized and normalised afterwards, as in training. ``LinearTerms`` computes g0 and every
  J tau_i once (one jvp per vector and batch); any alpha, any grid of alphas, and the whole
  disentanglement grid then cost no forward pass of the encoder at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tvedit.errors import InputError, MismatchError, UsageError
from tvedit.models.base import ModelAdapter, adapter_for, forward_ad_safe, functional, pick_device

Vector = dict[str, Tensor]  # a task vector: parameter name -> float32 tensor


@dataclass
class TaskData:
    """One task, decoded once: its manifest-style record and its splits as tensors."""

    name: str
    record: dict[str, Any]  # manifest ``task`` record: name, classes, templates
    splits: dict[str, tuple[Any, Tensor]] = field(default_factory=dict)  # split -> (inputs, labels)

    def split(self, name: str) -> tuple[Any, Tensor]:
        try:
            return self.splits[name]
        except KeyError:
            raise InputError(f"task {self.name}: no {name!r} split") from None

    def limit(self, split: str, n: int, seed: int = 0) -> None:
        """Keep a seeded random subset of at most ``n`` examples of ``split`` (in their order)."""
        inputs, labels = self.split(split)
        if len(labels) <= n:
            return
        keep = (
            torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
            .sort()
            .values
        )
        self.splits[split] = (_take(inputs, keep), labels[keep])


@dataclass
class LoadedVector:
    """A task vector read into memory (float32), with what evaluation needs from its manifest."""

    path: Path
    name: str
    tensors: Vector
    regime: str = "nonlinear"
    density: float | None = None  # fraction kept, for sparse (TaLoS / masked) vectors
    task: dict[str, Any] | None = None
    flin: set[str] = field(default_factory=set)  # f_lin definitions its linearized training used


def recorded_flin(provenance: Sequence[Mapping[str, Any]] | None) -> set[str]:
    """The f_lin definitions (``ModelAdapter.flin``) of every linearized fine-tuning step in a
    provenance, nested inputs included. A linearized ``finetune`` step without ``flin`` was
    written before tvedit recorded it, when CLIP's f_lin linearized the scores: ``"scores"``."""
    out: set[str] = set()
    for step in provenance or []:
        params = step.get("params") or {}
        if step.get("op") == "finetune" and params.get("mode") == "linearized":
            out.add(str(params.get("flin", "scores")))
        for rec in step.get("inputs") or []:
            if isinstance(rec, Mapping):
                out |= recorded_flin(rec.get("provenance"))
    return out


def _slice(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: _slice(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return inputs[start:stop]
    raise TypeError(f"cannot batch inputs of type {type(inputs).__name__}")


def _take(inputs: Any, index: Tensor) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: _take(v, index) for k, v in inputs.items()}
    return [inputs[i] for i in index.tolist()]


def _length(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        return _length(next(iter(inputs.values())))
    return len(inputs)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    return inputs.to(device) if hasattr(inputs, "to") else inputs  # tensors, TokenBatch


class Evaluator:
    """theta0 held once; logits of edited models by parameter substitution; heads cached.

    On CUDA, forward passes run under bf16 autocast (``bf16=False`` turns it off); the jvps of f_lin
    always run in float32. Logits come back as float32 on the CPU."""

    def __init__(
        self,
        adapter: ModelAdapter,
        theta0: Mapping[str, Tensor],
        batch_size: int = 512,
        device: str | torch.device = "auto",
        bf16: bool = True,
    ):
        self.adapter = adapter
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model: nn.Module = adapter.build(theta0).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.bf16 = bf16  # asked for; ``autocast``: in effect (CUDA only)
        self.autocast = bf16 and self.device.type == "cuda"
        self.params: dict[str, Tensor] = {k: p.detach() for k, p in self.model.named_parameters()}
        self.buffers: dict[str, Tensor] = {k: b for k, b in self.model.named_buffers()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._heads: dict[str, Any] = {}
        self._base_logits: dict[tuple[str, str], Tensor] = {}
        self._base_features: dict[tuple[str, str], Tensor] = {}
        # called after every batch forward (or jvp) with (batches done, None, what): a progress bar
        self.progress: Callable[[int, int | None, str], None] | None = None
        self._done = 0

    def _tick(self, what: str) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done, None, what)

    # -- heads -----------------------------------------------------------------------------------
    def head(self, task: TaskData) -> Any:
        if task.name not in self._heads:
            with torch.no_grad():
                self._heads[task.name] = self.adapter.make_head(self.model, task.record)
        return self._heads[task.name]

    # -- edits -----------------------------------------------------------------------------------
    def check_vector(self, vec: LoadedVector) -> None:
        known = set(self.params) | set(self.buffers)
        for key, t in vec.tensors.items():
            if key not in known:
                raise MismatchError(f"{vec.path}: key {key!r} is not a tensor of the base model")
            ref = self._tensor(key)
            if tuple(t.shape) != tuple(ref.shape):
                raise MismatchError(
                    f"{vec.path}: key {key!r}: shape {list(t.shape)} does not match the base's {list(ref.shape)}"
                )

    def edited(self, vectors: Sequence[Vector], alphas: Sequence[float]) -> dict[str, Tensor]:
        """The substituted tensors of theta0 + sum_i alphas[i] * vectors[i] (only keys that change)."""
        out: dict[str, Tensor] = {}
        for vec, a in zip(vectors, alphas, strict=True):
            if a == 0:
                continue
            for key, t in vec.items():
                base = out.get(key)
                if base is None:
                    base = self._tensor(key).float().clone()
                out[key] = base.add_(t.to(base.device), alpha=float(a))
        return out

    # -- logits ------------------------------------------------------------------------------------
    def _batches(self, inputs: Any) -> list[tuple[int, int]]:
        n = _length(inputs)
        return [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]

    @torch.no_grad()
    def logits(
        self, task: TaskData, split: str, params: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """[N, C] logits of the model with ``params`` substituted (None: theta0, cached)."""
        if not params:
            key = (task.name, split)
            if key not in self._base_logits:
                self._base_logits[key] = self._logits(task, split, None)
            return self._base_logits[key]
        return self._logits(task, split, params)

    def _logits(self, task: TaskData, split: str, params: Mapping[str, Tensor] | None) -> Tensor:
        inputs, _ = task.split(split)
        head = self.head(task)
        out = []
        for s, e in self._batches(inputs):
            batch = _to_device(_slice(inputs, s, e), self.device)
            fn: Callable[[nn.Module], Tensor] = lambda m, b=batch: self.adapter.scores(m, b, head)  # noqa: E731
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = functional(self.model, params, fn) if params else fn(self.model)
            self._tick(f"{task.name} {split}")
            out.append(logits.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def base_features(self, task: TaskData, split: str) -> Tensor:
        """[N, D] ``adapter.features`` of theta0 (cached; float32 on the CPU): what f_lin linearizes."""
        key = (task.name, split)
        if key not in self._base_features:
            inputs, _ = task.split(split)
            head = self.head(task)
            out = []
            for s, e in self._batches(inputs):
                batch = _to_device(_slice(inputs, s, e), self.device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    out.append(self.adapter.features(self.model, batch, head).float().cpu())
            self._base_features[key] = torch.cat(out)
        return self._base_features[key]

    def nll(self, task: TaskData, split: str, params: Mapping[str, Tensor] | None = None) -> tuple[float, int]:
        """(summed token NLL, predicted tokens) of a plain-text task's documents (perplexity)."""
        texts, _ = task.split(split)
        if not hasattr(self.adapter, "token_nll"):
            raise UsageError(f"task {task.name}: perplexity needs a causal language model, not the {self.adapter.family} family")
        total = torch.zeros(2, dtype=torch.float64)
        for s, e in self._batches(texts):
            fn: Callable[[nn.Module], Tensor] = lambda m, b=texts[s:e]: self.adapter.token_nll(m, b)  # type: ignore[attr-defined]  # noqa: E731
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out = functional(self.model, params, fn) if params else fn(self.model)
            total += out.double().cpu()
        return float(total[0]), int(total[1])

    def _tensor(self, key: str) -> Tensor:
        t = self.params.get(key)
        return self.buffers[key] if t is None else t

    def _features_of(self, names: list[str], batch: Any, head: Any) -> Callable[..., Tensor]:
        """values -> features of ``batch`` with the tensors ``names`` replaced by ``values``."""

        def fn(*values: Tensor) -> Tensor:
            return functional(
                self.model,
                dict(zip(names, values, strict=True)),
                lambda m: self.adapter.features(m, batch, head),
            )

        return fn

    def linear_terms(self, task: TaskData, split: str, vectors: Sequence[Vector]) -> LinearTerms:
        """g(x; theta0) and J(theta0) tau_i (g: the adapter's features) for every vector: one jvp
        per vector and batch."""
        inputs, labels = task.split(split)
        head = self.head(task)
        if getattr(head, "metric", None) == "exact_match":
            raise UsageError(f"task {task.name}: exact match (greedy decoding) has no f_lin; evaluate non-linear vectors without --linearize")
        f0 = self.base_features(task, split)
        jts = []
        for vec in vectors:
            names = sorted(vec)
            primals = tuple(self._tensor(k) for k in names)
            tangents = tuple(vec[k].to(p.device, p.dtype) for k, p in zip(names, primals, strict=True))
            parts = []
            for s, e in self._batches(inputs):
                fn = self._features_of(names, _to_device(_slice(inputs, s, e), self.device), head)
                with forward_ad_safe(), torch.no_grad():
                    _, jt = torch.func.jvp(fn, primals, tangents)
                parts.append(jt.float().cpu())
                self._tick(f"{task.name} {split} (jvp)")
            jts.append(torch.cat(parts))
        return LinearTerms(f0, jts, labels, self.head_fn(task))

    def head_fn(self, task: TaskData) -> Callable[[Tensor], Tensor]:
        """features [N, D] (CPU, float32) -> logits [N, C]: the adapter's ``head_logits``."""
        head = self.head(task)
        cpu_head = head.detach().float().cpu() if isinstance(head, Tensor) else head
        return lambda feats: self.adapter.head_logits(feats, cpu_head).float()


@dataclass
class LinearTerms:
    """f_lin(x; theta0 + sum_i alpha_i tau_i) = h(g0 + sum_i alpha_i J tau_i), for one task split:
    the features g are affine in the coefficients, the head h (normalise, inner product) is not."""

    f0: Tensor  # [N, D] features of theta0
    jvps: list[Tensor]  # one [N, D] per vector
    labels: Tensor
    head: Callable[[Tensor], Tensor]  # features -> logits [N, C]

    def features(self, alphas: Sequence[float]) -> Tensor:
        out = self.f0.clone()
        for a, jt in zip(alphas, self.jvps, strict=True):
            if a:
                out.add_(jt, alpha=float(a))
        return out

    def logits(self, alphas: Sequence[float]) -> Tensor:
        return self.head(self.features(alphas))


# ------------------------------------------------------------------------------------------------
# the evaluation session: an Evaluator, the tasks, the vectors, and a cached accuracy function
# ------------------------------------------------------------------------------------------------
class Session:
    """accuracy / predictions of theta0 + sum_i alpha_i tau_i on (task, split), under f or f_lin.

    ``linear`` selects f_lin; it is set when any vector is ``linearized`` (its only meaning) or on
    request (post-hoc linearization). Results are memoised by (task, split, alphas).
    """

    def __init__(
        self,
        evaluator: Evaluator,
        tasks: Sequence[TaskData],
        vectors: Sequence[LoadedVector],
        linear: bool = False,
    ):
        self.ev = evaluator
        self.tasks = {t.name: t for t in tasks}
        self.vectors = list(vectors)
        for v in self.vectors:
            evaluator.check_vector(v)
        self.linear = linear
        self._terms: dict[tuple[str, str, tuple[int, ...]], LinearTerms] = {}
        self._preds: dict[tuple[str, str, tuple[int, ...], tuple[float, ...]], Tensor] = {}

    def task(self, name: str) -> TaskData:
        try:
            return self.tasks[name]
        except KeyError:
            raise UsageError(f"no task named {name!r} (tasks: {', '.join(self.tasks)})") from None

    def terms(self, task: str, split: str, which: Sequence[int]) -> LinearTerms:
        key = (task, split, tuple(which))
        if key not in self._terms:
            # reuse per-vector jvps computed for another subset
            jvps = []
            for i in which:
                single = (task, split, (i,))
                if single not in self._terms:
                    self._terms[single] = self.ev.linear_terms(
                        self.task(task), split, [self.vectors[i].tensors]
                    )
                jvps.append(self._terms[single].jvps[0])
            t = self.task(task)
            self._terms[key] = LinearTerms(self.ev.base_features(t, split), jvps, t.split(split)[1], self.ev.head_fn(t))
        return self._terms[key]

    def predictions(
        self, task: str, split: str, alphas: Sequence[float], which: Sequence[int] | None = None
    ) -> Tensor:
        """Top-1 predictions [N] of theta0 + sum_i alphas[i] * tau_{which[i]} (default: all vectors)."""
        which = list(range(len(self.vectors))) if which is None else list(which)
        if len(alphas) != len(which):
            raise ValueError(f"{len(alphas)} coefficients for {len(which)} vectors")
        key = (task, split, tuple(which), tuple(float(a) for a in alphas))
        if key not in self._preds:
            self._preds[key] = self._logits(task, split, alphas, which).argmax(dim=-1)
        return self._preds[key]

    def _logits(self, task: str, split: str, alphas: Sequence[float], which: list[int]) -> Tensor:
        if all(a == 0 for a in alphas):
            return self.ev.logits(self.task(task), split)
        if self.linear:
            return self.terms(task, split, which).logits(alphas)
        params = self.ev.edited([self.vectors[i].tensors for i in which], alphas)
        return self.ev.logits(self.task(task), split, params)

    def accuracy(
        self, task: str, split: str, alphas: Sequence[float], which: Sequence[int] | None = None
    ) -> float:
        preds = self.predictions(task, split, alphas, which)
        labels = self.task(task).split(split)[1]
        return float((preds == labels).float().mean())

    def perplexity(self, task: str, split: str, alphas: Sequence[float], which: Sequence[int] | None = None) -> tuple[float, float, int]:
        """(perplexity, summed NLL, tokens) of theta0 + sum_i alphas[i] * tau_{which[i]} on a
        plain-text task: exp(NLL / tokens). Not under f_lin (a perplexity of f_lin is not defined here)."""
        import math

        if self.linear:
            raise UsageError("--metric perplexity does not apply under f_lin (linearized vectors or --linearize)")
        which = list(range(len(self.vectors))) if which is None else list(which)
        params = self.ev.edited([self.vectors[i].tensors for i in which], alphas) if any(a != 0 for a in alphas) else None
        nll, tokens = self.ev.nll(self.task(task), split, params)
        return (math.exp(nll / tokens) if tokens else float("nan")), nll, tokens

    def shared(
        self, task: str, split: str, alpha: float, which: Sequence[int] | None = None
    ) -> float:
        """Accuracy of theta0 + alpha * sum_i tau_i (one shared coefficient)."""
        which = list(range(len(self.vectors))) if which is None else list(which)
        return self.accuracy(task, split, [alpha] * len(which), which)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def load_vector(
    path: Path,
    base_sha: str | None,
    base_tensors: Mapping[str, Tensor] | None = None,
    allow_base_mismatch: bool = False,
) -> LoadedVector:
    """Read a task vector (or a fine-tuned checkpoint, extracted against ``base_tensors``) as float32."""
    from tvedit.reader import open_checkpoint

    ckpt = open_checkpoint(path)
    m = ckpt.manifest
    if ckpt.kind == "mask":
        raise InputError(
            f"{path}: is a mask, not a task vector (apply it first: tvedit mask --apply)"
        )
    if ckpt.kind == "task-vector":
        if m and m.base and base_sha and m.base.get("sha256") != base_sha and not allow_base_mismatch:
            raise MismatchError(
                f"{path}: was extracted from base {str(m.base.get('sha256'))[:12]}, not the base {base_sha[:12]} given (use --allow-mismatch base to evaluate it anyway)"
            )
        tensors = {k: t.float() for k, t in ckpt.items() if t.is_floating_point()}
    else:
        if base_tensors is None:
            raise UsageError(f"{path}: is a checkpoint; pass --base to evaluate it as an edit")
        tensors = {}
        for k, t in ckpt.items():
            if t.is_floating_point():
                if k not in base_tensors:
                    raise MismatchError(f"{path}: key {k!r} is not in the base")
                tensors[k] = t.float() - base_tensors[k].float()
    tensors = {k: t for k, t in tensors.items() if bool(t.any())}  # all-zero tensors change nothing
    density = _density(m) if m else None
    name = (m.task or {}).get("name") if m and m.task else None
    stem = path.name.removesuffix(".safetensors")
    return LoadedVector(
        path,
        str(name or stem),
        tensors,
        regime=m.regime if m else "nonlinear",
        density=density,
        task=m.task if m else None,
        flin=recorded_flin(m.provenance) if m else set(),
    )


def _density(m: Any) -> float | None:
    """The density a sparse vector was made at: the latest step that sparsified it (a ``sparse``
    fine-tuning run — the density of its mask, a ``--mask`` file's included —, a masking step with a
    ``density`` parameter, or ``mask apply`` with the mask file's ``mask_density``). None: no widening. (The
    manifest's stored ``density`` is not used: a full fine-tuning vector is mostly zeros too,
    because the frozen text tower is part of it.)"""
    for step in reversed(m.provenance or []):
        params = step.get("params") or {}
        d = params.get("density", params.get("mask_density"))
        if step.get("op") == "finetune":
            return (
                float(d) if params.get("mode") == "sparse" and isinstance(d, int | float) else None
            )
        if isinstance(d, int | float) and 0 < d < 1:
            return float(d)
    return None


def open_base(path: Path) -> tuple[ModelAdapter, dict[str, Tensor], str]:
    """theta0's adapter, tensors (read once) and content hash."""
    from tvedit.reader import open_checkpoint

    ckpt = open_checkpoint(path)
    if ckpt.kind != "checkpoint":
        raise InputError(f"{path}: the base must be a checkpoint, not a {ckpt.kind}")
    if ckpt.manifest is None or ckpt.manifest.family in ("hf", "unknown"):
        # a Hugging Face directory (e.g. add ... -o merged/ of HF directories): its config says the family
        from tvedit import hfdir

        root = hfdir.hf_root(path) or hfdir.recorded_source(ckpt.manifest)
        if root is not None:
            from tvedit.models.hf_seq2seq import directory_adapter

            return directory_adapter(root), dict(ckpt.items()), ckpt.sha256
    if ckpt.manifest is None:
        raise InputError(
            f"{path}: has no tvedit manifest, so its model family is unknown (run tvedit init or tvedit import)"
        )
    adapter = adapter_for(ckpt.manifest.model)
    return adapter, dict(ckpt.items()), ckpt.sha256
