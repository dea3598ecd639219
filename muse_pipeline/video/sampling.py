"""Which frames a clip contributes: the CLIP4Clip 1-frame-per-second protocol (spec section 1).

Pure functions, no I/O, so that both decode backends share exactly one rule:

1. `sample_times`: one timestamp per second from the window start (half-open window
   [start, end), clamped to the video), at least one.
2. `subsample`: more timestamps than `max_frames` -> `linspace(0, n-1, max_frames).astype(int)`.
3. `frame_indices`: timestamp -> frame index through the stream's average frame rate,
   clamped to the frames that exist.
"""

from __future__ import annotations

import math

import numpy as np

# Guards t * fps against float round-off (3.0 * 12.0 may land a hair under 36).
_EPS = 1e-6


def clamp_window(
    duration: float, start: float | None = None, end: float | None = None
) -> tuple[float, float]:
    """The window [start, end) clamped into [0, duration]; None means the video's own bound.

    A window that starts at or after the end of the video collapses to (duration, duration):
    its one sample then maps to the last frame instead of being an error.
    """
    if not math.isfinite(duration) or duration < 0:
        raise ValueError(f"duration must be a finite number >= 0, got {duration!r}")
    lo = 0.0 if start is None else float(start)
    hi = duration if end is None else float(end)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"window bounds must not be NaN, got start={start!r}, end={end!r}")
    if start is not None and end is not None and hi < lo:
        raise ValueError(f"window end {end!r} is before its start {start!r}")
    lo = min(max(lo, 0.0), duration)
    hi = min(max(hi, lo), duration)
    return lo, hi


def sample_times(
    duration: float, start: float | None = None, end: float | None = None, fps: float = 1.0
) -> np.ndarray:
    """Sample timestamps (seconds) at `fps` over [start, end) of a video lasting `duration` s.

    Returns float64 [k], k >= 1: start, start + 1/fps, ... while < end. A window shorter than
    one step (or a video under 1 s) still yields its start time.
    """
    if fps <= 0:
        raise ValueError(f"sampling fps must be > 0, got {fps!r}")
    lo, hi = clamp_window(duration, start, end)
    # Count of k >= 0 with lo + k/fps < hi; the epsilon keeps an exact end out (half-open window).
    count = max(1, math.ceil((hi - lo) * fps - _EPS))
    return lo + np.arange(count, dtype=np.float64) / fps


def subsample(n: int, max_frames: int) -> np.ndarray:
    """Positions (int64 [min(n, max_frames)]) to keep out of n samples (CLIP4Clip uniform rule)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if n > max_frames:
        return np.linspace(0, n - 1, max_frames).astype(int)
    return np.arange(n, dtype=int)


def frame_indices(times: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    """Frame index (int64, same shape as `times`) shown at each time: floor(t * fps), clamped.

    `fps` is the stream's average frame rate and `n_frames` the number of frames it holds;
    times past the last frame map to the last frame.
    """
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"video frame rate must be a finite number > 0, got {fps!r}")
    if n_frames < 1:
        raise ValueError(f"the video has no frames (n_frames={n_frames})")
    idx = np.floor(np.asarray(times, dtype=np.float64) * fps + _EPS).astype(np.int64)
    return np.clip(idx, 0, n_frames - 1)


def clip_frame_indices(
    n_frames: int,
    fps: float,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    sample_fps: float = 1.0,
) -> np.ndarray:
    """The whole protocol: indices (int64 [k], 1 <= k <= max_frames, non-decreasing) to decode.

    The video's duration is n_frames / fps, so that every backend derives it from the same two
    numbers rather than from container metadata (which includes audio and may disagree).
    """
    if n_frames < 1:
        raise ValueError(f"the video has no frames (n_frames={n_frames})")
    duration = n_frames / fps
    times = sample_times(duration, start, end, sample_fps)
    times = times[subsample(len(times), max_frames)]
    return frame_indices(times, fps, n_frames)
