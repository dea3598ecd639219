"""Report stage: PNG plots of training runs and of their evaluations (matplotlib, Agg backend).

Inputs per run directory: `metrics.jsonl` (records {"kind": "step", "step", "epoch", "loss", "lr"}
and {"kind": "epoch", "epoch", "train_loss", "val": {...}}) and `eval.json` (from `muse eval`).
Outputs in `out_dir`, each as PNG (200 dpi) and SVG: `training` (loss per step, train loss per epoch,
validation R@1 per epoch with the best epoch starred) and `recall` (R@1/5/10 of every evaluated run,
text -> video and video -> text, beside the zero-shot CLIP baseline). One legend entry per run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muse_pipeline.errors import InputError

log = logging.getLogger(__name__)

RECALL_KEYS = ("R1", "R5", "R10")
DPI = 200


def read_metrics_log(path: Path | str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, epoch records) of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    steps: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    lines = Path(path).read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                continue
            raise ValueError(f"{path}: line {n + 1} is not JSON") from None
        kind = rec.get("kind")
        if kind == "step":
            steps.append(rec)
        elif kind == "epoch":
            epochs.append(rec)
    return steps, epochs


def val_r1(val: dict[str, Any] | None) -> float | None:
    """Text -> video R@1 of a validation record ({"t2v": {"R1"...}} or a flat {"R1": ...})."""
    if not val:
        return None
    if isinstance(val.get("t2v"), dict) and "R1" in val["t2v"]:
        return float(val["t2v"]["R1"])
    if "R1" in val:
        return float(val["R1"])
    return None


def _run_label(run_dir: Path, eval_result: dict[str, Any] | None = None) -> str:
    head = None
    if eval_result is not None:
        head = eval_result.get("head")
    else:
        config = run_dir / "config.json"
        if config.is_file():
            head = json.loads(config.read_text()).get("model", {}).get("head")
    return f"{run_dir.name} ({head})" if head and head != run_dir.name else run_dir.name


def best_epoch(epochs: Sequence[dict[str, Any]]) -> int | None:
    """The epoch whose weights are best.safetensors: the last record the trainer flagged `best`
    (older logs without the flag: the first epoch with the highest validation R@1)."""
    flagged = [e["epoch"] for e in epochs if e.get("best")]
    if flagged:
        return int(flagged[-1])
    scored = [(val_r1(e.get("val")), e["epoch"]) for e in epochs]
    scored = [(r, ep) for r, ep in scored if r is not None]
    if not scored:
        return None
    top = max(r for r, _ in scored)
    return int(next(ep for r, ep in scored if r == top))


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
            handles.append(Line2D([], [], color=colour, marker="o", label=_run_label(run)))
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


def zero_shot_baseline(evals: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]] | None:
    """Zero-shot CLIP (meanP of cached CLS tokens) on the cache and split of the first evaluated run,
    if that cache is still there; None otherwise (the plot then has no baseline bar)."""
    for _, result in evals:
        cache = result.get("cache")
        if cache and Path(cache).exists():
            from muse_pipeline.evaluation.score import zero_shot_result

            base = zero_shot_result(cache, split=result.get("split", "test"))
            return "zero-shot CLIP (meanP, no training)", base
    return None


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | str, *,
                 baseline: Path | str | bool | None = True) -> list[Path]:
    """Write training.{png,svg} and recall.{png,svg} for `run_dirs` into `out_dir`; returns the files.

    baseline: the zero-shot bar of the recall plot: True computes it from the evaluated runs' cache
    (skipped when that cache is gone), a path reads an eval.json of `muse eval --zero-shot`,
    False / None leaves it out.
    """
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise InputError("no run directories given")
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise InputError(f"not a directory: {', '.join(missing)}")
    if isinstance(baseline, str | Path) and not Path(baseline).is_file():
        raise InputError(f"baseline eval file {baseline} does not exist (write one with `muse eval --zero-shot`)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals = []
    for run in runs:
        path = run / "eval.json"
        if path.is_file():
            result = json.loads(path.read_text())
            evals.append((_run_label(run, result), result))
    base = None
    if isinstance(baseline, str | Path):
        result = json.loads(Path(baseline).read_text())
        base = (f"{result.get('head', 'baseline')} (baseline)", result)
    elif baseline:
        base = zero_shot_baseline(evals)
    written = plot_training(runs, out / "training.png") + plot_recall(evals, out / "recall.png", base)
    if not written:
        raise InputError(
            "nothing to plot: none of the runs has a metrics.jsonl with records or an eval.json "
            "(train with `muse train`, evaluate with `muse eval`)"
        )
    return written
