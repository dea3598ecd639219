"""Which video stream of a file is "the video": one rule for every decode backend.

Candidates are the file's video streams except attached pictures (the cover art of a song or
podcast, stored as a one-image "video" stream). The stream flagged default wins, else the first.
With several candidates the choice is said in words (`stream_note`), since a player may show
another one.
"""

from __future__ import annotations


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
