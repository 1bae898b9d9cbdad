"""Figures: the weight-disentanglement heatmap and where a mask's kept entries sit, layer by layer.

matplotlib is the optional extra ``plot`` (``pip install 'tvedit[plot]'``); it is imported only
here, with the non-interactive Agg backend. ``mask_layer_stats`` is pure (no matplotlib).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tvedit.errors import UsageError

_BLOCK = re.compile(
    r"^(?P<tower>.*?)\.(?:resblocks|layers?|block|h)\.(?P<index>\d+)\.(?P<rest>.+)$"
)
KINDS = ("attn.qkv", "attn.out", "mlp.in", "mlp.out", "norm", "other")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'tvedit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kind(rest: str) -> str:
    if "in_proj" in rest or re.search(r"\b(q|k|v|qkv|query|key|value)\b", rest.replace(".", " ")):
        return "attn.qkv"
    if "out_proj" in rest or re.search(r"attn.*\.(o|out|proj)\.", rest):
        return "attn.out"
    if re.search(r"(c_fc|fc1|wi|mlp\.0|intermediate)", rest):
        return "mlp.in"
    if re.search(r"(c_proj|fc2|wo|mlp\.2|output\.dense)", rest):
        return "mlp.out"
    if "ln" in rest or "norm" in rest:
        return "norm"
    return "other"


def mask_layer_stats(items: Iterable[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per (tower, block, kind): kept entries, total entries and the kept fraction.

    Tensors outside numbered blocks (embeddings, final projections) are reported as block -1."""
    acc: dict[tuple[str, int, str], list[int]] = {}
    for key, mask in items:
        m = _BLOCK.match(key)
        tower, block, kind = (
            (m["tower"], int(m["index"]), _kind(m["rest"]))
            if m
            else (key.split(".")[0], -1, "other")
        )
        cell = acc.setdefault((tower, block, kind), [0, 0])
        cell[0] += int(mask.count_nonzero())
        cell[1] += mask.numel()
    return [
        {
            "tower": t,
            "block": b,
            "kind": k,
            "kept": kept,
            "total": total,
            "fraction": kept / total if total else 0.0,
        }
        for (t, b, k), (kept, total) in sorted(acc.items())
    ]


