"""Rich progress bars on stderr (quiet mode prints nothing): a shared base and the extraction bar.

`ProgressBar` holds one rich task shown as the given columns followed by elapsed time, "ETA" and
remaining time, and renders a rate ("1.23 videos/s") counted from where the bar started (a resumed
run's earlier work does not inflate it). The trainer's bar (`training/progress.py`) builds on it.
"""

from __future__ import annotations

from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class ProgressBar:
    """One task of `total` units, `completed` already done; `fields` are the task's extra fields
    that the columns show (`{task.fields[name]}`), `rate` among them."""

    def __init__(self, columns: list[ProgressColumn], name: str, total: int, completed: int = 0,
                 quiet: bool = False, **fields: Any) -> None:
        self.quiet = quiet
        self._progress = Progress(
            *columns,
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self._task = self._progress.add_task(name, total=total, completed=completed, rate="", **fields)
        self._start_completed = completed

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def rate(self, unit: str) -> str:
        """Units per second since the bar started, e.g. "1.23 videos/s"; "" before the first one."""
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        done = task.completed - self._start_completed
        return f"{done / elapsed:.2f} {unit}/s" if elapsed > 0 and done > 0 else ""


class ExtractProgress(ProgressBar):
    """Videos done / total with a videos-per-second rate and an ETA."""

    def __init__(self, total: int, completed: int = 0, quiet: bool = False, label: str = "extract") -> None:
        columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}")]
        super().__init__(columns, label, total, completed, quiet)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)
        self._progress.update(self._task, rate=self.rate("videos"))

    def update(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)
        self._progress.update(self._task, rate=self.rate("videos"))
