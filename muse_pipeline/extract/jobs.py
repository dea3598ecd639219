"""The tasks of an extraction run, as plain data (they travel to remote dask workers).

One `ShardJob` per shard of `videos/tokens` with a pending video; one `TextJob` per chunk of
`texts/embeddings` (ROW_CHUNK rows) with a pending text. A job names its store, never holds it.
A shard job's rows come from the store's own per-row arrays (a growing store's rows are not the
dataset's order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from muse_pipeline.cache.store import ROW_CHUNK as TEXT_CHUNK  # one text task per texts/* chunk

if TYPE_CHECKING:
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.extract.config import ExtractConfig


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to process one shard: videos [lo, hi) of the store."""

    store: str
    staging: str
    shard: int
    lo: int
    hi: int
    paths: tuple[str, ...]  # per video of [lo, hi)
    windows: tuple[tuple[float | None, float | None], ...]
    ids: tuple[str, ...]
    model: str
    pretrained: str | None
    device: str
    decoder: str
    frames: int
    threads: int | None = None  # torch intra-op threads on the worker (None: leave as is)
    run: str = ""  # the run (lock) id: a worker writes only while its run holds the store's lock
    precision: str = "fp32"
    videos_per_batch: int = 1
    decode_workers: int = 0  # 0: decode threads in the worker; N: a pool of N processes
    sources: tuple[str, ...] = ()  # per video: the id of its file (rows of one file share it)
    grid_steps: tuple[float | None, ...] = ()  # per video: auto-window grid step (s), None: clip protocol


@dataclass(frozen=True)
class TextJob:
    """What a worker needs to encode the texts of rows [lo, hi) (one chunk, one writer)."""

    store: str
    lo: int
    hi: int
    model: str
    pretrained: str | None
    device: str
    threads: int | None = None
    run: str = ""
    precision: str = "fp32"


def _optional(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def plan_shard_jobs(cfg: ExtractConfig, cache: FeatureCache, staging: Path,
                    threads: int | None, run: str, decode_workers: int) -> list[ShardJob]:
    """A job for every shard that still has a pending video (done == 0)."""
    done = cache.read_done()
    rows = np.arange(cache.n_videos)
    ids, paths = cache.video_ids, cache.video_paths
    windows, steps, sources = cache.read_windows(rows), cache.read_grid_steps(rows), cache.read_sources(rows)
    jobs = []
    for shard in range(cache.n_shards):
        lo, hi = cache.shard_range(shard)
        if (done[lo:hi] != 0).all():
            continue
        jobs.append(ShardJob(
            store=str(cache.path), staging=str(staging), shard=shard, lo=lo, hi=hi,
            paths=tuple(paths[lo:hi]), windows=tuple((_optional(a), _optional(b)) for a, b in windows[lo:hi]),
            ids=tuple(ids[lo:hi]), sources=tuple(sources[lo:hi]),
            grid_steps=tuple(_optional(g) for g in steps[lo:hi]), model=cfg.model, pretrained=cfg.pretrained,
            device=cfg.device, decoder=cfg.decoder, frames=cfg.max_frames, threads=threads, run=run,
            precision=cfg.resolved_precision, videos_per_batch=cfg.videos_per_batch,
            decode_workers=decode_workers,
        ))
    return jobs


def plan_text_jobs(cfg: ExtractConfig, cache: FeatureCache, threads: int | None, run: str) -> list[TextJob]:
    """A job for every chunk of texts with a text not encoded yet."""
    done = cache.read_text_done()
    jobs = []
    for lo in range(0, cache.n_texts, TEXT_CHUNK):
        hi = min(lo + TEXT_CHUNK, cache.n_texts)
        if not done[lo:hi].all():
            jobs.append(TextJob(str(cache.path), lo, hi, cfg.model, cfg.pretrained, cfg.device, threads,
                                run, cfg.resolved_precision))
    return jobs
