"""The evaluation protocols as pure functions (ALGORITHMS.md section 5).

Nothing here touches a model: every function takes tables of numbers (accuracies keyed by alpha
and task) or prediction tensors and returns a choice. The runner (``evaluate/runner.py``) fills the
tables; tests plant numbers and check the choices.

Conventions
-----------
* An accuracy table is ``{alpha: {task: accuracy}}``.
* Ties are broken towards the smaller |alpha| (the least edit that does the job), then the smaller
  alpha, so every choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tvedit.errors import GateError, UsageError

AccuracyTable = Mapping[float, Mapping[str, float]]


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
def alpha_grid(
    start: float = 0.0, stop: float = 1.0, step: float = 0.05, density: float | None = None
) -> list[float]:
    """{start, start+step, ..., stop}, each multiplied by 1/density for sparse vectors.

    The values are rounded to 10 decimals so that they are usable as dictionary keys and print
    cleanly (0.15000000000000002 -> 0.15).
    """
    if step <= 0:
        raise UsageError(f"alpha step must be positive, not {step}")
    if stop < start:
        raise UsageError(f"alpha grid: stop {stop} < start {start}")
    if density is not None and not 0 < density <= 1:
        raise UsageError(f"density must be in (0, 1], not {density}")
    n = int(round((stop - start) / step))
    widen = 1.0 / density if density else 1.0
    return [round((start + i * step) * widen, 10) for i in range(n + 1)]


def square_grid(lo: float = -3.0, hi: float = 3.0, size: int = 20) -> list[float]:
    """``size`` evenly spaced values over [lo, hi] (the disentanglement axes)."""
    if size < 2:
        raise UsageError(f"grid size must be at least 2, not {size}")
    return [round(lo + (hi - lo) * i / (size - 1), 10) for i in range(size)]


def _tie_key(alpha: float) -> tuple[float, float]:
    return (abs(alpha), alpha)


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a [N, C] score matrix against [N] integer labels."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} score rows for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty split")
    return float((logits.argmax(dim=-1) == labels).float().mean())


def normalized(acc: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """acc(merged, t) / acc(theta0 + tau_t, t) per task (a single-task accuracy of 0 gives 0)."""
    return {t: (acc[t] / single[t] if single[t] > 0 else 0.0) for t in acc}


def mean(values: Mapping[str, float] | Sequence[float]) -> float:
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    return sum(vals) / len(vals) if vals else float("nan")


# --------------------------------------------------------------------------------------------
# task addition
# --------------------------------------------------------------------------------------------
@dataclass
class AdditionChoice:
    alpha: float
    criterion: float  # mean normalised validation accuracy at alpha
    curve: dict[float, float] = field(default_factory=dict)  # alpha -> criterion

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "criterion": self.criterion,
            "curve": {str(a): v for a, v in self.curve.items()},
        }


def choose_addition_alpha(val: AccuracyTable, single_val: Mapping[str, float]) -> AdditionChoice:
    """The alpha that maximises mean_t val[alpha][t] / single_val[t] (ties: smallest |alpha|)."""
    if not val:
        raise UsageError("task addition: empty alpha grid")
    curve = {a: mean(normalized(accs, single_val)) for a, accs in val.items()}
    best = max(sorted(curve, key=_tie_key), key=lambda a: curve[a])  # max keeps the first maximum
    return AdditionChoice(alpha=best, criterion=curve[best], curve=curve)


@dataclass
class AdditionSummary:
    alpha: float
    tasks: list[str]
    zero_shot: dict[str, float]  # test accuracy of theta0
    single: dict[str, float]  # test accuracy of theta0 + tau_t
    merged: dict[str, float]  # test accuracy of theta0 + alpha * sum tau at the chosen alpha
    normalized: dict[str, float]
    val_criterion: float

    @property
    def means(self) -> dict[str, float]:
        return {
            "zero_shot": mean(self.zero_shot),
            "single": mean(self.single),
            "merged": mean(self.merged),
            "normalized": mean(self.normalized),
            "gain": mean(self.merged) - mean(self.zero_shot),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.means}


def addition_summary(
    choice: AdditionChoice,
    test: AccuracyTable,
    zero_shot: Mapping[str, float],
    single_test: Mapping[str, float],
) -> AdditionSummary:
    """Test absolute and normalised accuracy at the chosen alpha, with zero-shot beside it."""
    merged = dict(test[choice.alpha])
    tasks = sorted(merged)
    return AdditionSummary(
        alpha=choice.alpha,
        tasks=tasks,
        zero_shot={t: zero_shot[t] for t in tasks},
        single={t: single_test[t] for t in tasks},
        merged=merged,
        normalized=normalized(merged, single_test),
        val_criterion=choice.criterion,
    )


# --------------------------------------------------------------------------------------------
# task negation
# --------------------------------------------------------------------------------------------
@dataclass
class NegationChoice:
    alpha: float
    target_val: float
    control_val: float
    feasible: bool  # False: no alpha met the control constraint; alpha = 0 (no edit) is returned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_negation_alpha(
    target_val: Mapping[float, float],
    control_val: Mapping[float, float],
    control_zero_shot: float,
    threshold: float = 0.95,
) -> NegationChoice:
    """The alpha minimising target accuracy subject to control >= threshold * control_zero_shot.

    Both tables are keyed by the alpha of theta0 - alpha * tau. If no alpha satisfies the
    constraint, alpha 0 is the answer when it is in the grid (it satisfies the constraint by
    definition when threshold <= 1), else the grid's smallest |alpha|, marked infeasible.
    """
    if not target_val:
        raise UsageError("task negation: empty alpha grid")
    if set(target_val) != set(control_val):
        raise ValueError("target and control tables must cover the same alphas")
    bound = threshold * control_zero_shot
    ok = [a for a in sorted(target_val, key=_tie_key) if control_val[a] >= bound - 1e-12]
    if ok:
        best = min(ok, key=lambda a: target_val[a])  # min keeps the first (smallest |alpha|)
        return NegationChoice(best, target_val[best], control_val[best], True)
    best = min(target_val, key=_tie_key)
    return NegationChoice(best, target_val[best], control_val[best], False)


# --------------------------------------------------------------------------------------------
# weight disentanglement
# --------------------------------------------------------------------------------------------
def disentanglement_terms(
    single: Sequence[torch.Tensor], joint: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per-task disagreement rates, shape [2, G, G]; ``disentanglement_error`` is their sum.

    ``single[t]`` holds task t's predictions under theta0 + alpha tau_t for each grid value:
    shape [G, N_t]. ``joint[t]`` holds its predictions under the joint edit: shape [G, G, N_t],
    indexed [i, j] for (alpha1 = grid[i], alpha2 = grid[j]). Task 1 compares along axis i (its own
    coefficient alpha1), task 2 along axis j. By construction term 1 is 0 where alpha2 = 0, term 2
    where alpha1 = 0, and both at the origin.
    """
    if len(single) != 2 or len(joint) != 2:
        raise ValueError("weight disentanglement compares exactly two tasks")
    s1, s2 = single
    j1, j2 = joint
    g = s1.shape[0]
    if s2.shape[0] != g or j1.shape[:2] != (g, g) or j2.shape[:2] != (g, g):
        raise ValueError("single predictions must be [G, N] and joint ones [G, G, N] on one grid")
    err1 = (j1 != s1[:, None, :]).float().mean(dim=-1)  # alpha1 = grid[i]
    err2 = (j2 != s2[None, :, :]).float().mean(dim=-1)  # alpha2 = grid[j]
    return torch.stack([err1, err2])


