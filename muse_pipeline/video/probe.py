"""A cheap container probe: how long a video file plays, read from its header (no frame decoded).

Extraction needs every folder file's length before the store is created (its rows, the windows of
long files, are fixed then). Opening the container costs a few milliseconds; decoding would cost
seconds. The header can be off by a frame or two, and a damaged file can claim more than it holds:
the decoder's own timeline still decides which sampled times exist (`video/grid.py`), so a wrong
probe costs at most a re-decode of the file's last chunk, never a wrong frame.
"""

from __future__ import annotations

import math
from pathlib import Path

from muse_pipeline.video.streams import choose_video_stream, declared_seconds


def probe_duration(path: Path | str) -> float:
    """Seconds the chosen video stream lasts per the container header (`streams.declared_seconds`,
    the same length the decoder checks against); NaN when unknown (no such file, not a video, no
    duration of the video stream itself in the header). A still image probes as NaN (no length)."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = choose_video_stream(container)
            if stream is None:
                return math.nan
            # the stream's own length: the container's may cover audio that runs on or be an end time
            seconds = declared_seconds(container, stream)
            if seconds is None:
                return math.nan
    except Exception:  # noqa: BLE001  (a file we cannot probe: its length is unknown, never an error here)
        return math.nan
    return seconds if math.isfinite(seconds) and seconds > 0 else math.nan
