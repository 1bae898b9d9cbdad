"""Checks of user-given numbers shared by the CLI and the library (no torch: imported at startup).

Every float a user gives (an option, a recipe value, a ``--option KEY=VALUE``) goes through
``finite_number``: NaN and infinities are usage errors (exit 2) before any file is read, instead
of a NaN result (exit 5) after all the work.
"""

from __future__ import annotations

import math

from tvedit.errors import UsageError


def number_problem(value: object) -> str | None:
    """Why ``value`` (a number or its text) is not a finite number, or None when it is one."""
    if isinstance(value, bool):
        return f"{value!r} is not a number"
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"{value!r} is not a number"
    return None if math.isfinite(x) else f"{value!r} is not a finite number"


def finite_number(value: object, name: str, *, minimum: float | None = None) -> float:
    """``value`` (a number or its text) as a finite float, at least ``minimum`` when given; else a
    one-line UsageError naming ``name`` (an option, or a recipe file and key)."""
    problem = number_problem(value)
    if problem is not None:
        raise UsageError(f"{name}: {problem}")
    x = float(value)  # type: ignore[arg-type]
    if minimum is not None and x < minimum:
        raise UsageError(f"{name}: {value!r} must be >= {minimum:g}")
    return x