def disentanglement_error(
    single: Sequence[torch.Tensor], joint: Sequence[torch.Tensor]
) -> torch.Tensor:
    """xi(alpha1, alpha2) = sum_t mean_x 1(pred(x; theta0 + alpha_t tau_t) != pred(x; theta0 + alpha1 tau1 + alpha2 tau2)), [G, G]."""
    return disentanglement_terms(single, joint).sum(dim=0)


# --------------------------------------------------------------------------------------------
# CI gating
# --------------------------------------------------------------------------------------------
def parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    """['mnist=0.9', ...] -> {'mnist': 0.9}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--min-accuracy expects NAME=VALUE, not {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--min-accuracy {item!r}: {value!r} is not a number") from None
        if not 0 <= out[name] <= 1:
            raise UsageError(f"--min-accuracy {item!r}: thresholds are fractions in [0, 1]")
    return out


def gate_failures(accuracies: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """One message per task below its threshold (a threshold for an unevaluated task is a usage error)."""
    missing = sorted(set(thresholds) - set(accuracies))
    if missing:
        raise UsageError(f"--min-accuracy names task(s) not evaluated: {', '.join(missing)}")
    return [
        f"task {t}: accuracy {accuracies[t]:.4f} is below the threshold {thresholds[t]:.4f}"
        for t in sorted(thresholds)
        if accuracies[t] < thresholds[t]
    ]


def check_gates(accuracies: Mapping[str, float], thresholds: Mapping[str, float]) -> None:
    """Raise GateError (exit code 7) naming the first task that falls short (all in the message)."""
    failures = gate_failures(accuracies, thresholds)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise GateError(failures[0] + more)


def check_ceilings(perplexities: Mapping[str, float], ceilings: Mapping[str, float]) -> None:
    """Raise GateError (exit code 7) naming the first task whose perplexity is above its ceiling
    (NaN fails too); a ceiling for an unevaluated task is a usage error."""
    missing = sorted(set(ceilings) - set(perplexities))
    if missing:
        raise UsageError(f"--max-perplexity names task(s) not evaluated: {', '.join(missing)}")
    failures = [f"task {t}: perplexity {perplexities[t]:.4f} is above the ceiling {ceilings[t]:.4f}" for t in ceilings if not perplexities[t] <= ceilings[t]]
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise GateError(failures[0] + more)
