"""The fine-tuning regimes as small strategies: which tensors train and how logits are computed.

The loop (loop.py) is written once; a regime only answers three questions:
``params`` (what the optimizer updates), ``logits`` (f or f_lin), ``after_backward`` (mask grads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tvedit.errors import MismatchError, UsageError
from tvedit.finetune.sharding import like
from tvedit.models.base import ModelAdapter, linearized


class Regime:
    """``full`` and ``attn``: ordinary training of ``keys``; the rest of the model is frozen."""

    manifest_regime = "nonlinear"

    def __init__(self, adapter: ModelAdapter, model: nn.Module, keys: list[str]):
        self.adapter, self.model = adapter, model
        named = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        self.params: dict[str, nn.Parameter] = {k: named[k] for k in keys}
        for p in self.params.values():
            p.requires_grad_(True)
        self.masks: dict[str, Tensor] | None = None
        # frozen tensors whose gradient still enters the clip norm, and whether clipping comes
        # before after_backward (sparse with clip_scope full; see Sparse)
        self.clip_extra: dict[str, nn.Parameter] = {}
        self.clip_before_mask = False

    def logits(self, inputs: Any, head: Any) -> Tensor:
        return self.adapter.scores(self.model, inputs, head)

    def after_backward(self) -> None:
        """Hook between backward and the optimizer step."""


class Linearized(Regime):
    """f_lin(x; theta) = h(g(x; theta0) + J g(x; theta0)(theta - theta0)); the parameters hold theta.

    g is the adapter's ``features`` (CLIP: the image encoder's output before normalisation) and h
    its ``head_logits`` (normalise, then the inner product with the text head): the encoder is
    linearized, its output normalised afterwards (the tangent-space paper's appendix)."""

    manifest_regime = "linearized"

    def __init__(self, adapter: ModelAdapter, model: nn.Module, keys: list[str]):
        super().__init__(adapter, model, keys)
        self.theta0 = {k: p.detach().clone() for k, p in self.params.items()}

    def logits(self, inputs: Any, head: Any) -> Tensor:
        feats = linearized(self.model, self.theta0, self.params, lambda m: self.adapter.features(m, inputs, head))
        return self.adapter.head_logits(feats, head)


class Sparse(Regime):
    """TaLoS: only the kept entries of the mask train.

    Gradient clipping (``clip_scope``): ``full`` (default, the authors' code) clips by the norm of
    the FULL gradient of every tensor of the mask, pruned entries included, then masks it — tensors
    without a kept entry still compute their weight gradient for that norm, and never move.
    ``kept``: the gradient is masked first and the norm covers only the kept entries; tensors
    without a kept entry are frozen (requires_grad False: their weight gradients are never
    computed), which is cheaper."""

    def __init__(self, adapter: ModelAdapter, model: nn.Module, masks: Mapping[str, Tensor], clip_scope: str = "full"):
        keys = sorted(k for k, m in masks.items() if bool(m.any()))
        super().__init__(adapter, model, keys)
        self.masks = {k: like(masks[k].to(torch.bool), self.params[k]) for k in keys}  # sharded like the parameter under FSDP
        if clip_scope == "full":
            named = dict(model.named_parameters())
            self.clip_extra = {k: named[k] for k in sorted(masks) if k not in self.params}
            for p in self.clip_extra.values():
                p.requires_grad_(True)
            self.clip_before_mask = True

    def after_backward(self) -> None:
        for k, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[k])
        for p in self.clip_extra.values():
            p.grad = None  # only its norm was wanted


def check_mask(adapter: ModelAdapter, masks: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """A stored mask fits the model: its keys are maskable parameters with the right shapes."""
    maskable = set(adapter.maskable_keys())
    shapes = dict(adapter.param_shapes()) if hasattr(adapter, "param_shapes") else {}
    out = {}
    for k, m in masks.items():
        if k not in maskable:
            raise MismatchError(f"{where}: key {k!r} is not a maskable parameter of this model")
        if shapes and tuple(m.shape) != tuple(shapes[k]):
            raise MismatchError(f"{where}: key {k!r}: mask shape {list(m.shape)} does not fit the parameter's {list(shapes[k])}")
        out[k] = m.to(torch.bool)
    if not out:
        raise MismatchError(f"{where}: the mask has no tensor of this model")
    return out


def make_regime(mode: str, adapter: ModelAdapter, model: nn.Module, *, attn_bias: bool = False, masks: Mapping[str, Tensor] | None = None, clip_scope: str = "full") -> Regime:
    if mode in ("full", "attn"):
        return Regime(adapter, model, adapter.trainable_keys(mode, attn_bias=attn_bias))
    if mode == "linearized":
        return Linearized(adapter, model, adapter.trainable_keys(mode))
    if mode == "sparse":
        if masks is None:
            raise UsageError("sparse mode needs a mask (calibrate one, or pass --mask)")
        return Sparse(adapter, model, masks, clip_scope)
    raise UsageError(f"unknown mode {mode!r}")
