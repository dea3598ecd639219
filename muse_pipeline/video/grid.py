"""Decode a file's frames on a grid of whole seconds, each grid time once (auto windows).

`decode_grid(path, step, first, count)` returns the frames on screen at grid times
`(first + k) * step` s, k < count, that lie before the video's end. It is one call of the public
`decode_clip_report` over the window [first*step, (first+count-1)*step + 1): that window's 1 fps
samples are the seconds first*step, first*step + 1, ..., and their uniform subsample to `count`
frames, `linspace(0, (count-1)*step, count)`, is exactly every `step`-th second (whole numbers in
floating point), so the decoder picks and decodes exactly the grid times, by the same rules as
every other clip (presentation timestamps, seeking, orientation, damaged frames).

Where the video ends before the last grid time the decoder samples fewer seconds and the times it
returns are not the grid: the seconds it did sample tell where the video ends, and the grid times
before that end are decoded again in a second call (only a file whose header over-states its length
pays that). `GridFrames.count` then says how many of the `count` grid times exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from muse_pipeline.video.decode import decode_clip_report


@dataclass
class GridFrames:
    """frames: uint8 [m, H, W, 3] (or a list of m [H_i, W_i, 3]) at grid times (first + k) * step,
    k < m, m = the grid times before the video's end (0 <= m <= the count asked); times float64 [m];
    warnings: the decoder's notes."""

    frames: np.ndarray | list[np.ndarray]
    times: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.times)


def grid_times(step: int, first: int, count: int) -> np.ndarray:
    """float64 [count]: the grid times (first + k) * step seconds."""
    return (first + np.arange(count, dtype=np.float64)) * float(step)


def _decode(path: Path | str, step: int, first: int, count: int, backend: str):
    start = float(first * step)
    end = float((first + count - 1) * step + 1)
    return decode_clip_report(path, count, start=start, end=end, backend=backend)


def decode_grid(path: Path | str, step: int, first: int, count: int, backend: str = "pyav") -> GridFrames:
    """Frames at the grid times (first + k) * step, k < count, before the video's end (see the module
    docstring). `step`, `first` whole numbers (seconds, grid index), count >= 1. DecodeError as
    `decode_clip_report`."""
    if step < 1 or first < 0 or count < 1 or int(step) != step or int(first) != first:
        raise ValueError(f"need whole step >= 1, first >= 0, count >= 1; got {step}, {first}, {count}")
    want = grid_times(step, first, count)
    clip = _decode(path, step, first, count, backend)
    if np.array_equal(clip.times, want):
        return GridFrames(clip.frames, clip.times, list(clip.warnings))
    # The video ends earlier: its 1 fps samples from the start stopped at second `last`.
    start = float(first * step)
    if clip.times[0] != start:  # the window starts at or after the end: no grid time exists
        return GridFrames(np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0), list(clip.warnings))
    seconds = int(round(float(clip.times[-1]) - start))
    exist = seconds // step + 1
    clip = _decode(path, step, first, exist, backend)
    if not np.array_equal(clip.times, want[:exist]):
        raise AssertionError(f"{path}: grid decode got times {clip.times.tolist()}, wanted {want[:exist].tolist()}")
    return GridFrames(clip.frames, clip.times, list(clip.warnings))
