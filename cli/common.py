"""Helpers shared by the CLI commands: errors, logging, summary tables."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from muse_pipeline.errors import UserError

if TYPE_CHECKING:
    from muse_pipeline.extract.config import ExtractSummary

try:  # typer >= 0.20 vendors its own click; older typer uses the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

console = Console()
err_console = Console(stderr=True)

DEBUG_ENV = "MUSE_DEBUG"


def one_line(message: str) -> str:
    """A message as one line: a multi-line reason is joined with '; ' (tests and logs grep lines)."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    return "; ".join(parts) or "unknown error"


def print_error(message: str) -> None:
    # soft_wrap: rich would otherwise break a long message at the terminal width (80 in a pipe).
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", soft_wrap=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class MuseGroup(TyperGroup):
    """The `muse` command group: user errors become one `error:` line, bugs keep their traceback.

    `--debug` is accepted anywhere on the command line (`muse --debug extract ...` or
    `muse extract ... --debug`) and sets MUSE_DEBUG=1, which re-raises user errors with their
    traceback. Usage errors of click (bad option values, unknown choices) are shortened to one line
    as well, pointing at `--help`.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]:
            argv.remove("--debug")
            os.environ[DEBUG_ENV] = "1"
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except UserError as exc:
            if debug_enabled():
                raise
            print_error(str(exc))
            code = exc.exit_code
        except click_exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            code = exc.exit_code
        except click_exceptions.UsageError as exc:
            hint = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
            # typer's pydantic coercion words choice errors as "Value error, ... is not one of ...."
            message = exc.format_message().replace("Value error, ", "").rstrip(".")
            print_error(f"{message}{hint}")
            code = exc.exit_code
        except click_exceptions.ClickException as exc:
            print_error(exc.format_message())
            code = exc.exit_code
        except typer.Abort:
            print_error("aborted")
            code = 1
        sys.exit(code)


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


def _print_ledger(rows: list[dict], title: str, field: str, more: str, limit: int) -> None:
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    table.add_column("id")
    table.add_column(field)
    for row in rows[:limit]:
        table.add_row(str(row["id"]), str(row[field]))
    if len(rows) > limit:
        table.add_row("...", f"{len(rows) - limit} more: `{more}`")
    err_console.print(table)


def print_failures(failures: list[dict], limit: int = 20) -> None:
    _print_ledger(failures, "failed videos", "reason", "muse cache info STORE", limit)


def print_warnings(warnings: list[dict], limit: int = 20) -> None:
    """Cached videos the decoder had to patch up (e.g. a damaged frame replaced by its neighbour)."""
    _print_ledger(warnings, "videos cached with decoder warnings", "warning", "muse cache info STORE --json", limit)


def print_extract_summary(summary: ExtractSummary) -> None:
    """The run summary of `muse extract` (a table, then failures and warnings, if any)."""
    table = Table(title="extraction summary", title_justify="left", show_header=False)
    table.add_row("store", str(summary.store))
    if summary.library:
        table.add_row("library", f"{summary.library} (files)")
    table.add_row("videos", f"{summary.n_cached} cached, {summary.n_failed} failed, of {summary.n_videos}")
    table.add_row("texts", str(summary.n_texts))
    if summary.path_taken:
        table.add_row("ran", summary.path_taken.removeprefix("running "))
    rate = summary.frames_encoded / summary.seconds if summary.seconds > 0 else 0.0
    table.add_row("this run", f"{summary.frames_encoded} frames in {summary.seconds:.1f} s ({rate:.1f} frames/s)")
    if summary.batch_sizes:
        sizes = summary.batch_sizes
        table.add_row("encoder batches", f"{len(sizes)}, {min(sizes)}-{max(sizes)} frames (mean {sum(sizes) / len(sizes):.0f})")
    if summary.retried:
        table.add_row("retried", f"{summary.retried} earlier failed video(s)")
    console.print(table)
    if summary.failures:
        print_failures(summary.failures)
    if summary.warnings:
        print_warnings(summary.warnings)
