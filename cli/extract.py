"""`muse extract`: decode, encode with CLIP, cache tokens (resumable, parallel on dask)."""

from __future__ import annotations

from pathlib import Path

import typer

from muse_pipeline.cli.common import fail, print_failures, setup_logging


def extract_cmd(
    dataset: str = typer.Option("synthetic", help="msrvtt | didemo | activitynet | folder | synthetic"),
    data_root: Path = typer.Option(Path("data/synthetic"), help="Annotation files and videos of the dataset."),
    split: list[str] = typer.Option(None, help="Only these splits (repeatable): train, val, test. Default: all."),
    model: str = typer.Option("ViT-B-32", help="open_clip model name (muse-tiny: the built-in tiny test model)."),
    pretrained: str = typer.Option(None, help="open_clip pretrained tag (e.g. openai) or a local weights file. Default: random init."),
    frames: int = typer.Option(None, help="Max frames per video (default: dataset preset)."),
    words: int = typer.Option(None, help="Max words per caption, <sot>/<eot> included (default: dataset preset)."),
    decoder: str = typer.Option("pyav", help="pyav | decord (same frames; pyav is the more forgiving)."),
    workers: int = typer.Option(None, help="Local dask workers (default: sized to the machine; 0: in this process, no dask)."),
    scheduler: str = typer.Option(None, help="Address of a running dask scheduler, e.g. tcp://10.0.0.5:8786."),
    device: str = typer.Option("cpu", help="cpu | cuda (one worker per GPU)."),
    cache_dir: Path = typer.Option(Path("cache"), help="Cache root; the store goes to <cache-dir>/<dataset>/<model>-<frames>f.zarr."),
    out: Path = typer.Option(None, help="Store path (overrides --cache-dir)."),
    overwrite: bool = typer.Option(False, help="Delete an existing store with other settings and start over."),
    videos_per_shard: int = typer.Option(None, help="Videos per shard file (default: ~256 MB shards)."),
    max_failures: float = typer.Option(0.01, help="Exit non-zero when more than this fraction of videos failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
) -> None:
    """Extract CLIP tokens of every sampled frame into a sharded Zarr cache.

    Re-running the same command resumes: finished videos are never redone. Bad videos are recorded in
    the store's failure ledger and never stop the run.
    """
    from muse_pipeline.stages.extract import ExtractConfig, ExtractIncomplete, run_extract

    setup_logging(quiet)
    cfg = ExtractConfig(
        dataset=dataset, data_root=data_root, splits=tuple(split) if split else None, model=model,
        pretrained=pretrained, frames=frames, words=words, decoder=decoder, device=device,
        workers=workers, scheduler=scheduler, cache_dir=cache_dir, out=out, overwrite=overwrite,
        videos_per_shard=videos_per_shard, max_failures=max_failures, quiet=quiet,
    )
    try:
        summary = run_extract(cfg)
    except KeyboardInterrupt:
        fail("interrupted: finished videos are kept; run the same command again to resume.", code=130)
    except ExtractIncomplete as exc:
        fail(str(exc))
    if not quiet:
        from muse_pipeline.cli.common import print_extract_summary

        print_extract_summary(summary)
    elif summary.failures:
        print_failures(summary.failures)
    if not summary.ok:
        fail(
            f"{summary.n_failed}/{summary.n_videos} videos failed ({summary.failure_rate:.1%}), more than "
            f"--max-failures {max_failures:.1%}; see the ledger with `muse cache info {summary.store}`."
        )
