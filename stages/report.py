"""Report stage: PNG plots of training runs and of their evaluations (matplotlib, Agg backend).

Inputs per run directory: `metrics.jsonl` (records {"kind": "step", "step", "epoch", "loss", "lr"}
and {"kind": "epoch", "epoch", "train_loss", "val": {...}}) and `eval.json` (from `muse eval`).
Outputs in `out_dir`: `training.png` (loss per step, train loss per epoch, validation R@1 per epoch)
and `recall.png` (text -> video R@1/5/10 of every evaluated run side by side).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECALL_KEYS = ("R1", "R5", "R10")


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


def plot_training(runs: Sequence[Path], out_png: Path) -> Path | None:
    """Loss per step / epoch and validation R@1 per epoch of every run that has a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    plotted = False
    for run in runs:
        log_path = run / "metrics.jsonl"
        if not log_path.is_file():
            log.warning("%s: no metrics.jsonl, left out of the training plot", run)
            continue
        steps, epochs = read_metrics_log(log_path)
        label = _run_label(run)
        if steps:
            line = ax_loss.plot(
                [s["step"] for s in steps], [s["loss"] for s in steps], alpha=0.6, label=label
            )[0]
            # Epoch means on the step axis: the step where each epoch ended.
            ends = {}
            for s in steps:
                ends[s["epoch"]] = s["step"]
            pts = [
                (ends[e["epoch"]], e["train_loss"])
                for e in epochs
                if e["epoch"] in ends and "train_loss" in e
            ]
            if pts:
                ax_loss.plot(
                    *zip(*pts, strict=True), "o--", color=line.get_color(), label=f"{label} epoch mean"
                )
            plotted = True
        val = [(e["epoch"], val_r1(e.get("val"))) for e in epochs]
        val = [(x, y) for x, y in val if y is not None]
        if val:
            ax_val.plot(*zip(*val, strict=True), "o-", label=label)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ax_val.set(xlabel="epoch", ylabel="R@1 (%)", title="validation text -> video R@1")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_recall(evals: Sequence[tuple[str, dict[str, Any]]], out_png: Path) -> Path | None:
    """Grouped bars of text -> video R@1/5/10 (one group per K, one bar per evaluated run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not evals:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(evals) + 4), 4))
    width = 0.8 / len(evals)
    x = np.arange(len(RECALL_KEYS))
    for i, (label, result) in enumerate(evals):
        t2v = result["metrics"]["t2v"]
        values = [float(t2v[k]) for k in RECALL_KEYS]
        bars = ax.bar(x + (i - (len(evals) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [f"R@{k[1:]}" for k in RECALL_KEYS])
    ax.set(ylabel="recall (%)", ylim=(0, 105), title="text -> video recall@K (test, no post-processing)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | str) -> list[Path]:
    """Write training.png and recall.png for `run_dirs` into `out_dir`; returns the PNGs written."""
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a directory: {', '.join(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals = []
    for run in runs:
        path = run / "eval.json"
        if path.is_file():
            result = json.loads(path.read_text())
            evals.append((_run_label(run, result), result))
    written = [
        p
        for p in (plot_training(runs, out / "training.png"), plot_recall(evals, out / "recall.png"))
        if p is not None
    ]
    if not written:
        raise ValueError(
            "nothing to plot: none of the runs has a metrics.jsonl with records or an eval.json "
            "(train with `muse train`, evaluate with `muse eval`)"
        )
    return written
