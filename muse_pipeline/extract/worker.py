"""The workers: `process_shard` (videos of one shard) and `process_texts` (one chunk of texts).

They run on a dask worker or inline (`--workers 0`) and write only while their run holds the
store's lock (`Superseded` otherwise). Within a shard, videos are encoded in fixed groups of
`videos_per_batch` consecutive offsets (`encoder_groups`): one encoder forward per group, the same
groups in every run, so a resumed run is bit-identical to an uninterrupted one. Decoding runs ahead
of the encoder on `decode_pool`; after a crash (see `staging`) a shard goes one video at a time,
decoded in the worker's own process. Auto-window rows are not in those groups: the rows of one
file form a unit (`grid.py`) whose distinct frames are decoded and encoded once.

Test-only hooks (never set them in production): PAUSE_ENV pauses a run for good once this many
videos were staged by the process, with the next group already marked in flight, so that a test
decides exactly when to interrupt it (the run writes PAUSED_MARKER in the staging folder first);
CRASH_ENV makes a dask worker die (SIGKILL) when the given video id is in flight.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from muse_pipeline.atomic import atomic_write_bytes
from muse_pipeline.errors import UserError
from muse_pipeline.extract.decode_pool import (
    DecodedVideo,
    decode_and_preprocess,
    decode_pool,
    decode_retrying,
    failure_reason,
)
from muse_pipeline.extract.encoders import ENCODER_CACHE
from muse_pipeline.extract.grid import GridUnit, grid_units, process_unit
from muse_pipeline.extract.jobs import ShardJob, TextJob
from muse_pipeline.extract.staging import ShardStaging

TEXT_BATCH = 256
PAUSE_ENV = "MUSE_TEST_PAUSE_AFTER"
CRASH_ENV = "MUSE_TEST_CRASH_ID"
PAUSED_MARKER = "paused"

# Videos staged by this process (what PAUSE_ENV counts).
_staged_in_process = 0


class Superseded(UserError):
    """This run no longer owns the store's lock (another run took it over): stop writing."""


def check_owner(store: str, run: str) -> None:
    """Superseded unless run `run` still holds the lock of `store` (an empty run id: no check)."""
    if not run:
        return
    from muse_pipeline.cache.lock import read_owner

    owner = read_owner(store) or {}
    if owner.get("run") != run:
        raise Superseded(f"{store}: another run now holds the store's lock; this task stops")


