"""Model adapters: one class per model family behind one interface (see base.py, docs/adapters.md)."""

from tvedit.models.base import MODES, ModelAdapter, adapter_for, linearized, register_adapter

__all__ = ["MODES", "ModelAdapter", "adapter_for", "linearized", "register_adapter"]
