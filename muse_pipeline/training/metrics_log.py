"""Reading a run's `metrics.jsonl` (written by `training.loop.Trainer`, one JSON object a line).

Records: {"kind": "step", "step", "epoch", "loss", "lr", ...} per logged step and
{"kind": "epoch", "epoch", "train_loss", "val": {...}, "best": bool, "logit_scale", ...} per epoch;
other kinds (e.g. "error") are ignored by the readers here. The last line may be torn (a crash
mid-write): it is skipped; a bad line anywhere else is an InputError (a ValueError) naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muse_pipeline.errors import InputError


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
            raise InputError(f"{path}: line {n + 1} is not JSON; repair or remove that line") from None
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


def final_logit_scale(run_dir: Path | str) -> float | None:
    """The `logit_scale` of the last epoch record that has one; None without a metrics.jsonl or value."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    values = [r["logit_scale"] for r in read_metrics_log(path)[1] if "logit_scale" in r]
    return values[-1] if values else None
