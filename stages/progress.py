"""Rich progress bars shared by the stages (quiet mode prints nothing)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class ExtractProgress:
    """Videos done / total with a videos-per-second rate and an ETA."""

    def __init__(self, total: int, completed: int = 0, quiet: bool = False, label: str = "extract") -> None:
        self.quiet = quiet
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self._task = self._progress.add_task(label, total=total, completed=completed, rate="")
        self._start_completed = completed

    def __enter__(self) -> ExtractProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def _refresh_rate(self) -> None:
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        done = task.completed - self._start_completed
        rate = f"{done / elapsed:.2f} videos/s" if elapsed > 0 and done > 0 else ""
        self._progress.update(self._task, rate=rate)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)
        self._refresh_rate()

    def update(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)
        self._refresh_rate()
