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
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tvedit.errors import InputError, MismatchError, UsageError

if TYPE_CHECKING:
    from tvedit.evaluate.runner import Session

PathLike = str | os.PathLike[str]
METRICS = ("acc", "acc_norm", "perplexity")

# Weight disentanglement (ALGORITHMS.md section 5): a 20 x 20 grid, 2,048 test points per task —
# the defaults of ``tvedit evaluate`` and of a study plan alike.
XI_GRID_SIZE = 20
XI_POINTS = 2048


def open_session(
    inputs: Sequence[PathLike],
    tasks: Mapping[str, PathLike],
    base: PathLike | None = None,
    *,
    linearize: bool = False,
    max_examples: int | None = None,
    batch_size: int = 512,
    allow_base_mismatch: bool = False,
    allow_flin_mismatch: bool = False,
    device: str = "auto",
    bf16: bool = True,
    metric: str = "acc",
) -> Session:
    """Everything ``tvedit evaluate`` needs, loaded once.

    ``inputs``: one checkpoint (evaluated as it is, when no ``base`` is given), or task vectors /
    fine-tuned checkpoints evaluated as edits of theta0 (``base``, else the base recorded in the
    vectors; ``allow_base_mismatch`` accepts task vectors extracted from another base). Vectors of
    regime ``linearized`` are evaluated under f_lin around theta0; ``linearize`` applies f_lin to
    non-linear vectors too (post-hoc linearization); ``allow_flin_mismatch`` evaluates linearized
    vectors trained under another definition of f_lin (with a warning). ``bf16``: bf16 autocast for
    the forward passes on CUDA (False: float32 throughout; no effect on the CPU).
    ``metric``: ``acc``; ``acc_norm`` (causal LMs: the log-likelihood divided by the choice's length
    in characters); ``perplexity`` (causal LMs: the tasks are plain text, ``Session.perplexity``).
    """
    from tvedit.evaluate.data import load_task
    from tvedit.evaluate.runner import Evaluator, Session, load_vector, open_base
    from tvedit.reader import open_checkpoint

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
    vectors = [] if as_model else [load_vector(p, base_sha, theta0, allow_base_mismatch=allow_base_mismatch) for p in paths]
    regimes = {v.regime for v in vectors}
    if len(regimes) > 1 and not linearize:
        raise MismatchError(
            "inputs mix linearized and non-linear vectors; pass --linearize to evaluate all of them under f_lin"
        )
    linear = linearize or "linearized" in regimes
    for v in vectors:
        stale = v.flin - {adapter.flin}
        if v.regime == "linearized" and stale:
            msg = (f"{v.path}: was fine-tuned under f_lin linearizing the {'/'.join(sorted(stale))}, but this tvedit's "
                   f"{adapter.family} f_lin linearizes the {adapter.flin} (docs/finetune.md): fine-tune it again")
            if not allow_flin_mismatch:
                raise MismatchError(msg + " (or --allow-mismatch regime to evaluate it anyway)")
            print(f"warning: {msg}; evaluated anyway (--allow-mismatch regime)", file=sys.stderr)
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
    evaluator = Evaluator(adapter, theta0, batch_size=batch_size, device=device, bf16=bf16)
    return Session(evaluator, task_data, vectors, linear=linear)


def _recorded_base(paths: Sequence[Path]) -> Path:
    from tvedit.manifest import base_candidates
    from tvedit.reader import open_checkpoint

    for p in paths:
        m = open_checkpoint(p).manifest
        if m and m.base and m.base.get("path"):
            found = base_candidates(m.base["path"], p)
            for candidate in found:  # the one with the recorded hash (same rule as tvedit add)
                if open_checkpoint(candidate).sha256 == m.base.get("sha256"):
                    return candidate
            if found:
                return found[0]  # the hash check of the vectors names the mismatch
            raise InputError(f"{p}: its recorded base {m.base['path']!r} is not there (nor beside {p.name}); pass --base BASE")
    raise UsageError("no base: pass --base BASE (the inputs record none)")
