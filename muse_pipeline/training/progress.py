"""Rich progress bar of the trainer: loss, lr, steps/s and ETA (quiet mode prints nothing)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

from muse_pipeline.progress import ProgressBar


class TrainProgress(ProgressBar):
    def __init__(self, total_steps: int, completed: int = 0, quiet: bool = False) -> None:
        columns = [TextColumn("[bold]train[/] ep {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}")]
        super().__init__(columns, "train", total_steps, completed, quiet, epoch="-", loss="-", lr="-")

    def step(self, loss: float, lr: float, epoch: int) -> None:
        self._progress.advance(self._task)
        self._progress.update(self._task, loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch,
                              rate=self.rate("steps"))

    def epoch_done(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        val = record.get("val")
        r1 = f"val t2v R@1 {val['t2v']['R1']:.2f}" if val else "no validation set"
        star = " (best)" if record.get("best") and val else ""
        self._progress.console.print(
            f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, {r1}{star}"
        )
