"""`muse extract`: decode, encode with CLIP, cache tokens (resumable, parallel on dask)."""

from __future__ import annotations

import signal
from enum import Enum
from pathlib import Path

import typer

from muse_pipeline.cli.common import fail, print_failures, setup_logging
from muse_pipeline.data import DATASETS
from muse_pipeline.extract.config import DECODERS, PRECISION_CHOICES

# Choices as enums: typer checks them and lists them in --help, before any work starts.
DatasetName = Enum("DatasetName", {name: name for name in DATASETS.names()}, type=str)
Decoder = Enum("Decoder", {name: name for name in DECODERS}, type=str)
Precision = Enum("Precision", {name: name for name in PRECISION_CHOICES}, type=str)


def _terminate_as_interrupt(signum, frame) -> None:
    # SIGTERM (kill, a scheduler's stop) ends the run like Ctrl-C: workers shut down, the lock is
    # released, finished videos are kept, and nothing counts as a crash.
    raise KeyboardInterrupt


def extract_cmd(
    dataset: DatasetName = typer.Option("synthetic", help="Dataset loader."),
    data_root: Path = typer.Option(Path("data/synthetic"), help="Annotation files and videos of the dataset."),
    split: list[str] = typer.Option(None, help="Only these splits (repeatable): train, val, test.", show_default="all"),
    model: str = typer.Option("ViT-B-32", help="open_clip model name (muse-tiny: the built-in tiny test model)."),
    pretrained: str = typer.Option(None, help="open_clip pretrained tag (e.g. openai) or a local weights file.", show_default="random init"),
    frames: int = typer.Option(None, help="Max frames per video, >= 1 (default: dataset preset)."),
    words: int = typer.Option(None, help="Max words per caption, <sot>/<eot> included (default: dataset preset)."),
    window: int = typer.Option(None, help="Folder dataset: cut files longer than this into moments of this many seconds (0: whole files).", show_default="2 s per frame: 24 at 12 frames"),
    stride: int = typer.Option(None, help="Folder dataset: seconds between the starts of a file's moments.", show_default="half a window"),
    decoder: Decoder = typer.Option("pyav", help="Video decoder (same frames; pyav is the more forgiving)."),
    workers: int = typer.Option(None, help="Local dask workers (default: sized to the machine; 0: in this process, no dask)."),
    scheduler: str = typer.Option(None, help="Address of a running dask scheduler, e.g. tcp://10.0.0.5:8786.", show_default="a LocalCluster"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N (cuda: one worker per GPU)."),
    cache_dir: Path = typer.Option(Path("cache"), help="Cache root; the store goes to <cache-dir>/<dataset>/<model>-<frames>f.zarr (folder: <cache-dir>/folder/<root name>-<hash>/...)."),
    out: Path = typer.Option(None, help="Store path (overrides --cache-dir).", show_default="<cache-dir>/<dataset>/<model>-<frames>f.zarr"),
    overwrite: bool = typer.Option(False, help="Delete an existing store with other settings and start over."),
    videos_per_shard: int = typer.Option(None, help="Videos per shard file (default: ~256 MB shards)."),
    max_failures: float = typer.Option(0.01, help="Exit non-zero when more than this fraction (0..1) of videos failed."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry every failed video (without it: only those whose file changed).", show_default="off"),
    batch_frames: int = typer.Option(None, help="Frames per encoder forward, batched across videos (default: one video on CPU, sized to the card on CUDA)."),
    precision: Precision = typer.Option("auto", help="Encoder precision (auto: fp16 on CUDA, fp32 on CPU)."),
    decode_workers: int = typer.Option(None, help="Decode processes per worker (default: 0 = threads on CPU; CPU cores per GPU on CUDA)."),
    dashboard: bool = typer.Option(False, "--dashboard", help="Start the dask dashboard and print its address.", show_default="off"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, summary table or dask messages.", show_default="off"),
) -> None:
    """Extract CLIP tokens of every sampled frame into a sharded Zarr cache.

    Re-running the same command resumes: finished videos are never redone. Bad videos are recorded in
    the store's failure ledger and never stop the run; they are retried when their file changes.
    One run at a time per store: a second one is refused.
    """
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.stages.extract import run_extract

    setup_logging(quiet)
    cfg = ExtractConfig(
        dataset=DatasetName(dataset).value, data_root=data_root, splits=tuple(split) if split else None,
        model=model, pretrained=pretrained, frames=frames, words=words, decoder=Decoder(decoder).value,
        device=device, workers=workers, scheduler=scheduler, cache_dir=cache_dir, out=out,
        overwrite=overwrite, videos_per_shard=videos_per_shard, max_failures=max_failures, quiet=quiet,
        retry_failed=retry_failed, batch_frames=batch_frames, precision=Precision(precision).value,
        decode_workers=decode_workers, dashboard=dashboard, window=window, stride=stride,
    )
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        summary = run_extract(cfg)
    except KeyboardInterrupt:
        fail("interrupted: finished videos are kept; run the same command again to resume.", code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)
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