def set_threads(threads: int | None) -> None:
    """dask's nanny pins OMP_NUM_THREADS=1 in every worker (its pre-spawn-environ), which would leave
    a CPU worker's encoder on one core; the client decides instead."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def worker_device(device: str) -> str:
    """On a multi-GPU machine each dask worker takes the GPU of its own index."""
    if device != "cuda":
        return device
    import torch

    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % max(torch.cuda.device_count(), 1)}"


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def run_test_hooks(job: ShardJob, in_flight: list[int]) -> None:
    """PAUSE_ENV / CRASH_ENV (tests only), called with the offsets `in_flight` recorded."""
    crash_id = os.environ.get(CRASH_ENV)
    if crash_id and _in_dask_worker() and crash_id in {job.ids[offset] for offset in in_flight}:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_ENV)
    if pause and _staged_in_process >= int(pause):
        atomic_write_bytes(Path(job.staging) / PAUSED_MARKER, str(os.getpid()).encode())
        while True:  # until the test interrupts or kills this process
            time.sleep(0.05)


def encoder_groups(n: int, done: np.ndarray, size: int) -> list[list[int]]:
    """Fixed groups of `size` consecutive offsets (the same in every run), keeping the pending ones."""
    groups = []
    for first in range(0, n, size):
        members = [offset for offset in range(first, min(first + size, n)) if done[offset] == 0]
        if members:
            groups.append(members)
    return groups


def process_shard(job: ShardJob, on_video: Callable[[], None] | None = None) -> dict:
    """Extract every pending video of one shard that is not staged yet, then write the shard.

    Runs on a dask worker (or inline with --workers 0). Returns {shard, frames, cached, failures,
    warnings, batch_sizes}: counts, this shard's failures and decoder warnings, and the encoder
    batch sizes (frames) it ran.
    """
    global _staged_in_process

    from muse_pipeline.cache.store import FeatureCache

    set_threads(job.threads)
    check_owner(job.store, job.run)
    shard = ShardStaging(job)
    n = job.hi - job.lo
    cache = FeatureCache.open(job.store, mode="r")
    done_before = cache.read_done()[job.lo : job.hi]

    shard.fail_repeat_crashers(done_before)
    units = grid_units(job.paths, job.windows, job.sources, job.grid_steps, job.frames) if job.grid_steps else []
    clip_done = done_before.copy()
    for unit in units:
        clip_done[list(unit.offsets)] = 1  # not in the clip groups
    # Whole groups are redone when any member is missing: the encoder batch must be the same as in
    # an uninterrupted run for the bits to be the same.
    groups = [g for g in encoder_groups(n, clip_done, job.videos_per_batch)
              if any(not shard.staged(offset) for offset in g)]
    pending_units = [u for u in units if _unit_pending(u, done_before, shard)]
    one_at_a_time = bool(shard.crashes)  # after a crash: one video at a time, decoded in this process
    frames_encoded, batch_sizes = 0, []
    if groups or pending_units:
        encoder = ENCODER_CACHE.get(job.model, job.pretrained, worker_device(job.device), job.precision)
        preprocessing = (encoder.image_size, encoder.mean, encoder.std)

        def decode_args(offset: int) -> tuple:
            start, end = job.windows[offset]
            return (job.paths[offset], job.frames, start, end, job.decoder, *preprocessing)

        decoded: dict[int, DecodedVideo] = {}
        if one_at_a_time:
            for group in groups:
                for offset in group:
                    if shard.fail(offset).exists():
                        continue
                    shard.set_inflight([offset])
                    run_test_hooks(job, [offset])
                    decoded[offset] = decode_and_preprocess(*decode_args(offset))
                shard.set_inflight(group)  # the encoder's turn: a crash now blames the group
                frames_encoded += _encode_group(shard, encoder, group, decoded, batch_sizes, [])
                _staged_in_process += len(group)
                if on_video is not None:
                    for _ in group:
                        on_video()
        else:
            pool = decode_pool(job.decode_workers)
            max_prefetch = max(2, 2 * job.decode_workers, 2 * job.videos_per_batch)
            queue = deque(offset for g in groups for offset in g if not shard.fail(offset).exists())
            futures: dict[int, Future] = {}

            def submit_decodes() -> None:
                while queue and len(futures) < max_prefetch:
                    offset = queue.popleft()
                    futures[offset] = pool.submit(decode_and_preprocess, *decode_args(offset))

            for group in groups:
                check_owner(job.store, job.run)
                submit_decodes()
                shard.set_inflight(sorted(set(group) | set(futures)))
                run_test_hooks(job, group)
                for offset in group:
                    if offset not in futures:
                        continue  # staged as failed above
                    decoded[offset] = decode_retrying(futures.pop(offset), job.decode_workers,
                                                      decode_args(offset))
                    submit_decodes()
                frames_encoded += _encode_group(shard, encoder, group, decoded, batch_sizes, list(futures))
                _staged_in_process += len(group)
                if on_video is not None:
                    for _ in group:
                        on_video()
        for unit in pending_units:
            check_owner(job.store, job.run)
            frames, sizes = _process_grid_unit(job, shard, encoder, unit, done_before, preprocessing,
                                               None if one_at_a_time else job.decode_workers,
                                               on_video)
            frames_encoded += frames
            batch_sizes.extend(sizes)
        shard.clear_inflight()

    # Every video of the shard is staged: write the shard once, then the done flags.
    check_owner(job.store, job.run)
    cache = FeatureCache.open(job.store, mode="r+")
    done, failures, warnings = shard.write_shard(cache, done_before)
    return {"shard": job.shard, "frames": frames_encoded, "cached": int((done == 1).sum()),
            "failures": failures, "warnings": warnings, "batch_sizes": batch_sizes}


def _unit_pending(unit: GridUnit, done_before: np.ndarray, shard: ShardStaging) -> bool:
    return any(done_before[o] == 0 and not shard.staged(o) for o in unit.offsets)


def _process_grid_unit(job: ShardJob, shard: ShardStaging, encoder, unit: GridUnit, done_before: np.ndarray,
                       preprocessing: tuple, decode_workers: int | None,
                       on_video: Callable[[], None] | None) -> tuple[int, list[int]]:
    """One file's auto-window rows (all redone when any is missing: the same chunks and batches as an
    uninterrupted run); stages the pending, unstaged ones. `decode_workers`: as `process_unit`."""
    pending = {o for o in unit.offsets if done_before[o] == 0 and not shard.staged(o)}
    shard.set_inflight(sorted(pending))
    run_test_hooks(job, sorted(pending))

    def stage_tokens(offset: int, array: np.ndarray, warnings: list[str]) -> None:
        shard.stage_tokens(offset, array, warnings)
        _advance(offset)

    def stage_failure(offset: int, reason: str) -> None:
        shard.stage_failure(offset, reason)
        _advance(offset)

    def _advance(offset: int) -> None:
        global _staged_in_process
        shard.video_done(offset)
        _staged_in_process += 1
        if on_video is not None:
            on_video()

    batch = max(1, job.videos_per_batch * job.frames)
    result = process_unit(unit, pending, encoder, (job.decoder, *preprocessing), batch, decode_workers,
                          stage_tokens, stage_failure)
    shard.clear_inflight()
    return result


def _encode_group(shard: ShardStaging, encoder, group: list[int], decoded: dict[int, DecodedVideo],
                  batch_sizes: list[int], prefetched: list[int]) -> int:
    """One encoder forward over the frames of `group`'s decoded videos; stage each video. Returns
    the frames encoded; `prefetched` (decodes still running) stay recorded in flight."""
    import torch

    ok = [offset for offset in group if offset in decoded and decoded[offset].ok]
    for offset in group:
        if offset in decoded and not decoded[offset].ok:
            shard.stage_failure(offset, str(decoded[offset].failure))
    encoded = 0
    if ok:
        pixels = torch.from_numpy(np.concatenate([decoded[offset].pixels for offset in ok]))
        counts = [len(decoded[offset].pixels) for offset in ok]
        try:
            with torch.inference_mode():
                tokens = encoder.encode_frames(pixels).to(torch.float16).numpy()
            error = None
        except Exception as exc:  # noqa: BLE001  (a model error fails these videos, not the shard)
            tokens, error = None, failure_reason(exc)
        batch_sizes.append(int(pixels.shape[0]))
        start = 0
        for offset, count in zip(ok, counts, strict=True):
            if tokens is None:
                shard.stage_failure(offset, error or "encoder failed")
                continue
            array = tokens[start : start + count]
            start += count
            if not np.isfinite(array).all():
                shard.stage_failure(offset, "non-finite values in the encoder output")
                continue
            shard.stage_tokens(offset, array, decoded[offset].warnings)  # OSError (disk full) stops the task
            encoded += count
    for offset in group:
        decoded.pop(offset, None)
        shard.video_done(offset)
    shard.set_inflight(sorted(prefetched)) if prefetched else shard.clear_inflight()
    return encoded


def process_texts(job: TextJob) -> dict:
    """Encode the texts of rows [lo, hi) from their cached token ids (one chunk, one writer).
    Returns {lo, hi}."""
    import torch

    from muse_pipeline.cache.store import FeatureCache

    set_threads(job.threads)
    cache = FeatureCache.open(job.store, mode="r+")
    ids = cache.read_text_tokens(np.arange(job.lo, job.hi))
    encoder = ENCODER_CACHE.get(job.model, job.pretrained, worker_device(job.device), job.precision)
    out = []
    for start in range(0, len(ids), TEXT_BATCH):
        with torch.inference_mode():
            emb = encoder.encode_texts(ids[start : start + TEXT_BATCH])
        out.append(emb.to(torch.float16).cpu().numpy())
    embeddings = np.concatenate(out) if out else np.zeros((0, cache.dim), np.float16)
    check_owner(job.store, job.run)
    cache.write_texts(job.lo, embeddings=embeddings)
    return {"lo": job.lo, "hi": job.hi}
