"""search/html.py: the `muse search --html` page is self-contained and escapes everything it shows."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from search_helpers import write_moving_bar_video

from muse_pipeline.search.html import write_html


def test_write_html_is_self_contained(tmp_path: Path) -> None:
    from PIL import Image

    video = write_moving_bar_video(tmp_path / "my <clip>.mp4", (200, 30, 30), seconds=3, fps=4)
    hits = [
        {"rank": 1, "id": "my <clip>", "score": 0.9, "path": str(video), "start": 0.0, "end": None,
         "caption": "a <b>bold</b> claim"},
        {"rank": 2, "id": "gone", "score": 0.5, "path": str(tmp_path / "gone.mp4")},
    ]
    page = write_html(hits, tmp_path / "out" / "hits.html", query="red & blue", n_frames=4, note="<note>")
    text = page.read_text()
    # 3 s at 1 fps -> 3 sampled frames (<= 4), embedded inline; the only other sources are the
    # players of the hits' own files (loaded only when asked: preload none).
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(images) == 3
    others = re.findall(r'<(\w+) [^>]*src="(?!data:)([^"]*)"', text)
    assert others == [("video", video.as_uri() + "#t=0"), ("video", (tmp_path / "gone.mp4").as_uri() + "#t=0")]
    assert text.count('preload="none"') == 2
    for b64 in images:  # each a real JPEG, 96 high (64x48 scaled: 128 wide), mostly the video's red
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)
        assert img.shape == (96, 128, 3) and (img[:, :, 0] > 150).mean() > 0.5
    assert "red &amp; blue" in text and "my &lt;clip&gt;" in text and "&lt;note&gt;" in text
    assert "a &lt;b&gt;bold&lt;/b&gt; claim" in text and "<b>" not in text
    assert "no preview" in text and "gone" in text
    assert "0.9000" in text


def test_write_html_without_hits(tmp_path: Path) -> None:
    text = write_html([], tmp_path / "empty.html", extra_rows=["a < b"]).read_text()
    assert "<title>muse search</title>" in text and "No results." in text and "<p>a &lt; b</p>" in text
