"""Report stage: PNG/SVG plots of training runs and of their evaluations, `muse report`.

Inputs per run directory: `metrics.jsonl` (read by `muse_pipeline.training.metrics_log`) and
`eval.json` (from `muse eval`). Outputs in `out_dir` (figures drawn by
`muse_pipeline.evaluation.plots`): `training.{png,svg}` and `recall.{png,svg}`. This stage checks
the inputs (before anything is written), picks the zero-shot baseline and writes the figures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muse_pipeline.errors import InputError
from muse_pipeline.evaluation.plots import plot_recall, plot_training, run_label


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


def _read_eval(path: Path) -> dict[str, Any]:
    """An eval.json; one InputError line when it is not a JSON object (damaged or another file)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable eval.json ({exc}); write it again with `muse eval`") from None
    if not isinstance(result, dict):
        raise InputError(f"{path} is not an eval.json (not a JSON object); write it again with `muse eval`")
    return result


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
    evals = []
    for run in runs:
        path = run / "eval.json"
        if path.is_file():
            result = _read_eval(path)
            evals.append((run_label(run, result), result))
    base = None
    if isinstance(baseline, str | Path):
        result = _read_eval(Path(baseline))
        base = (f"{result.get('head', 'baseline')} (baseline)", result)
    elif baseline:
        base = zero_shot_baseline(evals)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = plot_training(runs, out / "training.png") + plot_recall(evals, out / "recall.png", base)
    if not written:
        raise InputError(
            "nothing to plot: none of the runs has a metrics.jsonl with records or an eval.json "
            "(train with `muse train`, evaluate with `muse eval`)"
        )
    return written
