"""The model adapter interface: one small class per model family, found by ``model.family``.

An adapter knows how to rebuild a model from the manifest's ``model`` record and a state dict,
which tensors each fine-tuning regime trains, which tensors TaLoS may mask, how to build the frozen
per-task head, and how to score a batch. Everything else (the training loop, evaluation, the
linearization f_lin) is written once against this interface. See docs/adapters.md.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tvedit.errors import InputError, MismatchError, UsageError

MODES = ("full", "attn", "linearized", "sparse")  # fine-tuning regimes (ALGORITHMS.md section 2)


class ModelAdapter(ABC):
    """A model family. Instances are cheap and hold only the (JSON-able) architecture config."""

    family: ClassVar[str]

    # -- identity ------------------------------------------------------------------------------
    @abstractmethod
    def model_info(self) -> dict[str, Any]:
        """The manifest's ``model`` record: ``family``, ``architecture`` and the full config, so that
        ``from_model_info(model_info())`` rebuilds the same architecture without any other file."""

    @classmethod
    @abstractmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> ModelAdapter:
        """The inverse of :meth:`model_info`."""

    # -- building --------------------------------------------------------------------------------
    @abstractmethod
    def build(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        """The whole model (eval mode, float32, CPU). ``state`` is loaded strictly: a missing,
        unexpected or mis-shaped key raises MismatchError naming the key. ``None``: random init
        (seed it with torch.manual_seed before calling)."""

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors saved in a checkpoint (default: ``model.state_dict()``, detached, CPU)."""
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    # -- which tensors train -----------------------------------------------------------------------
    @abstractmethod
    def trainable_keys(self, mode: str, *, attn_bias: bool = False) -> list[str]:
        """Parameter names trained in ``mode`` (full | attn | linearized; sparse trains a subset of
        :meth:`maskable_keys`). Sorted."""

    @abstractmethod
    def maskable_keys(self) -> list[str]:
        """Parameter names TaLoS may mask (ALGORITHMS.md section 3). Sorted."""

    # -- task head and scoring -----------------------------------------------------------------------
    @abstractmethod
    def make_head(self, model: nn.Module, task: Mapping[str, Any]) -> Any:
        """The frozen per-task classifier, built from ``model`` (pass the PRE-TRAINED model).
        ``task`` is the manifest's ``task`` record (CLIP: ``classes``, ``templates``; seq2seq: its
        ``choices``). The result holds no autograd graph."""

    @abstractmethod
    def scores(self, model: nn.Module, inputs: Any, head: Any) -> Tensor:
        """Logits ``[B, n_classes]`` for a batch of inputs. Must be a pure function of the model's
        parameters so that it works under ``torch.func.functional_call`` / ``jvp`` / ``vmap``.
        Equal to ``head_logits(features(model, inputs, head), head)``."""

    def features(self, model: nn.Module, inputs: Any, head: Any) -> Tensor:
        """The part of the forward that f_lin linearizes (ALGORITHMS.md section 2): f_lin is
        ``head_logits(features(theta0) + J features(theta0) (theta - theta0), head)``. Default:
        the scores themselves (``head_logits`` the identity). CLIP overrides it with the image
        encoder's output before normalisation, as the tangent-space paper linearizes it."""
        return self.scores(model, inputs, head)

    def head_logits(self, features: Tensor, head: Any) -> Tensor:
        """The logits from :meth:`features` (not linearized). Default: the identity."""
        return features

    # The definition of f_lin this adapter trains and evaluates, recorded in the manifests of
    # linearized vectors (``finetune`` params ``flin``): a vector trained under another definition
    # is refused at evaluation. "scores": the whole scores are linearized.
    flin: ClassVar[str] = "scores"

    def loss(self, scores: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The training loss of a batch, SUMMED over its examples (the loop divides by the batch).
        Default: cross-entropy of the scores (classification); seq2seq: the target's NLL."""
        return torch.nn.functional.cross_entropy(scores.float(), labels, label_smoothing=label_smoothing, reduction="sum")

    # -- optional hooks ------------------------------------------------------------------------------
    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        """Trade compute for memory during training (no-op where unsupported)."""
        return None

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules ``finetune --sharding fsdp`` shards, innermost first (transformer blocks); the
        last one is the outermost, whose forward the scores run through, and must hold every tensor
        that trains. Default: the whole model as one unit."""
        return [model]

    def describe(self) -> str:
        return f"{self.family}:{self.model_info().get('architecture', '?')}"


# ------------------------------------------------------------------------------------------------
# registry: family -> adapter class (modules are imported lazily, on first use)
# ------------------------------------------------------------------------------------------------
ADAPTER_MODULES: dict[str, str] = {
    "open_clip": "tvedit.models.open_clip",
    "hf-seq2seq": "tvedit.models.hf_seq2seq",
    "hf-causal": "tvedit.models.hf_causal",
}
_ADAPTERS: dict[str, type[ModelAdapter]] = {}



def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` the adapter of ``cls.family``."""
    _ADAPTERS[cls.family] = cls
    return cls


def adapter_class(family: str) -> type[ModelAdapter]:
    if family not in _ADAPTERS and family in ADAPTER_MODULES:
        importlib.import_module(ADAPTER_MODULES[family])
    if family not in _ADAPTERS:
        if family in ("unknown", ""):
            raise InputError("the checkpoint's manifest records no model family; pass --model (or run tvedit init)")
        raise MismatchError(f"unknown model family {family!r} (known: {', '.join(sorted(ADAPTER_MODULES))})")
    return _ADAPTERS[family]


def adapter_for(model_info: Mapping[str, Any]) -> ModelAdapter:
    """The adapter for a manifest ``model`` record (``{"family": ..., ...}``)."""
    if not isinstance(model_info, Mapping):
        raise InputError("model info must be a mapping with a 'family' key")
    return adapter_class(str(model_info.get("family", "unknown"))).from_model_info(model_info)


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
def pick_device(name: str = "auto", rank: int = 0) -> torch.device:
    """``--device``: auto (CUDA when available, GPU ``rank`` mod the GPU count; else CPU), cpu,
    cuda, cuda:N. A name torch does not know, or CUDA on a machine without it, is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def check_fits(own: Mapping[str, Tensor], state: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """``state`` has exactly the keys of ``own``, with the same shapes; else one clear MismatchError
    naming the first offending key."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise MismatchError(f"{where}: key {missing[0]!r} required by the architecture is missing ({len(missing)} missing)")
    if unexpected:
        raise MismatchError(f"{where}: key {unexpected[0]!r} does not belong to the architecture ({len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise MismatchError(f"{where}: key {k!r}: shape {list(state[k].shape)} does not fit the architecture's {list(v.shape)}")


def load_strict(model: nn.Module, state: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """load_state_dict(strict) with one clear MismatchError naming the first offending key."""
    own = model.state_dict()
    check_fits(own, state, where)
    model.load_state_dict({k: state[k].to(v.dtype) if v.is_floating_point() else state[k] for k, v in own.items()}, strict=True)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


@contextmanager
def forward_ad_safe() -> Iterator[None]:
    """Disable the fused attention paths, which have no forward-mode AD (ALGORITHMS.md section 2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


class _Call(nn.Module):
    """Wraps ``fn(model)`` as a module so torch.func.functional_call can reparametrise ``model``."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module], Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self) -> Tensor:
        return self.fn(self.model)


def functional(model: nn.Module, params: Mapping[str, Tensor], fn: Callable[[nn.Module], Tensor]) -> Tensor:
    """``fn(model)`` with ``params`` (a subset of the model's parameter names) substituted."""
    from torch.func import functional_call

    return functional_call(_Call(model, fn), {f"model.{k}": v for k, v in params.items()}, ())


class _AtTheta0(torch.autograd.Function):
    """``theta0`` as the value, the identity as the derivative with respect to ``theta``: the point
    at which f is evaluated is θ0, and the gradient reaching it is credited to θ."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, theta0: Tensor) -> Tensor:  # noqa: ARG004
        return theta0.view_as(theta0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


def linearized(
    model: nn.Module,
    theta0: Mapping[str, Tensor],
    theta: Mapping[str, Tensor],
    fn: Callable[[nn.Module], Tensor],
) -> Tensor:
    """f_lin(theta) = f(theta0) + J_theta f(theta0) (theta - theta0), in ONE forward-mode pass.

    ``fn(model)`` computes the output (e.g. ``lambda m: adapter.scores(m, x, head)``); ``theta0``
    and ``theta`` map the same parameter names (the linearized ones) to tensors; every other
    parameter keeps the model's value. Differentiable with respect to ``theta``, so it trains with
    an ordinary optimizer on ``theta``.

    How: one forward pass with dual tensors (torch.autograd.forward_ad) gives f(theta0) (primal)
    and J (theta - theta0) (tangent) together. The gradient of f_lin with respect to theta is
    J(theta0)^T g, the vector-Jacobian product of f at theta0 — an ordinary backward pass through
    the PRIMAL computation. So the primal is evaluated at a point whose value is theta0 but whose
    derivative is credited to theta (``_AtTheta0``), and the tangent joins the output detached:
    value f0 + J delta, first derivative in theta J(theta0), exactly those of f_lin. Backpropagating
    through the tangent computation instead (reverse over forward) gives the same gradient at about
    twice the cost (docs/performance.md). First derivatives only: other inputs of ``fn`` that
    require grad receive the gradient of f(theta0) without the J delta term, and second
    derivatives in theta are not those of f_lin (which are zero).
    """
    import torch.autograd.forward_ad as fwAD

    names = sorted(theta0)
    grad = torch.is_grad_enabled()
    with forward_ad_safe(), fwAD.dual_level():
        params = {}
        for k in names:
            base = theta0[k].detach()
            point = _AtTheta0.apply(theta[k], base) if grad and theta[k].requires_grad else base
            params[k] = fwAD.make_dual(point, (theta[k].detach() - base).to(base.dtype))
        primal, tangent = fwAD.unpack_dual(functional(model, params, fn))
        return primal if tangent is None else primal + tangent.detach()


def linearized_reference(
    model: nn.Module,
    theta0: Mapping[str, Tensor],
    theta: Mapping[str, Tensor],
    fn: Callable[[nn.Module], Tensor],
) -> Tensor:
    """f_lin by its definition: one torch.func.jvp (primal theta0, tangent theta - theta0),
    differentiable in theta by reverse over forward (backpropagating through the tangent
    computation). The slower reference that the tests and benchmarks/profile_finetune.py compare
    ``linearized`` against; exact in every input and to every order."""
    from torch.func import jvp

    names = sorted(theta0)
    primals = tuple(theta0[k].detach() for k in names)
    tangents = tuple(theta[k] - theta0[k].detach() for k in names)

    def f(*values: Tensor) -> Tensor:
        return functional(model, dict(zip(names, values, strict=True)), fn)

    with forward_ad_safe():
        out, jvp_out = jvp(f, primals, tangents)
    return out + jvp_out
