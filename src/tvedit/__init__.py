"""tvedit: task-vector editing of model checkpoints.

The library does everything the CLI does::

    from tvedit import open_checkpoint, extract, add, scale, negate
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tvedit.version import __version__

__all__ = ["Manifest", "add", "extract", "negate", "open_checkpoint", "scale", "__version__"]
_WHERE = {"add": "tvedit.arith", "extract": "tvedit.arith", "negate": "tvedit.arith", "scale": "tvedit.arith",
          "Manifest": "tvedit.manifest", "open_checkpoint": "tvedit.reader"}  # fmt: skip

if TYPE_CHECKING:
    from tvedit.arith import add, extract, negate, scale
    from tvedit.manifest import Manifest
    from tvedit.reader import open_checkpoint


def __getattr__(name: str) -> Any:  # imported on first use: `tvedit --help` need not import torch
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tvedit' has no attribute {name!r}")
