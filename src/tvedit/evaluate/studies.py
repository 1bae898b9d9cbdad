"""The protocols run against a ``Session``: fill the tables, let ``protocols`` choose, report.

Each function returns a JSON-able dict; the CLI prints it and writes it with ``--report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tvedit.errors import UsageError
from tvedit.evaluate import protocols as P
from tvedit.evaluate.runner import Session


def vector_tasks(session: Session, task_names: Sequence[str], which: Sequence[int] | None = None) -> list[str]:
    """The task each vector (of ``which``, default all) belongs to: its manifest task name when that
    is one of the tasks, otherwise the task at the same position."""
    out = []
    indices = range(len(session.vectors)) if which is None else which
    for i, vec in enumerate(session.vectors[j] for j in indices):
        if vec.name in task_names:
            out.append(vec.name)
        elif i < len(task_names):
            out.append(task_names[i])
        else:
            raise UsageError(
                f"{vec.path}: cannot tell which task it belongs to (its task {vec.name!r} is not among --task)"
            )
    if len(set(out)) != len(out):
        raise UsageError(f"two vectors belong to the same task: {out}")
    return out


def widen(session: Session) -> float:
    """1/k for sparse vectors (the smallest density among them), else 1."""
    densities = [v.density for v in session.vectors if v.density]
    return 1.0 / min(densities) if densities else 1.0


def plain(session: Session, alphas: Sequence[float], split: str = "test") -> list[dict[str, Any]]:
    """Accuracy of theta0 + alpha * sum tau on every task, one record per (task, alpha)."""
    rows = []
    for alpha in alphas:
        for name in session.tasks:
            acc = (
                session.shared(name, split, alpha)
                if session.vectors
                else session.accuracy(name, split, [], [])
            )
            rows.append(
                {
                    "task": name,
                    "alpha": alpha,
                    "split": split,
                    "accuracy": acc,
                    "n": len(session.task(name).split(split)[1]),
                }
            )
    return rows


def perplexity(session: Session, alphas: Sequence[float], split: str = "test") -> list[dict[str, Any]]:
    """Perplexity of theta0 + alpha * sum tau on every plain-text task, one record per (task, alpha)."""
    rows = []
    for alpha in alphas:
        for name in session.tasks:
            which = list(range(len(session.vectors)))
            ppl, nll, tokens = session.perplexity(name, split, [alpha] * len(which), which)
            rows.append({"task": name, "alpha": alpha, "split": split, "perplexity": ppl, "nll": nll, "tokens": tokens, "n": len(session.task(name).split(split)[1])})
    return rows


def addition(session: Session, grid: Sequence[float], merged: int | None = None) -> dict[str, Any]:
    """Task addition (ALGORITHMS.md section 5): theta0 + alpha * sum_t tau_t, alpha chosen on validation.

    ``merged``: the index of a vector that is already a merge of the task vectors (``tvedit add
    --method ties --emit vector``); the edit is then theta0 + alpha * merged, while the other vectors,
    one per task, give the single-task accuracies that normalise it."""
    names = list(session.tasks)
    singles = [i for i in range(len(session.vectors)) if i != merged]
    if merged is not None and not 0 <= merged < len(session.vectors):
        raise UsageError(f"merged vector index {merged} out of range")
    owners = vector_tasks(session, names, singles)
    if sorted(owners) != sorted(names):
        raise UsageError(
            f"task addition needs one vector per task: tasks {names}, vectors for {owners}"
        )
    which = singles if merged is None else [merged]
    edit = {t: singles[owners.index(t)] for t in names}

    def shared(t: str, split: str, a: float) -> float:
        return session.shared(t, split, a, which)

    zero = {t: session.accuracy(t, "test", [], []) for t in names}
    single_val = {t: session.accuracy(t, "val", [1.0], [edit[t]]) for t in names}
    single_test = {t: session.accuracy(t, "test", [1.0], [edit[t]]) for t in names}
    val = {a: {t: shared(t, "val", a) for t in names} for a in grid}
    choice = P.choose_addition_alpha(val, single_val)
    test = {choice.alpha: {t: shared(t, "test", choice.alpha) for t in names}}
    summary = P.addition_summary(choice, test, zero, single_test)
    return {
        "protocol": "addition",
        "linear": session.linear, "bf16": session.ev.autocast,
        "grid": list(grid),
        "choice": choice.to_dict(),
        "merged_vector": None if merged is None else str(session.vectors[merged].path),
        "val": {"merged": val[choice.alpha], "single": single_val, "merged_mean": P.mean(val[choice.alpha])},
        **summary.to_dict(),
    }


def negation(
    session: Session, control: str, grid: Sequence[float], threshold: float = 0.95
) -> dict[str, Any]:
    """Task negation: per target, theta0 - alpha tau_t; control accuracy must stay >= threshold x zero-shot."""
    names = [t for t in session.tasks if t != control]
    owners = vector_tasks(session, names)
    control_zero_val = session.accuracy(control, "val", [], [])
    control_zero_test = session.accuracy(control, "test", [], [])
    rows = []
    for i, target in enumerate(owners):
        target_val = {a: session.accuracy(target, "val", [-a], [i]) for a in grid}
        control_val = {a: session.accuracy(control, "val", [-a], [i]) for a in grid}
        choice = P.choose_negation_alpha(target_val, control_val, control_zero_val, threshold)
        rows.append({
            "target": target,
            "alpha": choice.alpha,
            "feasible": choice.feasible,
            "target_zero_shot": session.accuracy(target, "test", [], []),
            "target_finetuned": session.accuracy(target, "test", [1.0], [i]),
            "target_test": session.accuracy(target, "test", [-choice.alpha], [i]),
            "control_test": session.accuracy(control, "test", [-choice.alpha], [i]),
            "target_val": choice.target_val,
            "control_val": choice.control_val,
        })  # fmt: skip
    mean = {
        k: P.mean([r[k] for r in rows]) for k in ("target_zero_shot", "target_test", "control_test")
    }
    return {
        "protocol": "negation", "linear": session.linear, "bf16": session.ev.autocast, "grid": list(grid), "control": control,
        "threshold": threshold, "control_zero_shot": control_zero_test, "control_zero_shot_val": control_zero_val,
        "targets": rows, "mean": mean,
    }  # fmt: skip


def disentanglement(session: Session, grid: Sequence[float], points: int = 2048) -> dict[str, Any]:
    """xi(alpha1, alpha2) over grid x grid for the first two vectors, on up to ``points`` test points per task."""
    if len(session.vectors) != 2:
        raise UsageError(
            f"weight disentanglement takes exactly two task vectors, not {len(session.vectors)}"
        )
    owners = vector_tasks(session, list(session.tasks))
    for t in owners:
        session.task(t).limit("test", points)
    singles, joints = [], []
    for k, t in enumerate(owners):
        singles.append(torch.stack([session.predictions(t, "test", [a], [k]) for a in grid]))
        joints.append(
            torch.stack(
                [
                    torch.stack([session.predictions(t, "test", [a1, a2], [0, 1]) for a2 in grid])
                    for a1 in grid
                ]
            )
        )
    terms = P.disentanglement_terms(singles, joints)
    return {
        "protocol": "disentanglement", "linear": session.linear, "bf16": session.ev.autocast, "tasks": owners, "grid": list(grid),
        "points": [int(s.shape[-1]) for s in singles], "xi": terms.sum(dim=0).tolist(), "terms": terms.tolist(),
    }  # fmt: skip
