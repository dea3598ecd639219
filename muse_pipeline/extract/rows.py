"""The rows a store gets for a dataset: auto windows of long folder files, and each row's file facts.

`planned_rows(index, spec, durations)` takes each file's probed length (`probe_files`, run before
the store exists and only where auto windows are on: the folder dataset; annotated datasets keep
their clips and pass None, recording no length), expands long files into window rows
(`windows.expand_windows`) and returns the rows with their `RowFacts` (duration, file size and
mtime_ns: what a growing library compares to find changed files).
"""

from __future__ import annotations

import math

import numpy as np

from muse_pipeline.cache.schema import RowFacts
from muse_pipeline.data.base import DatasetIndex
from muse_pipeline.extract.staging import file_state
from muse_pipeline.extract.windows import WindowSpec, expand_windows


def file_key(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file; (-1, -1) when it cannot be read."""
    state = file_state(path)
    return (-1, -1) if state["size"] is None else (int(state["size"]), int(state["mtime_ns"]))


def probe_files(index: DatasetIndex) -> dict[str, float]:
    """file id -> probed length (s) of each file of `index` (NaN unknown), each file probed once."""
    from muse_pipeline.video.probe import probe_duration

    durations: dict[str, float] = {}
    for video in index.videos:
        if video.source_id not in durations:
            durations[video.source_id] = probe_duration(video.path)
    return durations


def planned_rows(index: DatasetIndex, spec: WindowSpec, durations: dict[str, float] | None
                 ) -> tuple[DatasetIndex, RowFacts]:
    """The store rows of `index` (long files cut into windows per `spec`) and their facts.
    `durations`: file id -> seconds (None: not probed; no windows, lengths unknown)."""
    rows = expand_windows(index, durations, spec) if durations is not None else index
    known = durations or {}
    duration = np.array([known.get(v.source_id, math.nan) for v in rows.videos], dtype=np.float64)
    states = {}
    for v in rows.videos:
        if str(v.path) not in states:
            states[str(v.path)] = file_key(str(v.path))
    state = np.array([states[str(v.path)] for v in rows.videos], dtype=np.int64).reshape(-1, 2)
    return rows, RowFacts(duration, state[:, 0], state[:, 1])
