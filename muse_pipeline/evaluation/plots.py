"""The report's figures (matplotlib, Agg backend), each saved as PNG (200 dpi) and SVG beside it.

`plot_training`: loss per step (thin), train loss per epoch (dots) and validation R@1 per epoch
with the best epoch starred, from each run's `metrics.jsonl` (`training.metrics_log`).
`plot_recall`: grouped bars of R@1/5/10, text -> video and video -> text, one bar per evaluated run
(eval.json results, `evaluation.tables`) beside an optional baseline. One legend entry per run.
Both return the written [png, svg], or [] when there is nothing to plot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muse_pipeline.training.metrics_log import best_epoch, read_metrics_log, val_r1

log = logging.getLogger(__name__)

RECALL_KEYS = ("R1", "R5", "R10")
DPI = 200


def run_label(run_dir: Path, eval_result: dict[str, Any] | None = None) -> str:
    """A run's legend label: its folder name and head (from eval.json's result, else config.json)."""
    head = None
    if eval_result is not None:
        head = eval_result.get("head")
    else:
        config = run_dir / "config.json"
        if config.is_file():
            head = json.loads(config.read_text()).get("model", {}).get("head")
    return f"{run_dir.name} ({head})" if head and head != run_dir.name else run_dir.name


def _save(fig: Any, out_png: Path) -> list[Path]:
    """PNG at 200 dpi and an SVG beside it."""
    fig.savefig(out_png, dpi=DPI)
    svg = out_png.with_suffix(".svg")
    fig.savefig(svg)
    return [out_png, svg]


def plot_training(runs: Sequence[Path], out_png: Path) -> list[Path]:
    """Loss per step (thin) with epoch means (dots), and validation R@1 per epoch with the best epoch
    starred; one colour and one legend entry per run. Returns [png, svg], or [] if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    handles = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        log_path = run / "metrics.jsonl"
        if not log_path.is_file():
            log.warning("%s: no metrics.jsonl, left out of the training plot", run)
            continue
        steps, epochs = read_metrics_log(log_path)
        colour = colours[i % len(colours)]
        plotted = False
        if steps:
            ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], alpha=0.45, lw=1, color=colour)
            ends: dict[Any, int] = {}
            for s in steps:
                ends[s["epoch"]] = s["step"]
            pts = [(ends[e["epoch"]], e["train_loss"]) for e in epochs if e["epoch"] in ends and "train_loss" in e]
            if pts:
                ax_loss.plot(*zip(*pts, strict=True), "o--", color=colour, ms=4)
            plotted = True
        val = [(e["epoch"], val_r1(e.get("val"))) for e in epochs]
        val = [(x, y) for x, y in val if y is not None]
        if val:
            ax_val.plot(*zip(*val, strict=True), "o-", color=colour, ms=4)
            best = best_epoch(epochs)
            if best is not None and best in dict(val):
                ax_val.plot([best], [dict(val)[best]], marker="*", ms=16, color=colour, mec="black", ls="none")
                ax_val.annotate(f"best: epoch {best}", (best, dict(val)[best]), textcoords="offset points",
                                xytext=(6, 6), fontsize=7)
            plotted = True
        if plotted:
            handles.append(Line2D([], [], color=colour, marker="o", label=run_label(run)))
    if not handles:
        plt.close(fig)
        return []
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss (line: steps, dots: epoch means)")
    ax_val.set(xlabel="epoch", ylabel="R@1 (%)", title="validation text -> video R@1 (star: best epoch)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    handles.append(Line2D([], [], color="grey", marker="*", ms=12, mec="black", ls="none", label="best epoch (weights kept)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    paths = _save(fig, out_png)
    plt.close(fig)
    return paths


def plot_recall(evals: Sequence[tuple[str, dict[str, Any]]], out_png: Path,
                baseline: tuple[str, dict[str, Any]] | None = None) -> list[Path]:
    """Grouped bars of R@1/5/10, text -> video and video -> text side by side: one bar per run, the
    zero-shot baseline first (grey, hatched). Returns [png, svg], or [] if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not evals:
        return []
    series = ([(baseline[0], baseline[1], True)] if baseline else []) + [(lab, r, False) for lab, r in evals]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.2 * len(series) + 7), 4.4), sharey=True)
    width = 0.8 / len(series)
    x = np.arange(len(RECALL_KEYS))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    split = evals[0][1].get("split", "test")
    for ax, (direction, title) in zip(axes, (("t2v", "text -> video"), ("v2t", "video -> text")), strict=True):
        for i, (label, result, is_base) in enumerate(series):
            m = result["metrics"][direction]
            style = dict(color="#bbbbbb", hatch="//", edgecolor="#666666") if is_base else dict(
                color=colours[(i - (1 if baseline else 0)) % len(colours)])
            bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [float(m[k]) for k in RECALL_KEYS], width,
                          label=label, **style)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(x, [f"R@{k[1:]}" for k in RECALL_KEYS])
        ax.set(title=f"{title} recall@K ({split}, no post-processing)", ylim=(0, 105))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths = _save(fig, out_png)
    plt.close(fig)
    return paths
