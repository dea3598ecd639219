"""Rich progress bar of the trainer: loss, lr, steps/s and ETA (quiet mode prints nothing)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class TrainProgress:
    def __init__(self, total_steps: int, completed: int = 0, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("[bold]train[/] ep {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=completed,
                                             epoch="-", loss="-", lr="-", rate="")
        self._start = completed

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def step(self, loss: float, lr: float, epoch: int) -> None:
        self._progress.advance(self._task)
        task = self._progress.tasks[0]
        done = task.completed - self._start
        rate = f"{done / task.elapsed:.2f} steps/s" if task.elapsed and done else ""
        self._progress.update(self._task, loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch, rate=rate)

    def epoch_done(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        val = record.get("val")
        r1 = f"val t2v R@1 {val['t2v']['R1']:.2f}" if val else "no validation set"
        star = " (best)" if record.get("best") and val else ""
        self._progress.console.print(
            f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, {r1}{star}"
        )
