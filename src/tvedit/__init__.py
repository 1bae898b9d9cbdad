"""tvedit: task-vector editing of model checkpoints.

The library does everything the CLI does::

    from tvedit import open_checkpoint, extract, add, scale, negate
"""

from __future__ import annotations

__version__ = "0.1.0"

from tvedit.api import add, extract, negate, scale  # noqa: E402
from tvedit.manifest import Manifest  # noqa: E402
from tvedit.tensorio import open_checkpoint  # noqa: E402

__all__ = ["Manifest", "add", "extract", "negate", "open_checkpoint", "scale", "__version__"]
