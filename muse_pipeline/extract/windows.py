"""Auto windows: a long file of the folder dataset becomes several rows (moments) on one time grid.

A `WindowSpec` (window W, stride s, frames T, whole seconds) fixes a grid per file: grid time j is
`j * step` seconds from the file's start, `step = W / T` (1 when W < T: a window then holds W
frames). Window i starts at `i * stride` (a multiple of `step`) and holds the grid times
`[i * stride, i * stride + W)` that lie before the file's end, at most T. Overlapping windows share
grid times, so a file's distinct frames are decoded and encoded once and scattered into its rows
(`extract/grid.py`).

The grid is the 1-frame-per-second protocol of `video/sampling.py` thinned to every `step`-th
second, which is why every length is a whole number of seconds: a grid time is exactly a time the
decoder samples (`video/grid.py`).

Which files: a file of the folder dataset that no caption names (captions keep the clips they name)
and that is longer than one window. A file not longer than W stays ONE whole-file row with its own
id, sampled as today (`clip_sample_times`), so short clips keep their bits. A window row's id is
`"<file id>@<start:g>-<end:g>"`, its end `min(start + W, duration)`; the rows of one file are
consecutive in start order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem
from muse_pipeline.errors import InputError


@dataclass(frozen=True)
class WindowSpec:
    """Window and stride in whole seconds for rows of `frames` frames; window 0: no auto windows."""

    window: int
    stride: int
    frames: int

    @property
    def enabled(self) -> bool:
        return self.window > 0

    @property
    def step(self) -> int:
        """Seconds between a window's frames (whole seconds, >= 1)."""
        return max(1, self.window // self.frames)

    @property
    def frames_per_window(self) -> int:
        return min(self.frames, self.window // self.step)

    def describe(self) -> str:
        """The fingerprint's words for it: a different grid never mixes with this one."""
        if not self.enabled:
            return "none"
        return f"window={self.window};stride={self.stride};step={self.step};grid=1fps-every-step"


def default_window_spec(frames: int) -> WindowSpec:
    """Window 2 s per frame (24 s at 12 frames), stride half a window rounded up to the 2 s step:
    a short clip stays whole, a 3-minute video gives 14 moments, a 10-minute one 49 of 24 s."""
    step = 2
    return WindowSpec(window=step * frames, stride=step * math.ceil(frames / 2), frames=frames)


def window_spec(window: int | None, stride: int | None, frames: int) -> WindowSpec:
    """The spec for `--window` / `--stride` (None: the defaults), checked (InputError)."""
    default = default_window_spec(frames)
    if window is None and stride is None:
        return default
    if window is not None and window < 0:
        raise InputError(f"--window must be >= 0 seconds (0: whole files), got {window}")
    if window == 0:
        if stride is not None:
            raise InputError("--stride has no effect with --window 0 (whole files, no windows); drop one of them")
        return WindowSpec(0, 0, frames)
    window = default.window if window is None else window
    if window >= frames and window % frames:
        lower, upper = frames * (window // frames), frames * (window // frames + 1)
        raise InputError(
            f"--window {window} does not split into {frames} frames at whole seconds; use a multiple of "
            f"{frames} (e.g. {lower or upper} or {upper}) or --frames that divides {window}"
        )
    step = max(1, window // frames)
    if stride is None:
        stride = step * math.ceil(window / step / 2)
    if stride < 1 or stride % step:
        raise InputError(
            f"--stride must be a positive multiple of the {step} s between a window's frames "
            f"(--window {window} / {frames} frames), got {stride}"
        )
    return WindowSpec(window=window, stride=stride, frames=frames)


def window_starts(duration: float, spec: WindowSpec) -> list[int]:
    """Start seconds of the windows of a file lasting `duration` s: [0] when it is not longer than one
    window (or its length is unknown), else 0, stride, ... until a window reaches the end; never a
    start at or after the end (a stride longer than the window could reach past it)."""
    if not spec.enabled or not math.isfinite(duration) or duration <= spec.window:
        return [0]
    count = math.ceil((duration - spec.window) / spec.stride) + 1
    return [i * spec.stride for i in range(count) if i * spec.stride < duration]


def is_windowed(duration: float, spec: WindowSpec) -> bool:
    """Whether a file lasting `duration` s is cut into windows (else it is one whole-file row)."""
    return len(window_starts(duration, spec)) > 1


def window_id(file_id: str, start: float, end: float) -> str:
    return f"{file_id}@{start:g}-{end:g}"


def expand_windows(index: DatasetIndex, durations: dict[str, float], spec: WindowSpec) -> DatasetIndex:
    """`index` with each whole-file, uncaptioned video longer than one window replaced by its window
    rows (consecutive, in start order); captions follow their video. `durations`: file id -> probed
    seconds (NaN: unknown, the file stays whole). Window rows carry `source` = the file id and
    `grid_step` = `spec.step`."""
    if not spec.enabled:
        return index
    captioned = {c.video_index for c in index.captions}
    videos: list[VideoItem] = []
    new_position: dict[int, int] = {}
    for i, video in enumerate(index.videos):
        new_position[i] = len(videos)
        whole = video.start is None and video.end is None
        duration = durations.get(video.id, math.nan)
        if not whole or i in captioned or not is_windowed(duration, spec):
            videos.append(video)
            continue
        for start in window_starts(duration, spec):
            end = min(start + spec.window, duration)
            videos.append(VideoItem(window_id(video.id, start, end), video.path, video.split, start=float(start),
                                    end=float(end), source=video.id, grid_step=float(spec.step)))
    captions = tuple(CaptionItem(c.text, new_position[c.video_index], c.split) for c in index.captions)
    return DatasetIndex(index.name, index.root, tuple(videos), captions, index.annotation_checksum, index.extra)


def grid_indices(start: float, end: float, step: float, frames: int) -> np.ndarray:
    """Grid indices (int64, increasing, 1..frames of them) of a window row [start, end) on a grid of
    `step` seconds: j = start/step + k for k < frames while j * step < end (always the first)."""
    first = int(round(start / step))
    count = max(1, min(frames, math.ceil((end - start) / step - 1e-9)))
    return first + np.arange(count, dtype=np.int64)
