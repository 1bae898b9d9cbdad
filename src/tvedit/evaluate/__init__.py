"""Evaluation: accuracy, the task-addition / negation / disentanglement protocols, plots.

* ``protocols`` — pure choices over tables of numbers (alpha grids, normalised accuracy, the
  addition and negation rules, xi, gates); no model in sight.
* ``runner`` — the model work: theta0 built once, edits by parameter substitution, heads cached,
  the affine f_lin sweep.
* ``data`` — a task's splits decoded once into tensors.
* ``studies`` — each protocol run against a ``Session``.
* ``plots`` — the disentanglement heatmap and the mask-by-layer figure (matplotlib, extra ``plot``).

Library use::

    from tvedit.evaluate import open_session, studies
    s = open_session(["tau_a.safetensors", "tau_b.safetensors"], {"a": "data/a", "b": "data/b"})
    report = studies.addition(s, protocols.alpha_grid(density=None))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tvedit.errors import MismatchError, UsageError

if TYPE_CHECKING:
    from tvedit.evaluate.runner import Session

PathLike = str | os.PathLike[str]
METRICS = ("acc", "acc_norm", "perplexity")


def open_session(
    inputs: Sequence[PathLike],
    tasks: Mapping[str, PathLike],
    base: PathLike | None = None,
    *,
    linearize: bool = False,
    max_examples: int | None = None,
    batch_size: int = 512,
    force: bool = False,
    device: str = "auto",
    metric: str = "acc",
) -> Session:
    """Everything ``tvedit evaluate`` needs, loaded once.

    ``inputs``: one checkpoint (evaluated as it is, when no ``base`` is given), or task vectors /
    fine-tuned checkpoints evaluated as edits of theta0 (``base``, else the base recorded in the
    vectors). Vectors of regime ``linearized`` are evaluated under f_lin around theta0;
    ``linearize`` applies f_lin to non-linear vectors too (post-hoc linearization). ``metric``:
    ``acc``; ``acc_norm`` (causal LMs: the log-likelihood divided by the choice's length in
    characters); ``perplexity`` (causal LMs: the tasks are plain text, ``Session.perplexity``).
    """
    from tvedit.evaluate.data import load_task
    from tvedit.evaluate.runner import Evaluator, Session, load_vector, open_base
    from tvedit.tensorio import open_checkpoint

    paths = [Path(p) for p in inputs]
    if not paths:
        raise UsageError("evaluate needs a checkpoint or at least one task vector")
    if not tasks:
        raise UsageError("evaluate needs at least one --task NAME=DIR")
    first = open_checkpoint(paths[0])
    as_model = (
        base is None
        and len(paths) == 1
        and first.kind == "checkpoint"
        and (first.manifest is None or first.manifest.regime != "linearized")
    )
    if as_model:
        base_path = paths[0]
    elif base is not None:
        base_path = Path(base)
    else:
        base_path = _recorded_base(paths)
    adapter, theta0, base_sha = open_base(base_path)
    vectors = [] if as_model else [load_vector(p, base_sha, theta0, force=force) for p in paths]
    regimes = {v.regime for v in vectors}
    if len(regimes) > 1 and not linearize:
        raise MismatchError(
            "inputs mix linearized and non-linear vectors; pass --linearize to evaluate all of them under f_lin"
        )
    linear = linearize or "linearized" in regimes
    records = {v.name: v.task for v in vectors if v.task}
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if metric != "acc" and adapter.family != "hf-causal":
        raise UsageError(f"--metric {metric} is for causal language models (hf-causal), not the {adapter.family} family")
    if metric == "perplexity":
        import torch

        from tvedit.data.text import read_texts
        from tvedit.evaluate.runner import TaskData

        task_data = []
        for name, src in tasks.items():
            texts = read_texts(src)
            task_data.append(TaskData(name, {"name": name, "metric": metric}, {"test": (texts, torch.zeros(len(texts), dtype=torch.long))}))
    else:
        task_data = [
            load_task(adapter, name, Path(src), records.get(name), max_examples)
            for name, src in tasks.items()
        ]
        for t in task_data:
            if metric == "acc_norm" and t.record.get("metric") != "exact_match":
                t.record["metric"] = metric
    evaluator = Evaluator(adapter, theta0, batch_size=batch_size, device=device)
    return Session(evaluator, task_data, vectors, linear=linear)


def _recorded_base(paths: Sequence[Path]) -> Path:
    from tvedit.tensorio import open_checkpoint

    for p in paths:
        m = open_checkpoint(p).manifest
        if m and m.base and m.base.get("path"):
            recorded = Path(m.base["path"])
            if recorded.exists():
                return recorded
            raise UsageError(f"{p}: its recorded base {recorded} is not there; pass --base BASE")
    raise UsageError("no base: pass --base BASE (the inputs record none)")
