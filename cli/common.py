"""Helpers shared by the CLI commands: errors, logging, summary tables."""

from __future__ import annotations

import logging
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def setup_logging(quiet: bool = False) -> None:
    """Our INFO messages on stderr; other libraries only from WARNING up.

    open_clip logs through the root logger and dask at INFO: both would drown the progress bars.
    """
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)], force=True,
    )
    logging.getLogger("muse_pipeline").setLevel(logging.WARNING if quiet else logging.INFO)
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(logging.WARNING)


def print_failures(failures: list[dict], limit: int = 20) -> None:
    table = Table(title=f"failed videos ({len(failures)})", title_justify="left")
    table.add_column("id")
    table.add_column("reason")
    for f in failures[:limit]:
        table.add_row(str(f["id"]), str(f["reason"]))
    if len(failures) > limit:
        table.add_row("...", f"{len(failures) - limit} more: `muse cache info STORE`")
    err_console.print(table)


def print_extract_summary(summary) -> None:
    table = Table(title="extraction summary", title_justify="left", show_header=False)
    table.add_row("store", str(summary.store))
    table.add_row("videos", f"{summary.n_cached} cached, {summary.n_failed} failed, of {summary.n_videos}")
    table.add_row("texts", str(summary.n_texts))
    rate = summary.frames_encoded / summary.seconds if summary.seconds > 0 else 0.0
    table.add_row("this run", f"{summary.frames_encoded} frames in {summary.seconds:.1f} s ({rate:.1f} frames/s)")
    console.print(table)
    if summary.failures:
        print_failures(summary.failures)
