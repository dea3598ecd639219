"""muse_pipeline/video/thumbnails.py: per-frame JPEGs and the side-by-side strip, decoded with PIL and
checked against the geometry and colour the test video was written with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from search_helpers import write_moving_bar_video

from muse_pipeline.video.decode import DecodeError
from muse_pipeline.video.thumbnails import frame_jpegs, strip_jpeg


def _rgb(jpeg: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)


def test_frames_and_strip(tmp_path: Path) -> None:
    video = write_moving_bar_video(tmp_path / "v.mp4", (30, 200, 30), seconds=4, fps=4, size=(96, 64))
    frames = [_rgb(j) for j in frame_jpegs(video, 3, 48)]
    assert len(frames) == 3 and all(f.shape == (48, 72, 3) for f in frames)  # 96x64 -> 72x48
    assert all(((f[:, :, 1] > 150) & (f[:, :, 0] < 100)).mean() > 0.5 for f in frames)  # mostly green
    strip = _rgb(strip_jpeg(video, 3, 48, gap=4))
    assert strip.shape == (48, 3 * 72 + 2 * 4, 3)
    gaps = np.concatenate([strip[:, 72 + 1 : 76 - 1], strip[:, 148 + 1 : 152 - 1]], axis=1)
    assert gaps.min() > 200  # white between the tiles
    for i, tile in enumerate(frames):  # each tile is its frame (up to JPEG noise)
        assert np.abs(strip[:, 76 * i : 76 * i + 72] - tile).mean() < 8
    # A window: 1 s to 2 s of a 4 fps video sampled at 1 fps holds one frame.
    assert len(frame_jpegs(video, 4, 48, start=1.0, end=2.0)) == 1


def test_undecodable_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(DecodeError):
        strip_jpeg(bad, 4, 48)
