"""`muse demo` and `muse reproduce`: whole-pipeline commands."""

from __future__ import annotations

from pathlib import Path

import typer

from muse_pipeline.cli.common import fail, setup_logging


def demo_cmd(
    out: Path = typer.Option(
        Path("demo"), "--out", "--root",
        help="Folder the demo writes: its data, cache, runs, report, index and search page.",
    ),
    videos: int = typer.Option(
        192, help="Synthetic videos to generate (count; half train, a quarter val, a quarter test)."
    ),
    epochs: int = typer.Option(
        None, help="Training epochs per head (count).", show_default="the synthetic preset"
    ),
    workers: int = typer.Option(
        None, help="Extraction worker processes (count; 0: no dask).", show_default="sized to the machine"
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Delete an earlier demo folder and start over.",
                               show_default="off: reuse what an earlier run finished"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors (no progress, no tables).",
                               show_default="off"),
) -> None:
    """Run the whole pipeline on the built-in synthetic dataset with the tiny CLIP (a few minutes on 2 CPUs).

    Re-running reuses what an earlier run finished (cache, trained heads).
    """
    from muse_pipeline.stages.demo import DemoConfig, run_demo

    setup_logging(quiet)
    run_demo(DemoConfig(root=out, n_videos=videos, epochs=epochs, workers=workers, fresh=fresh, quiet=quiet))


def reproduce_cmd(
    dataset: str = typer.Argument(..., help="msrvtt | didemo | activitynet"),
    data_root: Path = typer.Option(
        ..., help="Folder with the benchmark's annotation files and videos (required).", show_default=False
    ),
    model: str = typer.Option("ViT-B-32", help="open_clip model name."),
    pretrained: str = typer.Option(
        "openai", help="open_clip tag or weights file; empty for random init (smoke runs only)."
    ),
    head: str = typer.Option("muse", help="Similarity head to train: muse | seqTransf | meanP | muse-transformer."),
    frames: int = typer.Option(None, help="Max frames per video.", show_default="dataset preset: 12 / 64 / 64"),
    epochs: int = typer.Option(None, help="Epochs of the selection run.", show_default="dataset preset: 5"),
    batch_size: int = typer.Option(None, help="Global batch size.", show_default="dataset preset: 128"),
    end_to_end: bool = typer.Option(
        None, "--end-to-end/--from-cache", help="Train with CLIP in the loop, or from the frozen feature cache.",
        show_default="end to end when a GPU is present",
    ),
    refit: bool = typer.Option(
        None, "--refit/--no-refit",
        help="After selecting the epoch on validation, retrain on ALL training videos for that many epochs and "
             "report that model (beside the selection model).",
        show_default="on for msrvtt and activitynet, whose validation is held out of train; off for didemo",
    ),
    device: str = typer.Option(None, help="cpu | cuda.", show_default="cuda when available"),
    workers: int = typer.Option(None, help="Extraction workers.", show_default="sized to the machine"),
    cache_dir: Path = typer.Option(Path("cache"), help="Parent folder of feature caches."),
    runs_dir: Path = typer.Option(Path("runs"), help="Parent folder of run directories."),
    results_dir: Path = typer.Option(Path("results"), help="Where results/<dataset>.md and .json go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.", show_default="off"),
) -> None:
    """Extract -> train (selection on validation, then refit) -> eval with the paper's recipe; writes
    results/<dataset>.md: ours beside the published numbers, the differences, the protocol and recipe."""
    from muse_pipeline.stages.reproduce import DataMissing, ReproduceConfig, run_reproduce

    setup_logging(quiet)
    cfg = ReproduceConfig(
        dataset=dataset, data_root=data_root, model=model, pretrained=pretrained or None, head=head,
        frames=frames, epochs=epochs, batch_size=batch_size, end_to_end=end_to_end, refit=refit, device=device,
        workers=workers, cache_dir=cache_dir, runs_dir=runs_dir, results_dir=results_dir, quiet=quiet,
    )
    try:
        page = run_reproduce(cfg)
    except DataMissing as exc:
        fail(str(exc), code=2)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(page.read_text())
    typer.echo(f"written to {page}")
