"""Import a heavy module on first use, so that commands which never touch it start fast.

``torch = lazy("torch", globals())`` binds a stand-in; the first attribute access imports the module
and rebinds the global name to it, so later accesses cost nothing extra."""

from __future__ import annotations

import importlib
from typing import Any


class _Lazy:
    __slots__ = ("_name", "_namespace", "_binding")

    def __init__(self, name: str, namespace: dict[str, Any], binding: str) -> None:
        self._name, self._namespace, self._binding = name, namespace, binding

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        if self._namespace.get(self._binding) is self:
            self._namespace[self._binding] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str, namespace: dict[str, Any], binding: str | None = None) -> Any:
    """A stand-in for module ``name``, bound in ``namespace`` as ``binding`` (default: its last part)."""
    return _Lazy(name, namespace, binding or name.rsplit(".", 1)[-1])
