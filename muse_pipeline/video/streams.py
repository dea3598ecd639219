"""Which video stream of a file is "the video" (one rule for every decode backend), and how long
it says it lasts.

Candidates are the file's video streams except attached pictures (the cover art of a song or
podcast, stored as a one-image "video" stream). The stream flagged default wins, else the first.
With several candidates the choice is said in words (`stream_note`), since a player may show
another one.
"""

from __future__ import annotations

import re


def video_candidates(container) -> list:
    """The PyAV video streams that hold a video (attached pictures left out), in file order."""
    import av

    attached = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not s.disposition & attached]


def choose_video_stream(container):
    """The stream to decode: the default-flagged candidate, else the first; None if there is none."""
    import av

    candidates = video_candidates(container)
    if not candidates:
        return None
    flagged = [s for s in candidates if s.disposition & av.stream.Disposition.default]
    return flagged[0] if flagged else candidates[0]


def stream_note(container, chosen) -> str | None:
    """A warning naming the stream used when the file has several video streams, else None."""
    import av

    candidates = video_candidates(container)
    if len(candidates) < 2:
        return None
    why = "flagged default" if chosen.disposition & av.stream.Disposition.default else "the first"
    return (
        f"the file has {len(candidates)} video streams; decoded stream #{chosen.index} ({why}, "
        f"{chosen.codec_context.width}x{chosen.codec_context.height})"
    )


def duration_tag(stream) -> float | None:
    """Matroska's per-track DURATION tag ("HH:MM:SS.nnnnnnnnn", the end of the track), in seconds."""
    for key, value in stream.metadata.items():
        if key.upper() == "DURATION":
            match = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*", str(value))
            if match:
                hours, minutes, seconds = match.groups()
                return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def declared_seconds(container, stream) -> float | None:
    """How long the video stream itself says it lasts, or None where only the file as a whole does.

    The stream's own duration, else Matroska's track DURATION tag (an end time: the stream's start
    is taken off). The container's duration covers every stream (audio that runs on) and may be an
    end time (a 10-hour start offset): used only for a file whose one stream is the video and that
    starts at 0.
    """
    tb = float(stream.time_base) if stream.time_base else None
    start = stream.start_time * tb if stream.start_time is not None and tb else 0.0
    if stream.duration is not None and tb:
        return float(stream.duration * tb)
    end = duration_tag(stream)
    if end is not None:
        return end - start
    only_stream = len(container.streams) == 1
    starts_at_zero = not container.start_time
    if container.duration is not None and only_stream and starts_at_zero:
        return container.duration / 1_000_000
    return None
