"""Presentation times out of the timestamps a decoder hands back, repaired frame by frame.

`best_effort_ticks(pts, dts)` follows FFmpeg's best-effort timestamp (libavcodec's
guess_correct_pts), decided once for the whole stream from its totals rather than frame by frame
from running counts: take the frames' pts unless they go backwards (or are missing) more often
than their dts do, then take the dts. Where the chosen series is bad only in places (two frames share a
pts, one is missing or jumps back), only those frames are repaired: the frames of a longest strictly
increasing run of the series keep their timestamps, every other frame gets a time interpolated by
position between its kept neighbours (or extrapolated at the ends by the typical frame step). A
few bad timestamps never cost the good ones. One exception, a constant-rate series that only
repeats a value now and then (every step 0 or one frame): its frames are counted (see
`_constant_step`).

`crosses_wrap`: whether a stream's timestamps pass a multiple of 2^bits (an MPEG-TS/PS 33-bit clock
that wraps inside the file). FFmpeg's demuxer unwraps the timestamps it reads in order, but its
seeking compares wrapped ones, so such a stream is decoded sequentially (see `decode`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def _faults(ticks: Sequence[int | None]) -> int:
    """How often a timestamp is missing or not after the last one (guess_correct_pts' count)."""
    faults, last = 0, None
    for t in ticks:
        if t is None:
            faults += 1
            continue
        if last is not None and t <= last:
            faults += 1
        last = t
    return faults


def longest_increasing(values: Sequence[int | float | None]) -> np.ndarray:
    """bool [n]: the positions of one longest strictly increasing subsequence (None never in it).

    Among equally long ones it prefers earlier positions: of two frames that share a timestamp,
    the first keeps it (the second is the faulty one, as FFmpeg counts faults). Patience sorting,
    O(n log n), run backwards as a longest decreasing subsequence of the negated values.
    """
    tails: list[float] = []  # tails[k]: smallest last value of a run of length k + 1 (negated, backwards)
    tail_at: list[int] = []  # its position
    parent = [-1] * len(values)
    for i in range(len(values) - 1, -1, -1):
        if values[i] is None:
            continue
        v = -values[i]
        k = bisect.bisect_left(tails, v)  # strictly: an equal value replaces, never extends
        if k == len(tails):
            tails.append(v)
            tail_at.append(i)
        else:
            tails[k] = v
            tail_at[k] = i
        parent[i] = tail_at[k - 1] if k > 0 else -1
    keep = np.zeros(len(values), dtype=bool)
    i = tail_at[-1] if tail_at else -1
    while i >= 0:
        keep[i] = True
        i = parent[i]
    return keep


def repair_ticks(ticks: Sequence[int | None], step: float | None = None) -> np.ndarray | None:
    """float64 [n]: `ticks` with the frames outside a longest increasing run re-timed by position.

    Kept frames keep their value exactly. A run of re-timed frames between kept frames at positions
    i < j is spaced evenly between them; before the first or after the last kept frame, frames are
    spaced by the median step of the kept frames (per position), else `step`, else 1. Strictly
    increasing. None when no frame has a timestamp.
    """
    keep = longest_increasing(ticks)
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        return None
    values = np.array([float(ticks[i]) for i in kept])
    if len(kept) > 1:
        typical = float(np.median(np.diff(values) / np.diff(kept)))
    else:
        typical = step if step is not None and step > 0 else 1.0
    positions = np.arange(len(ticks), dtype=np.float64)
    out = np.interp(positions, kept.astype(np.float64), values)  # evenly spaced inside, flat outside
    out[: kept[0]] = values[0] - (kept[0] - positions[: kept[0]]) * typical
    out[kept[-1] + 1 :] = values[-1] + (positions[kept[-1] + 1 :] - kept[-1]) * typical
    out[kept] = values  # exact, not through interpolation's arithmetic
    return out


def best_effort_ticks(
    pts: Sequence[int | None], dts: Sequence[int | None], step: float | None = None
) -> np.ndarray | None:
    """float64 [n] presentation ticks of n frames in decode-output order (see the module doc).

    pts, dts: per frame, in the stream's time base, None where missing. `step`: the nominal frame
    step in ticks, for extrapolating a series with a single good timestamp. None when neither series
    has a timestamp.
    """
    if len(pts) != len(dts):
        raise ValueError(f"one pts and one dts per frame: got {len(pts)} and {len(dts)}")
    have_pts = any(t is not None for t in pts)
    have_dts = any(t is not None for t in dts)
    if have_pts and (not have_dts or _faults(pts) <= _faults(dts)):
        chosen = pts
    elif have_dts:
        chosen = dts
    else:
        return None
    constant = _constant_step(chosen)
    if constant is not None:
        first = next(t for t in chosen if t is not None)
        start = first - constant * next(i for i, t in enumerate(chosen) if t is not None)
        return start + constant * np.arange(len(chosen), dtype=np.float64)
    return repair_ticks(chosen, step)


def _constant_step(ticks: Sequence[int | None]) -> float | None:
    """The frame step of a constant-rate series whose faults only move frames by one step.

    Such a series (FFmpeg's MPEG-PS muxer writes them: a frame gets the pts of the frame before,
    the next frames follow one step late until a double step catches up) spans exactly n - 1 of
    its common steps, and every frame lies within one step of first + i x step: counting frames is
    then exact where keeping the repeated values would shift a run of frames by one. None
    otherwise, or when the series has no fault (nothing to repair) or misses a timestamp.
    """
    if any(t is None for t in ticks) or len(ticks) < 3:
        return None
    values = np.asarray(ticks, dtype=np.float64)
    steps = np.diff(values)
    positive = steps[steps > 0]
    if len(positive) == len(steps) or len(positive) == 0:
        return None
    common, counts = np.unique(positive, return_counts=True)
    step = float(common[np.argmax(counts)])
    tolerance = max(1.0, 1e-3 * step)
    counted = values[0] + step * np.arange(len(values))
    if abs(counted[-1] - values[-1]) <= tolerance and np.all(np.abs(values - counted) <= step + tolerance):
        return step
    return None


def crosses_wrap(first: int, last: int, bits: int) -> bool:
    """True when unwrapped timestamps from `first` to `last` pass a multiple of 2^bits."""
    period = 1 << bits
    return first // period != last // period
