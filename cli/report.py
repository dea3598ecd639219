"""`muse report`: plots of training curves and test recall of one or more runs (PNG + SVG)."""

from __future__ import annotations

from pathlib import Path

import typer

from muse_pipeline.cli.common import console


def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare."),
    out: Path = typer.Option(Path("results/report"), help="Folder for the plots (PNG at 200 dpi and SVG)."),
    baseline: Path = typer.Option(
        None, help="eval.json of `muse eval --zero-shot` to draw as the baseline bar.",
        show_default="zero-shot CLIP computed on the runs' cache",
    ),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Leave the zero-shot baseline bar out.",
                                     show_default="off"),
) -> None:
    """Plot training loss, validation R@1 per epoch (best epoch starred) and test recall@K in both
    directions beside the zero-shot CLIP baseline."""
    from muse_pipeline.stages.report import write_report

    files = write_report(run_dirs, out, baseline=False if no_baseline else (baseline or True))
    for path in files:
        console.print(f"wrote {path}")
