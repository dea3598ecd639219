"""Which way up a decoded frame is shown: FFmpeg's display matrix and the legacy `rotate` tag.

A player shows a frame through the stream's display matrix (mp4 `tkhd`, mkv projection, an H.264 or
HEVC orientation SEI): a rotation by a multiple of 90 degrees, possibly combined with a mirror.
`Orientation` is one of those 8 axis-aligned maps (the symmetries of a rectangle): transpose first,
then mirror left-right (`hflip`), then top-bottom (`vflip`), each optional. Applying it to the
frame as stored gives the frame as shown; this is what current FFmpeg's autorotation does (its
`transpose`, `hflip` and `vflip` filters), flips included, not only the rotation angle.

Display matrix (FFmpeg's AV_FRAME_DATA_DISPLAYMATRIX): 9 int32 [a b u; c d v; x y w] in row-vector
form, (p', q', 1) = (p, q, 1) * M, with p the column (to the right) and q the row (down):
p' = a*p + c*q + x, q' = b*p + d*q + y. Only the signs and the larger of the entries matter here;
a matrix that is not axis-aligned (a rotation of 30 degrees) is taken as its nearest quarter turn.

`FrameOrienter` applies this to a stream's PyAV frames: a frame's own matrix, else the stream's
first frame's (an orientation SEI sent once), else the legacy `rotate` tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Orientation:
    """transpose (rows <-> columns), then hflip (mirror left-right), then vflip (top-bottom)."""

    transpose: bool = False
    hflip: bool = False
    vflip: bool = False

    def apply(self, image: np.ndarray) -> np.ndarray:
        """image [H, W, ...] as stored -> as shown ([W, H, ...] when transposed); contiguous."""
        out = image
        if self.transpose:
            out = np.swapaxes(out, 0, 1)
        if self.hflip:
            out = out[:, ::-1]
        if self.vflip:
            out = out[::-1]
        return out if out is image else np.ascontiguousarray(out)

    def then(self, other: Orientation) -> Orientation:
        """The orientation that applies `self` first and `other` after it."""
        probe = _PROBE
        target = other.apply(self.apply(probe))
        return next(o for o in ORIENTATIONS if o.apply(probe).shape == target.shape and np.array_equal(o.apply(probe), target))

    def inverse(self) -> Orientation:
        return next(o for o in ORIENTATIONS if self.then(o) == UPRIGHT)


UPRIGHT = Orientation()
# Identity first: where a frame looks the same several ways (see `decode`), the plain reading wins.
ORIENTATIONS: tuple[Orientation, ...] = tuple(
    Orientation(t, h, v) for t in (False, True) for h in (False, True) for v in (False, True)
)
_PROBE = np.arange(6).reshape(2, 3)  # distinct entries and sides: every orientation moves it differently


def from_display_matrix(matrix: Sequence[int]) -> Orientation:
    """The orientation FFmpeg shows a frame with, from its 9-entry display matrix."""
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if abs(b) + abs(c) > abs(a) + abs(d):  # p' comes from q: rows and columns swap
        return Orientation(transpose=True, hflip=c < 0, vflip=b < 0)
    return Orientation(transpose=False, hflip=a < 0, vflip=d < 0)


def from_rotation(ccw_degrees: float) -> Orientation:
    """A pure counter-clockwise rotation, rounded to quarter turns (np.rot90's k)."""
    turns = int(round(ccw_degrees / 90.0)) % 4
    return (UPRIGHT, Orientation(True, False, True), Orientation(False, True, True), Orientation(True, True, False))[
        turns
    ]


def tag_orientation(metadata: dict) -> Orientation | None:
    """From a legacy `rotate` tag (clockwise degrees, as old ffmpeg wrote it); None without one."""
    for key, value in metadata.items():
        if key.lower() == "rotate":
            try:
                return from_rotation(-float(value))
            except ValueError:
                return None
    return None


def frame_display_matrix(frame) -> tuple[int, ...] | None:
    """The display matrix a decoded PyAV frame carries (9 int32), or None."""
    for side in frame.side_data:
        if getattr(side.type, "name", "") == "DISPLAYMATRIX":
            data = bytes(side)
            if len(data) >= 36:
                return tuple(np.frombuffer(data[:36], dtype="<i4").tolist())
    return None


class FrameOrienter:
    """Turns a stream's decoded PyAV frames the way FFmpeg shows them.

    A frame's own display matrix wins; a frame without one is shown like the stream's first frame
    (an orientation SEI sent once applies to the frames after it), else by the legacy `rotate` tag.
    `learn(first)` must see the stream's first decoded frame before `upright` is asked.
    """

    def __init__(self, stream) -> None:
        self.tag = tag_orientation(stream.metadata)
        self.first: Orientation | None = None
        self.learned = False

    def learn(self, first_frame) -> None:
        if not self.learned:
            matrix = frame_display_matrix(first_frame)
            self.first = from_display_matrix(matrix) if matrix is not None else None
            self.learned = True

    def orientation(self, frame) -> Orientation:
        matrix = frame_display_matrix(frame)
        if matrix is not None:
            return from_display_matrix(matrix)
        return self.first or self.tag or UPRIGHT

    def upright(self, frame) -> np.ndarray:
        return self.orientation(frame).apply(frame.to_ndarray(format="rgb24"))
