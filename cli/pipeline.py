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
    data_root: Path = typer.Option(..., help="Folder with the benchmark's annotation files and videos."),
    model: str = typer.Option("ViT-B-32", help="open_clip model name."),
    pretrained: str = typer.Option("openai", help="open_clip tag or weights file; empty for random init (smoke runs only)."),
    head: str = typer.Option("muse", help="Similarity head to train."),
    frames: int = typer.Option(None, help="Max frames (default: dataset preset)."),
    epochs: int = typer.Option(None, help="Epochs (default: dataset preset, 5)."),
    batch_size: int = typer.Option(None, help="Global batch (default: preset, 128)."),
    end_to_end: bool = typer.Option(None, "--end-to-end/--from-cache", help="Default: end to end when a GPU is present."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    workers: int = typer.Option(None, help="Extraction workers."),
    cache_dir: Path = typer.Option(Path("cache")),
    runs_dir: Path = typer.Option(Path("runs")),
    results_dir: Path = typer.Option(Path("results")),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Extract -> train -> eval with the paper's recipe; writes results/<dataset>.md beside the published numbers."""
    from muse_pipeline.stages.reproduce import DataMissing, ReproduceConfig, run_reproduce

    setup_logging(quiet)
    cfg = ReproduceConfig(
        dataset=dataset, data_root=data_root, model=model, pretrained=pretrained or None, head=head,
        frames=frames, epochs=epochs, batch_size=batch_size, end_to_end=end_to_end, device=device,
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
