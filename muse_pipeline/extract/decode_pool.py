"""Decode + preprocess of one video, run ahead of the encoder in threads or in decode processes.

`decode_and_preprocess` never raises for a bad video: its `DecodedVideo` crosses process boundaries
as data. The pools are kept per process (`decode_pool(n)`), so a worker that runs many shard tasks
starts its pool once; `decode_retrying` survives a decode process that died.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedVideo:
    """One video ready for the encoder, or why it is not: `pixels` float32 [n, 3, S, S] (1 <= n <=
    frames) with the decoder's `warnings`, or `pixels` None and `failure` the reason."""

    pixels: np.ndarray | None
    warnings: tuple[str, ...] = ()
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def failure_reason(exc: BaseException) -> str:
    """One line for the ledger: a DecodeError's own reason, else `ExceptionName: first line`."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if name == "DecodeError":
        return getattr(exc, "reason", None) or text or "decode failed"
    return f"{name}: {text}"[:300]


def decode_and_preprocess(path: str, frames: int, start: float | None, end: float | None, decoder: str,
                          image_size: int, mean, std) -> DecodedVideo:
    """Decode up to `frames` sampled frames of [start, end] and preprocess them for the encoder."""
    from muse_pipeline.video.decode import decode_clip_report
    from muse_pipeline.video.transforms import preprocess_frames

    try:
        clip = decode_clip_report(path, frames, start=start, end=end, backend=decoder)
        pixels = preprocess_frames(clip.frames, image_size, mean, std).numpy()
        return DecodedVideo(pixels, tuple(str(w) for w in clip.warnings))
    except Exception as exc:  # noqa: BLE001  (a bad video must never stop the shard)
        return DecodedVideo(None, failure=failure_reason(exc))


def _init_decode_process() -> None:
    import threading

    import torch

    torch.set_num_threads(1)  # one core per decode process: the pool size is the parallelism
    # A dask worker that is killed (Ctrl-C, a crash) cannot shut its pool down: without this its
    # decode processes would live on as orphans, so each one watches its parent. (PR_SET_PDEATHSIG
    # would fire when the dask thread that spawned the pool ends, not the process: not used.)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()


_POOLS: dict[int, Executor] = {}


def decode_pool(n: int) -> Executor:
    """n == 0: two threads (PyAV and decord release the GIL); n >= 1: n spawned processes. Kept per
    process and per n."""
    if n not in _POOLS:
        if n == 0:
            _POOLS[n] = ThreadPoolExecutor(max_workers=2)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            if multiprocessing.current_process().daemon:
                # a dask worker started with daemon=True (remote clusters' default) cannot have
                # children (set distributed.worker.daemon: false in the workers' dask config)
                log.warning("this dask worker is daemonic: decoding in threads instead of %d processes", n)
                return decode_pool(0)
            _POOLS[n] = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_decode_process)
    return _POOLS[n]


def reset_decode_pool(n: int) -> None:
    """Drop the pool of size n (a broken one); the next `decode_pool(n)` starts a fresh one."""
    pool = _POOLS.pop(n, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def shutdown_decode_pools() -> None:
    """Drop every pool of this process."""
    for n in list(_POOLS):
        reset_decode_pool(n)


def decode_retrying(future: Future, decode_workers: int, args: tuple, decode: Callable = decode_and_preprocess,
                    died: Callable[[str], Any] | None = None) -> Any:
    """The result of `future` (a `decode(*args)` on `decode_pool(decode_workers)`; `decode` never
    raises for a bad video: `decode_and_preprocess`, or the grid's decode). A decode process that died
    is retried alone in a fresh pool; if it dies again, this video is the one that kills the decoder:
    `died(reason)` is the result (default: a failed `DecodedVideo`)."""
    try:
        return future.result()
    except BrokenProcessPool:
        reset_decode_pool(decode_workers)
        try:
            return decode_pool(decode_workers).submit(decode, *args).result()
        except BrokenProcessPool:
            reset_decode_pool(decode_workers)
            reason = "the decoder process died on this video"
            return died(reason) if died is not None else DecodedVideo(None, failure=reason)
