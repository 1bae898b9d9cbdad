"""The open_clip adapter: CLIP image encoders fine-tuned behind a frozen zero-shot text head."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tvedit.errors import InputError, MismatchError, UsageError
from tvedit.models.base import ModelAdapter, load_strict, register_adapter

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_ATTN = re.compile(r"^visual\.transformer\.resblocks\.\d+\.attn\.(in_proj_weight|out_proj\.weight)$")
_ATTN_BIAS = re.compile(r"^visual\.transformer\.resblocks\.\d+\.attn\.(in_proj_bias|out_proj\.bias)$")
_NEVER_MASKED = ("visual.class_embedding", "visual.positional_embedding", "visual.proj")


def _image_size(cfg: Mapping[str, Any]) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@register_adapter
class OpenClipAdapter(ModelAdapter):
    family = "open_clip"

    def __init__(self, architecture: str, config: Mapping[str, Any], mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD):
        for field in ("embed_dim", "vision_cfg", "text_cfg"):
            if field not in config:
                raise UsageError(f"model config {architecture!r} lacks {field!r} (open_clip format: embed_dim, vision_cfg, text_cfg)")
        self.architecture = architecture
        self.config = json.loads(json.dumps(dict(config)))  # a JSON-able deep copy
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self._keys: tuple[list[str], dict[str, tuple[int, ...]]] | None = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, model: str) -> OpenClipAdapter:
        """An open_clip model name (``ViT-B-32``) or a path to a model-config JSON in open_clip's format."""
        path = Path(model)
        if model.endswith(".json") or path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UsageError(f"--model {model}: not a readable model-config JSON: {exc}") from None
            if not isinstance(cfg, dict):
                raise UsageError(f"--model {model}: the JSON is not an object")
            cfg = cfg.get("model_cfg", cfg)  # accept open_clip_config.json too
            pre = cfg.pop("preprocess_cfg", {}) if isinstance(cfg, dict) else {}
            return cls(path.stem, cfg, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD))
        import open_clip

        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise UsageError(f"--model: unknown open_clip model {model!r} (see open_clip.list_models(), or pass a config JSON)")
        return cls(model, cfg)

    def model_info(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "architecture": self.architecture,
            "config": copy.deepcopy(self.config),
            "image_size": _image_size(self.config),
            "mean": list(self.mean),
            "std": list(self.std),
            "context_length": int(self.config["text_cfg"].get("context_length", 77)),
        }

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> OpenClipAdapter:
        if "config" not in info:
            raise InputError("open_clip model info lacks 'config'")
        return cls(str(info.get("architecture", "custom")), info["config"], info.get("mean", OPENAI_MEAN), info.get("std", OPENAI_STD))

    def build(self, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        from open_clip.model import CLIP, CustomTextCLIP

        cfg = copy.deepcopy(self.config)
        custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
        try:
            model = (CustomTextCLIP if custom else CLIP)(**cfg)
        except TypeError as exc:
            raise UsageError(f"model config {self.architecture!r} is not a valid open_clip config: {exc}") from None
        if state is not None:
            load_strict(model, state, f"{self.architecture} weights")
        return model.eval()

    # -- keys ---------------------------------------------------------------------------------------
    def _param_shapes(self) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        if self._keys is None:
            with torch.device("meta"):
                model = self.build()
            shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
            self._keys = (sorted(shapes), shapes)
        return self._keys

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._param_shapes()[1])

    def trainable_keys(self, mode: str, *, attn_bias: bool = False) -> list[str]:
        names = self._param_shapes()[0]
        if mode in ("full", "linearized"):
            return [k for k in names if k.startswith("visual.")]
        if mode == "attn":
            keys = [k for k in names if _ATTN.match(k) or (attn_bias and _ATTN_BIAS.match(k))]
            if not keys:
                raise MismatchError(f"--mode attn trains the attention projections of a ViT image tower (visual.transformer.resblocks.*.attn); {self.architecture}'s tower has none")
            return keys
        if mode == "sparse":
            return self.maskable_keys()
        raise UsageError(f"unknown fine-tuning mode {mode!r}")

    def maskable_keys(self) -> list[str]:
        names = self._param_shapes()[0]
        return [k for k in names if k.startswith("visual.") and k not in _NEVER_MASKED]

    # -- head and scores ------------------------------------------------------------------------------
    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        import open_clip

        ctx = int(self.config["text_cfg"].get("context_length", 77))
        hf_name = self.config["text_cfg"].get("hf_tokenizer_name")
        if hf_name:
            return open_clip.HFTokenizer(hf_name, context_length=ctx)
        return open_clip.SimpleTokenizer(context_length=ctx)

    @torch.no_grad()
    def make_head(self, model: nn.Module, task: Mapping[str, Any]) -> Tensor:
        """[n_classes, D] zero-shot weights times exp(logit_scale), from model's text encoder."""
        classes, templates = list(task["classes"]), list(task.get("templates") or ["a photo of a {}."])
        tokenize = self.tokenizer()
        device = next(model.parameters()).device
        rows = []
        for name in classes:
            tokens = tokenize([t.replace("{}", name) for t in templates]).to(device)
            emb = model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
        head = torch.stack(rows) * model.logit_scale.exp().float()
        return head.detach()

    # f_lin linearizes the image encoder and normalises its output afterwards (the tangent-space
    # paper's appendix); vectors trained under the older definition (normalise, inner product,
    # then linearize: "scores") are refused at evaluation.
    flin = "features"

    def features(self, model: nn.Module, inputs: Tensor, head: Tensor | None = None) -> Tensor:
        """``[B, D]``: the image encoder's output (after ``proj``), before normalisation."""
        return model.encode_image(inputs)

    def head_logits(self, features: Tensor, head: Tensor) -> Tensor:
        """L2-normalise the image features, then the inner product with the (scaled) text head."""
        feats = features / features.norm(dim=-1, keepdim=True)
        return feats @ head.to(feats.dtype).T

    def scores(self, model: nn.Module, inputs: Tensor, head: Tensor) -> Tensor:
        return self.head_logits(self.features(model, inputs, head), head)

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        model.visual.set_grad_checkpointing(enable)  # type: ignore[operator]

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The image tower's residual blocks (a ViT's ``visual.transformer.resblocks``), then the tower:
        everything that trains is in it; the text tower (which made the frozen head) and the scalar
        ``logit_scale`` stay whole."""
        blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
        return [*(blocks if blocks is not None else []), model.visual]

    # -- data transforms ------------------------------------------------------------------------------
    def transform(self, train: bool) -> Callable[[Any], Tensor]:
        from torchvision import transforms as T

        size = _image_size(self.config)
        bicubic = T.InterpolationMode.BICUBIC
        norm = T.Normalize(self.mean, self.std)
        rgb = T.Lambda(lambda im: im.convert("RGB"))
        if train:
            return T.Compose([rgb, T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic), T.ToTensor(), norm])
        return T.Compose([rgb, T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(), norm])


# ----------------------------------------------------------------------------------------------------
# theta0: from an open_clip tag, a local file, or a seeded random init
# ----------------------------------------------------------------------------------------------------
def load_pretrained(adapter: OpenClipAdapter | None, pretrained: str, seed: int = 0) -> tuple[OpenClipAdapter, dict[str, Tensor], dict[str, Any]]:
    """(adapter, state, source record). ``pretrained``: ``none`` (random init with ``seed``), a path
    (safetensors with or without a tvedit manifest, or an open_clip .pt/.bin file), or an open_clip tag."""
    path = Path(pretrained)
    if pretrained == "none":
        if adapter is None:
            raise UsageError("--pretrained none needs --model")
        torch.manual_seed(seed)
        model = adapter.build()
        return adapter, adapter.state_dict(model), {"pretrained": "none", "seed": seed}
    if path.exists():
        if path.suffix == ".safetensors" or path.is_dir():
            from tvedit.reader import load_tensors

            state, manifest = load_tensors(path)
            if manifest is not None and manifest.kind != "checkpoint":
                raise InputError(f"{path}: is a {manifest.kind}, not a checkpoint")
            if manifest is not None and manifest.family != "unknown":
                if manifest.family != OpenClipAdapter.family:
                    raise MismatchError(f"{path}: is a {manifest.family} checkpoint, not open_clip")
                recorded = OpenClipAdapter.from_model_info(manifest.model)
                if adapter is not None and adapter.config != recorded.config:
                    raise MismatchError(f"{path}: its manifest records architecture {recorded.architecture!r}, which differs from --model {adapter.architecture!r}")
                adapter = recorded
        else:
            from open_clip import load_state_dict

            try:
                state = load_state_dict(str(path), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any loader failure is an input error
                raise InputError(f"{path}: not a readable open_clip checkpoint: {exc}") from None
        if adapter is None:
            raise UsageError(f"{path}: records no model; pass --model")
        adapter.build(state)  # strict: a key that does not fit raises MismatchError now
        return adapter, {k: v.detach().contiguous() for k, v in state.items()}, {"pretrained": str(path)}
    if adapter is None:
        raise UsageError(f"--pretrained {pretrained!r}: not a file; an open_clip tag needs --model")
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(adapter.architecture)
    if pretrained not in tags:
        raise UsageError(f"--pretrained {pretrained!r}: neither a file nor an open_clip tag of {adapter.architecture} (tags: {', '.join(tags) or 'none'})")
    pcfg = open_clip.get_pretrained_cfg(adapter.architecture, pretrained)
    quick = bool(pcfg.get("quick_gelu", False))
    model = open_clip.create_model(adapter.architecture, pretrained=pretrained, force_quick_gelu=quick)
    cfg = dict(adapter.config, quick_gelu=quick) if quick else adapter.config
    adapter = OpenClipAdapter(adapter.architecture, cfg, pcfg.get("mean", OPENAI_MEAN), pcfg.get("std", OPENAI_STD))
    return adapter, adapter.state_dict(model), {"pretrained": pretrained}
