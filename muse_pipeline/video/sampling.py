"""Which frames a clip contributes: the CLIP4Clip 1-frame-per-second protocol (spec section 1).

Pure functions, no I/O, so that both decode backends share exactly one rule:

1. `sample_times`: one time per second from the window start (half-open window [start, end),
   clamped to the video), at least one.
2. `subsample`: more times than `max_frames` -> `linspace(0, n-1, max_frames).astype(int)`.
3. `displayed_frames`: for each time, the frame on screen then: the last frame whose presentation
   timestamp is <= t, from the stream's own timestamps (never index x average frame rate, which is
   wrong on variable frame rates and dropped frames).

Times are seconds from the video stream's start time ("stream time").
"""

from __future__ import annotations

import math

import numpy as np

# Guards t * fps against float round-off in `sample_times` (3.0 * 12.0 may land a hair under 36).
_EPS = 1e-6

# A frame whose timestamp lies at most this far after t counts as shown at t. It absorbs the
# rounding of timestamps that backends hand over as float32 seconds (decord: 1.2e-4 s at one
# hour) and of rational time bases; real frame intervals are >= 4 ms (240 fps).
TIME_TOLERANCE = 5e-4


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
    # Count of k >= 0 with lo + k/fps < hi - TIME_TOLERANCE: half-open window, and a sample needs
    # more than the tolerance before the end, so that containers that round the last frame's
    # duration differently (decord's FFmpeg 4 and PyAV's FFmpeg 8 on one file) agree.
    count = max(1, math.ceil((hi - lo - TIME_TOLERANCE) * fps - _EPS))
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


def clip_sample_times(
    duration: float,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    sample_fps: float = 1.0,
) -> np.ndarray:
    """Steps 1 and 2: the sample times (float64 [k], 1 <= k <= max_frames, increasing)."""
    times = sample_times(duration, start, end, sample_fps)
    return times[subsample(len(times), max_frames)]


def displayed_frames(frame_times: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Step 3: index (int64, shape of `times`) of the frame on screen at each time.

    `frame_times`: float64 [n], n >= 1, the presentation times of the video's frames in stream
    seconds, sorted. The frame shown at t is the last one with time <= t (+ TIME_TOLERANCE); a
    time before the first frame gets the first frame.
    """
    frame_times = np.asarray(frame_times, dtype=np.float64)
    if frame_times.ndim != 1 or len(frame_times) < 1:
        raise ValueError("the video has no frames")
    if np.any(np.diff(frame_times) < 0):
        raise ValueError("frame times must be sorted")
    idx = np.searchsorted(frame_times, np.asarray(times, dtype=np.float64) + TIME_TOLERANCE, side="right") - 1
    return np.clip(idx, 0, len(frame_times) - 1).astype(np.int64)


def video_duration(frame_times: np.ndarray, last_frame_duration: float | None = None) -> float:
    """How long the video plays (seconds of stream time): the end of its last frame.

    The last frame lasts `last_frame_duration` when the container says so (> 0), else the
    median interval of the last (up to) 8 frames, else 0 for a single frame.
    """
    frame_times = np.asarray(frame_times, dtype=np.float64)
    if len(frame_times) < 1:
        raise ValueError("the video has no frames")
    last = float(frame_times[-1])
    if last_frame_duration is not None and math.isfinite(last_frame_duration) and last_frame_duration > 0:
        return max(last + last_frame_duration, 0.0)
    steps = np.diff(frame_times[-9:])
    steps = steps[steps > 0]
    return max(last + (float(np.median(steps)) if len(steps) else 0.0), 0.0)
