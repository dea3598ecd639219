"""Timing helper shared by the benchmark scripts (run as `python benchmarks/<name>.py`, which puts this
folder on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int, warmup: bool = False) -> float:
    """The fastest of `repeats` timed calls of fn(), in seconds; one untimed call first if `warmup`."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
