"""Extract stage: decode videos, run CLIP, cache every frame's tokens in a sharded Zarr store.

Orchestration only; the work lives in `muse_pipeline.extract` (its package docstring: one writer
per store, shards, encoder groups; `staging`: resume and crash safety) and the fingerprint in
`muse_pipeline.cache.fingerprint`.

Order of a run: validate every option and input, check the output folder, refuse if another run
holds the store, load the dataset and CLIP; only then lock and create/open the store, merge what an
earlier run staged, set failed videos back to pending where due, and run the shard and text jobs
(in this process with `--workers 0` or where a LocalCluster would get one CPU worker, else on dask;
`config.choose_work_plan` decides and the run says which in one line).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from muse_pipeline.cache.schema import RETIRED
from muse_pipeline.data import DatasetIndex, load_dataset
from muse_pipeline.errors import InputError
from muse_pipeline.extract.config import (
    DISK_ERRNOS,
    ExtractConfig,
    ExtractSummary,
    OutputError,
    check_config,
    check_library_root,
    check_output,
    choose_work_plan,
    default_decode_workers,
)
from muse_pipeline.extract.encoders import ENCODER_CACHE
from muse_pipeline.extract.jobs import plan_shard_jobs, plan_text_jobs
from muse_pipeline.extract.staging import count_finished, merge_staged_ledgers, retry_failed_videos
from muse_pipeline.extract.store_plan import StorePlan, apply_store_plan, plan_store
from muse_pipeline.extract.worker import process_shard, process_texts

log = logging.getLogger(__name__)


def _stored_batching(cfg: ExtractConfig) -> ExtractConfig:
    """Without an explicit --batch-frames, a resumed store keeps the grouping it was started with
    (the default depends on the card, and the groups decide the cached bits)."""
    if cfg.batch_frames is not None or cfg.overwrite:
        return cfg
    try:
        from muse_pipeline.cache.store import FeatureCache

        stored = FeatureCache.open(cfg.store_path()).fingerprint.get("videos_per_batch")
    except (OSError, ValueError, KeyError):
        return cfg
    if not stored:
        return cfg
    return replace(cfg, batch_frames=int(stored) * cfg.max_frames)


def run_extract(cfg: ExtractConfig | None = None, **kwargs) -> ExtractSummary:
    """Run (or resume) an extraction. Keyword arguments are ExtractConfig fields."""
    if cfg is None:
        cfg = ExtractConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either an ExtractConfig or keyword arguments, not both")
    from muse_pipeline.cache.lock import StoreLock, ensure_unlocked

    t0 = time.perf_counter()
    check_config(cfg)
    path = cfg.store_path()
    check_output(path)
    check_library_root(cfg, path)
    ensure_unlocked(path)
    cfg = _stored_batching(cfg)
    # absolute paths in the store, so that search thumbnails work from any directory
    index = load_dataset(cfg.dataset, Path(cfg.data_root).resolve(), cfg.splits)
    if not index.videos:
        raise InputError(f"no videos found for {cfg.dataset} under {cfg.data_root}; nothing to extract")
    encoder = ENCODER_CACHE.get(cfg.model, cfg.pretrained, "cpu")
    if cfg.max_words > encoder.context_length:
        raise InputError(f"--words must be <= {encoder.context_length} for {cfg.model}, got {cfg.max_words}")
    plan = plan_store(cfg, index, encoder)  # read-only: every check before the first write
    try:
        with StoreLock(path) as lock:
            return _run_locked(cfg, index, encoder, plan, lock.run, t0)
    except OSError as err:
        if err.errno in DISK_ERRNOS:
            raise OutputError(
                f"writing {path} failed ({err.strerror}); what was written is kept: free space or "
                "fix permissions, then run the same command again to resume"
            ) from err
        raise


def _run_locked(cfg: ExtractConfig, index: DatasetIndex, encoder, store_plan: StorePlan, run: str,
                t0: float) -> ExtractSummary:
    cache, staging, library = apply_store_plan(cfg, index, encoder, store_plan)
    if library:
        log.info("library %s: %s (files)", cfg.data_root, library)
    merge_staged_ledgers(cache, staging)
    retried = retry_failed_videos(cache, staging, retry_all=cfg.retry_failed)
    plan = choose_work_plan(cfg)
    log.info(plan.reason)
    in_process, n_local = plan.in_process, plan.local_workers
    # CPU cores shared out between the local workers; remote workers keep their own settings
    threads = max(1, (os.cpu_count() or 1) // n_local) if n_local and cfg.device == "cpu" else None
    decode_workers = cfg.decode_workers
    if decode_workers is None:
        decode_workers = default_decode_workers(cfg.device, n_local or 1)
    shard_jobs = plan_shard_jobs(cfg, cache, staging, threads, run, decode_workers)
    text_jobs = plan_text_jobs(cfg, cache, threads, run)
    done_before = count_finished(cache, staging)

    from muse_pipeline.progress import ExtractProgress

    live = int((cache.read_done() != RETIRED).sum())
    progress = ExtractProgress(total=live, completed=done_before, quiet=cfg.quiet)
    results: list[dict] = []
    with progress:
        if in_process:
            for job in text_jobs:
                process_texts(job)
            for job in shard_jobs:
                results.append(process_shard(job, on_video=progress.advance))
                merge_staged_ledgers(cache, staging)
        else:
            from muse_pipeline.extract.dask_runner import run_on_dask

            results = run_on_dask(cfg, n_local, shard_jobs, text_jobs, progress, staging, cache,
                                  decode_workers)

    cache = type(cache).open(cache.path, mode="r+")
    merge_staged_ledgers(cache, staging)
    done = cache.read_done()
    if (done != 0).all() and cache.read_text_done().all() and staging.exists():  # retired rows are not pending
        shutil.rmtree(staging)
    return ExtractSummary(
        store=Path(cache.path), n_videos=int((done != RETIRED).sum()), n_cached=int((done == 1).sum()),
        n_failed=int((done == 2).sum()), n_texts=cache.n_texts,
        frames_encoded=sum(r["frames"] for r in results), seconds=time.perf_counter() - t0,
        failures=cache.failures, max_failures=cfg.max_failures, warnings=cache.warnings,
        retried=retried, batch_sizes=[b for r in results for b in r.get("batch_sizes", [])],
        library=library, path_taken=plan.reason,
    )
