"""Runs an extraction's jobs on dask: a LocalCluster of worker processes, or a remote scheduler.

One task at a time per worker process; on CUDA one worker per GPU, holding the GPU as a dask
resource. dask retries a task whose worker died (process_shard then counts the crash); a task that
fails for good leaves its shard resumable and the run ends with `ExtractIncomplete`. While tasks
run, the client merges the ledgers of written shards and advances the progress bar.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from muse_pipeline.errors import UserError
from muse_pipeline.extract.staging import count_finished, merge_staged_ledgers
from muse_pipeline.extract.worker import process_shard, process_texts

if TYPE_CHECKING:
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.extract.jobs import ShardJob, TextJob
    from muse_pipeline.progress import ExtractProgress

log = logging.getLogger(__name__)


class ExtractIncomplete(UserError, RuntimeError):
    """Some shards could not be finished in this run; rerunning resumes them."""

    exit_code = 1


def quiet_dask_logging(level: int = logging.ERROR) -> None:
    """distributed logs at INFO in the client and in every worker (nanny chatter, "killed by
    signal 9", dashboard address): keep only `level` and up. Workers read the same levels from the
    dask config, which LocalCluster hands to the processes it spawns."""
    import dask

    name = logging.getLevelName(level).lower()
    dask.config.set({"logging": {"distributed": name, "distributed.client": name,
                                 "distributed.nanny": name, "distributed.scheduler": name,
                                 "distributed.worker": name, "distributed.core": name,
                                 "bokeh": name, "tornado": "critical"}})
    for logger in ("distributed", "distributed.client", "distributed.nanny", "distributed.scheduler",
                   "distributed.worker", "distributed.core", "distributed.comm", "tornado", "bokeh"):
        logging.getLogger(logger).setLevel(max(level, logging.getLogger(logger).level))


def run_on_dask(cfg: ExtractConfig, n_workers: int | None, shard_jobs: list[ShardJob],
                text_jobs: list[TextJob], progress: ExtractProgress, staging: Path, cache: FeatureCache,
                decode_workers: int) -> list[dict]:
    """Run every job; returns the results of the shard jobs. `n_workers` local workers, unless
    `cfg.scheduler` names a running scheduler (its workers keep their own settings)."""
    import dask
    from distributed import Client, LocalCluster

    level = logging.ERROR if cfg.quiet else logging.WARNING
    quiet_dask_logging(level)
    cluster = None
    gpu = cfg.device.startswith("cuda")
    resources = None
    # decode processes are children of the worker: a daemonic worker cannot have them
    with dask.config.set({"distributed.worker.daemon": decode_workers == 0}):
        if cfg.scheduler:
            client = Client(cfg.scheduler)
            workers = client.scheduler_info().get("workers", {}).values()
            if gpu and any("GPU" in (w.get("resources") or {}) for w in workers):
                resources = {"GPU": 1}
        else:
            # One task at a time per worker process: its torch thread pool (ShardJob.threads) uses the
            # cores; on CUDA one worker per GPU, holding the GPU as a dask resource.
            cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True,
                dashboard_address=":0" if cfg.dashboard else None, silence_logs=level,
                resources={"GPU": 1} if gpu else None,
                # the scheduler serves a few HTTP routes even without the dashboard, by default on
                # 8787: a random free port avoids "Port 8787 is already in use" warnings
                scheduler_kwargs={"dashboard_address": ":0"},
            )
            resources = {"GPU": 1} if gpu else None
            client = Client(cluster)
            if cfg.dashboard:
                log.warning("dask dashboard: %s", client.dashboard_link)
    results: list[dict] = []
    errors: list[str] = []
    try:
        # dask retries a task whose worker died; process_shard then counts the crash.
        futures = [client.submit(process_texts, job, pure=False, resources=resources) for job in text_jobs]
        futures += [client.submit(process_shard, job, pure=False, resources=resources) for job in shard_jobs]
        pending = set(futures)
        while pending:
            finished = {f for f in pending if f.done()}
            pending -= finished
            if not finished:
                time.sleep(0.25)
            for future in finished:
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001  (KilledWorker: the shard stays resumable)
                    errors.append(f"{future.key}: {type(exc).__name__}: {exc}")
                    log.error("task %s failed: %s", future.key, exc)
                    continue
                if "shard" in result:
                    results.append(result)
            if finished:
                merge_staged_ledgers(cache, staging)
            progress.update(count_finished(cache, staging))
    finally:
        # closing on Ctrl-C / SIGTERM kills the workers: their in-flight records name this run,
        # which has ended, so the next run does not count them as crashes
        quiet_dask_logging(logging.CRITICAL)
        client.close()
        if cluster is not None:
            cluster.close()
    if errors:
        raise ExtractIncomplete(
            f"{len(errors)} task(s) failed; finished work is kept, run the same command again to "
            "resume. First: " + errors[0][:300]
        )
    return results
