"""JPEG thumbnails of a video clip, for the `muse search --html` page and the `muse serve` grid.

Frames are `decode_clip(path, max_frames=n_frames, start, end)` (up to n_frames frames spread over
[start, end) of the video), each scaled to `height` pixels high, keeping its aspect ratio (width
rounded, at least 1), bilinear, JPEG quality 80. A missing or undecodable file raises (DecodeError).

- `frame_jpegs`: one JPEG per frame (the HTML page inlines each).
- `strip_jpeg`: one JPEG of the same frames side by side, `gap` white pixels apart (the server's /thumb).
"""

from __future__ import annotations

import io
from pathlib import Path

JPEG_QUALITY = 80


def _scaled_frames(path: str | Path, n_frames: int, height: int, start: float | None, end: float | None):
    from PIL import Image

    from muse_pipeline.video.decode import decode_clip

    frames = decode_clip(path, max_frames=n_frames, start=start, end=end)
    out = []
    for frame in frames:  # a list when the frame size changes mid-stream
        img = Image.fromarray(frame)
        width = max(1, round(img.width * height / max(img.height, 1)))
        out.append(img.resize((width, height), Image.Resampling.BILINEAR))
    return out


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def frame_jpegs(path: str | Path, n_frames: int, height: int, start: float | None = None,
                end: float | None = None) -> list[bytes]:
    """JPEG bytes of each of up to n_frames frames of [start, end), in time order."""
    return [_jpeg(img) for img in _scaled_frames(path, n_frames, height, start, end)]


def strip_jpeg(path: str | Path, n_frames: int, height: int, start: float | None = None,
               end: float | None = None, gap: int = 4) -> bytes:
    """One JPEG, `height` high: the frames of `frame_jpegs` left to right on white, `gap` pixels apart."""
    from PIL import Image

    tiles = _scaled_frames(path, n_frames, height, start, end)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return _jpeg(strip)
