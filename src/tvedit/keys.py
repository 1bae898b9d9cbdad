"""Which keys a command touches: fnmatch globs over checkpoint keys (mask, compress, the SVD merges)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KeyFilter:
    """fnmatch globs: a key is selected when it matches some include (or none are given) and no exclude."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    zero_unselected: bool = False  # unselected tensors are zeroed instead of passed through

    def selects(self, key: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(key, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(key, p) for p in self.exclude)

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude or self.zero_unselected)

    def params(self) -> dict[str, Any]:
        return {"include": list(self.include), "exclude": list(self.exclude), "unselected": "zero" if self.zero_unselected else "keep"}
