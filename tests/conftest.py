"""Shared test fixtures: tiny real videos, a small synthetic dataset, and broken video files.

- `make_video(path, n_frames, fps, size=(64, 48), audio=False, faststart=False, gop=None)`
  writes a real encoded video whose frame k shows its own index (three grey stripes, base-16
  digits of k), so a test can tell which frames a decoder returned: `make_video.index_of(frame)`.
  `size` is (width, height); odd sizes are allowed.
- `synthetic_root`: a generated 12-video synthetic dataset (session-wide, read-only by convention).
- `bad_videos`: {"missing", "empty", "truncated", "truncated_faststart", "not_video"} -> Path;
  `decode_clip` of any of them (whole video) raises DecodeError.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from muse_pipeline.data.synthetic import generate_synthetic, write_video

_STRIPES = 3  # base-16 digits: indices up to 4095


class VideoMaker:
    """Writes index-coded test videos; `index_of` reads the index back from a decoded frame."""

    @staticmethod
    def frames(n_frames: int, width: int, height: int) -> Iterator[np.ndarray]:
        bounds = np.linspace(0, width, _STRIPES + 1).astype(int)
        for k in range(n_frames):
            frame = np.empty((height, width, 3), dtype=np.uint8)
            for s in range(_STRIPES):
                digit = (k // 16 ** (_STRIPES - 1 - s)) % 16
                frame[:, bounds[s] : bounds[s + 1]] = 16 * digit + 8
            yield frame

    @staticmethod
    def index_of(frame: np.ndarray) -> int:
        height, width = frame.shape[:2]
        bounds = np.linspace(0, width, _STRIPES + 1).astype(int)
        k = 0
        for s in range(_STRIPES):
            # The middle of each stripe, away from chroma bleeding at the stripe edges.
            lo, hi = bounds[s], bounds[s + 1]
            pad = (hi - lo) // 4
            region = frame[height // 4 : 3 * height // 4 + 1, lo + pad : hi - pad]
            k = 16 * k + int(np.clip(region.mean() // 16, 0, 15))
        return k

    def __call__(
        self,
        path: Path | str,
        n_frames: int,
        fps: Fraction | float | int | str,
        size: tuple[int, int] = (64, 48),
        audio: bool = False,
        faststart: bool = False,
        gop: int | None = None,
    ) -> Path:
        width, height = size
        return write_video(
            path, self.frames(n_frames, width, height), fps, audio=audio, faststart=faststart, gop=gop
        )


@pytest.fixture(scope="session")
def make_video() -> VideoMaker:
    return VideoMaker()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), n_videos=12, seed=0)


@pytest.fixture
def bad_videos(tmp_path: Path, make_video: VideoMaker) -> dict[str, Path]:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is a text file, not a video\n" * 20)
    paths = {"missing": tmp_path / "missing.mp4", "empty": empty, "not_video": not_video}
    # The default mp4 keeps its index at the end: cut in half it no longer opens.
    # With faststart the index is first: it opens, and its second half cannot be decoded.
    for name, faststart in (("truncated", False), ("truncated_faststart", True)):
        full = make_video(tmp_path / f"{name}_full.mp4", 120, 12, size=(64, 48), faststart=faststart, gop=12)
        data = full.read_bytes()
        cut = tmp_path / f"{name}.mp4"
        cut.write_bytes(data[: len(data) // 2])
        paths[name] = cut
    return paths