def mask_figure(stats: Sequence[dict[str, Any]], output: Path, title: str = "") -> Path:
    """Kept fraction by block (x) and kind (one line each), one panel per tower (cf. TaLoS fig. 4)."""
    plt = _pyplot()
    towers = sorted({s["tower"] for s in stats if s["block"] >= 0}) or sorted(
        {s["tower"] for s in stats}
    )
    fig, axes = plt.subplots(1, len(towers), figsize=(5.5 * len(towers), 3.6), squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=True):
        rows = [s for s in stats if s["tower"] == tower and s["block"] >= 0]
        for kind in KINDS:
            pts = sorted((s["block"], s["fraction"]) for s in rows if s["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xlabel(f"{tower}: block")
        ax.set_ylabel("fraction of entries kept")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or "mask: kept entries by layer")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def heatmap(
    xi: Sequence[Sequence[float]],
    grid: Sequence[float],
    tasks: Sequence[str],
    output: Path,
    title: str = "",
) -> Path:
    """xi(alpha1, alpha2) as an image: alpha1 on x, alpha2 on y, origin lower left."""
    plt = _pyplot()
    data = torch.tensor(xi).T.numpy()  # rows: alpha2, columns: alpha1
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    lo, hi = grid[0], grid[-1]
    step = (hi - lo) / (len(grid) - 1) / 2
    im = ax.imshow(
        data,
        origin="lower",
        extent=(lo - step, hi + step, lo - step, hi + step),
        cmap="viridis",
        vmin=0.0,
        vmax=max(1e-9, float(data.max())),
        aspect="equal",
    )
    fig.colorbar(im, ax=ax, label="ξ (disagreement, sum over tasks)")
    ax.set_xlabel(f"α1 ({tasks[0]})")
    ax.set_ylabel(f"α2 ({tasks[1]})")
    ax.axhline(0, color="white", lw=0.5, alpha=0.6)
    ax.axvline(0, color="white", lw=0.5, alpha=0.6)
    ax.set_title(title or "weight disentanglement error")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def study_figure(result: dict[str, Any], output: Path) -> None:
    """The regime study in one PNG: task addition (absolute and normalised, mean ± sd over seeds) for
    every regime and post-hoc merge, task negation (target vs control) per regime, and the training
    loss curves (first seed, mean over tasks) that show each regime's runs have flattened."""
    plt = _pyplot()
    rows = result["rows"]
    names = list(rows)
    labels = [n if rows[n]["kind"] == "regime" else n.removeprefix("merge-") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    width = 0.38
    xs = range(len(names))
    for j, (key, title) in enumerate((("merged", "absolute"), ("normalized", "normalised"))):
        means = [rows[n]["addition"][key]["mean"] * 100 for n in names]
        sds = [rows[n]["addition"][key]["sd"] * 100 for n in names]
        ax.bar([x + (j - 0.5) * width for x in xs], means, width, yerr=sds, capsize=3, label=title)
    ax.axhline(result["zero_shot"] * 100, color="gray", linestyle="--", linewidth=1, label="zero-shot θ0")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("task addition")
    ax.legend(fontsize=8)
    ax = axes[1]
    neg = [n for n in names if "negation" in rows[n]]
    for j, (key, title) in enumerate((("target", "target ↓"), ("control", "control"))):
        means = [rows[n]["negation"][key]["mean"] * 100 for n in neg]
        sds = [rows[n]["negation"][key]["sd"] * 100 for n in neg]
        ax.bar([x + (j - 0.5) * width for x in range(len(neg))], means, width, yerr=sds, capsize=3, label=title)
    if neg:
        first = rows[neg[0]]["seeds"][0]["negation"]
        ax.axhline(first["target_zero_shot"] * 100, color="gray", linestyle="--", linewidth=1, label="target zero-shot")
    ax.set_xticks(list(range(len(neg))), neg, rotation=30, ha="right")
    ax.set_title("task negation")
    ax.legend(fontsize=8)
    ax = axes[2]
    for n in names:
        if rows[n]["kind"] != "regime":
            continue
        curves = [c for c in rows[n]["seeds"][0]["loss"].values() if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        steps = [c[i][0] for i in range(length) for c in curves[:1]]
        mean_loss = [sum(c[i][1] for c in curves) / len(curves) for i in range(length)]
        ax.plot(steps, mean_loss, label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over tasks)")
    ax.set_title("fine-tuning loss, first seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


SWEEP_METRICS = (("merged", "task addition: merged (absolute)"), ("normalized", "task addition: normalised"),
                 ("negation_target", "task negation: target ↓"))  # fmt: skip


def regime_colors(result: dict[str, Any]) -> dict[str, str]:
    """One matplotlib colour per regime for the whole sweep figure, so that a regime has the same
    colour in every row: the fine-tuning modes in their fixed order (full, attn, linearized,
    sparse: C0-C3), any other name after them in order of first appearance."""
    from tvedit.models.base import MODES

    seen = [r for axis in result["axes"] for r in axis["regimes"]]
    names = list(MODES) + [r for r in dict.fromkeys(seen) if r not in MODES]
    return {name: f"C{i % 10}" for i, name in enumerate(names) if name in seen}


def sweep_figure(result: dict[str, Any], output: Path) -> None:
    """The scale sweep in one PNG: a row per swept variable, a column per metric (merged absolute
    and normalised accuracy, negation target accuracy), a line per regime against the variable,
    error bars (sample sd over seeds) where there are several seeds. Numeric values are placed on
    their scale (log when they span more than a factor 10); others (theta0 files) side by side."""
    plt = _pyplot()
    axes_data = result["axes"]
    colors = regime_colors(result)
    fig, grid = plt.subplots(len(axes_data), 3, figsize=(15, 3.8 * len(axes_data)), squeeze=False)
    for row, axis in enumerate(axes_data):
        points = axis["points"]
        numeric = all(isinstance(p["value"], int | float) and not isinstance(p["value"], bool) for p in points)
        xs = [float(p["value"]) if numeric else float(i) for i, p in enumerate(points)]
        for col, (key, title) in enumerate(SWEEP_METRICS):
            ax = grid[row][col]
            for regime in axis["regimes"]:
                cells = [p["rows"][regime].get(key) for p in points]
                if not all(cells):
                    continue
                means = [c["mean"] * 100 for c in cells]
                sds = [c["sd"] * 100 if p["rows"][regime]["seeds"] > 1 else 0.0 for c, p in zip(cells, points, strict=True)]
                ax.errorbar(xs, means, yerr=sds if any(sds) else None, marker="o", capsize=3, label=regime,
                            color=colors[regime])
            if numeric and min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
            ax.set_xticks(xs, [p["label"] for p in points], rotation=0 if numeric else 20)
            ax.set_xticks([], minor=True)  # a log axis labels its minor ticks too, over the points' labels
            ax.set_xlabel(axis["name"] if axis["name"] == axis["vary"] else f"{axis['name']} ({axis['vary']})")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
