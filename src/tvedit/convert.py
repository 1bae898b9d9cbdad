"""Import pickled PyTorch checkpoints (.pt/.pth/.bin) into safetensors, safely by default.

``torch.load(weights_only=True)`` refuses to unpickle arbitrary objects (it only rebuilds tensors and
plain containers). Loading a whole pickled ``nn.Module`` (as the task-vector papers' anchors ship)
needs ``trust=True``, which runs arbitrary code from the file: only for files you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from tvedit.errors import InputError
from tvedit.manifest import Manifest
from tvedit.writer import Artifact, save_tensors

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], src: Path) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu().contiguous().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, src)
    elif isinstance(obj, torch.nn.Module):
        _flatten(obj.state_dict(), prefix, out, src)
    elif obj is None or isinstance(obj, (int, float, str, bool)):
        return  # training bookkeeping (epoch, lr, names): not tensors
    else:
        raise InputError(f"{src}: key {prefix!r}: unsupported object {type(obj).__name__} in checkpoint")


def load_pickled_state(src: str | os.PathLike[str], trust: bool = False) -> dict[str, torch.Tensor]:
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "unsafe object"
        raise InputError(f"{src}: refused to unpickle arbitrary objects ({reason}); pass --trust-pickle only if you trust this file") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/zipfile errors for garbage
        raise InputError(f"{src}: not a readable PyTorch checkpoint: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), (dict, torch.nn.Module)):
                obj = obj[key]
                break
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out, src)
    if not out:
        raise InputError(f"{src}: contains no tensors")
    return out


def import_pickle(src: str | os.PathLike[str], output: str | os.PathLike[str], *, trust: bool = False, kind: str = "checkpoint", strip_prefix: str = "", force: bool = False) -> Artifact:
    tensors = load_pickled_state(src, trust)
    if strip_prefix:
        tensors = {(k[len(strip_prefix):] if k.startswith(strip_prefix) else k): v for k, v in tensors.items()}
    manifest = Manifest(kind=kind).with_step("import", {"trust_pickle": trust, "strip_prefix": strip_prefix}, [{"path": str(src), "format": "torch-pickle"}])
    return save_tensors(output, tensors, manifest, force=force, inputs=[Path(src)])
