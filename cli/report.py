"""`muse report`: PNG plots of training curves and test recall of one or more runs."""

from __future__ import annotations

from pathlib import Path

import typer

from muse_pipeline.cli.common import console, fail


def report_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare."),
    out: Path = typer.Option(Path("results/report"), help="Folder for the PNG files."),
) -> None:
    """Plot training loss, validation R@1 per epoch, and test recall@K of the evaluated runs."""
    from muse_pipeline.stages.report import write_report

    try:
        pngs = write_report(run_dirs, out)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for png in pngs:
        console.print(f"wrote {png}")
