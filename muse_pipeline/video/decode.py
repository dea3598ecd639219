"""Decode the frames of a clip shown at its sample times, upright, with PyAV or decord (spec section 1).

The rule, the same for both backends (see `sampling`):
- The video is the default-flagged video stream, else the first (cover art is not a video); a file
  with several says which was used (`streams`).
- The timeline is the stream's own presentation timestamps, read from the packets (PyAV) or
  decord's packet index, relative to the stream's start time. A declared frame count, frame rate
  or duration is never used: a header that lies changes nothing. Where the packets' timestamps are
  missing or repeat, the decoder's are repaired frame by frame (`timestamps`), never all dropped
  for a few bad ones.
- Sample times: 1 per second from the window start over [start, end) of the video's real length
  (end of its last frame), uniformly subsampled to `max_frames`. Each sample gets the frame on
  screen at that time: the last frame whose timestamp is <= t.
- Short clips are decoded sequentially; when the last sample lies past `SEEK_MIN_FRAMES` frames
  the decoder seeks to the keyframe at or before each sample and decodes forward, so a long video
  costs a few GOPs per sample, not a full decode. Never across a wrap of an MPEG-TS/PS clock
  (FFmpeg seeks by wrapped timestamps there): such a file is decoded sequentially.
- Frames are shown as ffmpeg shows them: the full display matrix, rotations and mirrors (mp4
  `tkhd`, mkv projection, an orientation SEI, which frames after it follow) and, when a file has
  none, the legacy `rotate` tag (`orientation`).
- A frame size that changes mid-stream is kept: the sampled frames come back as a list.
- Damaged files: a sample whose frame does not decode gets the nearest frame that does (the earlier
  one on a tie), and `DecodedClip.warnings` says so; a file whose video stream holds fewer seconds
  than the stream declares (cut short) decodes what it holds, with a warning (audio that runs on,
  or a late start, is not a declaration of the video's length). `DecodeError` only when the file is
  missing, empty, not a video, has no video stream or no frame that decodes.
- A still image or an animated GIF (whatever its file name) is a video of its frames: an image is one
  frame shown for the whole clip, a GIF's frames are shown at their own delays.

decord is used for pixels only where it can be trusted: its own timestamps pick the frames, short
clips are read sequentially, an orientation it applies itself is undone, and anything it cannot
open or decode (images, several video streams, a frame size that changes, which it would scale) is
handled by the PyAV path with a warning in plain words, so both backends return the same frames.
FFmpeg's own log lines are never printed (decord's bundled FFmpeg is set quiet): what matters
reaches the user as warnings.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from muse_pipeline.video.orientation import ORIENTATIONS, UPRIGHT, FrameOrienter, Orientation
from muse_pipeline.video.sampling import TIME_TOLERANCE, clip_sample_times, displayed_frames, video_duration
from muse_pipeline.video.streams import choose_video_stream, declared_seconds, stream_note
from muse_pipeline.video.timestamps import best_effort_ticks, crosses_wrap

# When the last sampled frame lies past this many frames (about 1 min at 30 fps) the PyAV backend
# seeks to keyframes instead of decoding everything in between: short clips decode faster in one run.
SEEK_MIN_FRAMES = 1800

# A file whose header declares this much more than its frames cover is reported as cut short.
_SHORT_FILE_SLACK_S = 1.0

# Leading bytes of containers we recognise, to tell "a damaged video" from "not a video at all".
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "mp4/mov"),
    (4, b"moov", "mp4/mov"),
    (4, b"mdat", "mp4/mov"),
    (4, b"wide", "mp4/mov"),
    (0, b"\x1a\x45\xdf\xa3", "matroska/webm"),
    (0, b"RIFF", "avi"),
    (0, b"FLV", "flv"),
    (0, b"\x00\x00\x01\xba", "mpeg-ps"),
    (0, b"OggS", "ogg"),
)


class DecodeError(RuntimeError):
    """A video that cannot give its sampled frames; `reason` is short enough for a ledger."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass
class DecodedClip:
    """The sampled frames of one clip and what the decoder had to do to get them.

    frames:   uint8 [n, H, W, 3] RGB, upright, 1 <= n <= max_frames; where the stream's frame size
              changes between the sampled frames, a list of n uint8 [H_i, W_i, 3] arrays instead
              (`transforms.preprocess_frames` takes either)
    times:    float64 [n] the sample times (seconds, stream time) the frames stand for
    warnings: short human-readable notes for the failure ledger (e.g. a sample whose frame did not
              decode and was replaced by the nearest decodable one); empty for a clean decode
    """

    frames: np.ndarray | list[np.ndarray]
    times: np.ndarray
    warnings: list[str] = field(default_factory=list)


def _sniff_container(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DecodeError(path, "file not found")
    if not path.is_file():
        raise DecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise DecodeError(path, "empty file")


def _short_detail(err: BaseException) -> str:
    """One short clause out of an FFmpeg/decord message (no log prefixes, paths or tracebacks)."""
    text = str(err).strip()
    # decord: "[12:00:01] /github/.../video_reader.cc:151: ERROR opening: /x.mp4, Invalid data ..."
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Stack trace", "  ["))]
    text = lines[0] if lines else ""
    text = re.sub(r"^(\[[^\]]*\]\s*)+", "", text)  # "[12:00:01] ", "[/path/x.mp4] "
    text = re.sub(r"^\S+\.(cc|h|cpp):\d+:\s*", "", text)  # "src/video/video_reader.cc:151: "
    if "," in text and ("ERROR" in text or "/" in text.split(",")[0]):
        text = text.rsplit(",", 1)[-1]
    # PyAV: "[Errno 1094995529] Invalid data found when processing input: '/x.mp4'"
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    text = text.split(": '")[0].strip().rstrip(".")
    return text[:120] or type(err).__name__


_DECORD_REASONS = (
    ("size must exactly match", "copies frames of this size out wrongly (a decord 0.6 bug)"),
    ("Error sending packet", "met invalid data in the stream"),
    ("Invalid data", "met invalid data in the stream"),
    ("Failed to measure duration", "cannot index it (no duration or frame count it can measure)"),
    ("av_read_frame failed", "cannot read all of its packets"),
    ("st_nb >= 0", "finds no video stream it can read"),
    ("Check failed", "stopped on an internal check"),
)


def _decord_reason(err: BaseException) -> str:
    """decord's errors are C++ log lines; say what they mean instead."""
    text = str(err)
    for needle, reason in _DECORD_REASONS:
        if needle in text:
            return reason
    return _short_detail(err)


def _open_failure(path: Path, err: BaseException) -> DecodeError:
    detail = _short_detail(err)
    kind = _sniff_container(path)
    if kind is None:
        return DecodeError(path, f"not a video (unrecognised data: {detail})")
    return DecodeError(path, f"truncated or corrupt {kind} file ({detail})")


# ---------------------------------------------------------------------------------- orientation


# ----------------------------------------------------------------------------------- timeline


@dataclass(frozen=True)
class _Timeline:
    """A stream's frames in presentation order.

    pts:       int64 [n] sorted, unique presentation timestamps (stream time base), or positions
               when the stream carries no timestamps at all
    times:     float64 [n] seconds from the stream's start
    keyframes: int64 [k] sorted pts of the keyframes (empty: cannot seek)
    duration:  seconds the video plays (end of its last frame)
    declared:  seconds the video stream itself declares, or None
    by_position: `pts` are the frames' positions in a sequential decode (streams without usable
               timestamps, or repaired ones): such a stream is only ever decoded sequentially
    wraps:     the timestamps pass a wrap of the container's clock (MPEG-TS/PS): FFmpeg seeks by
               wrapped ones there and lands elsewhere, so the stream is decoded sequentially
    """

    pts: np.ndarray
    times: np.ndarray
    keyframes: np.ndarray
    duration: float
    declared: float | None
    by_position: bool = False
    wraps: bool = False


# Bits of the timestamp clock of containers whose clock wraps within hours (90 kHz, 33 bits: 26.5 h).
_CLOCK_BITS = {"mpegts": 33, "mpeg": 33, "mpegvideo": 33}


def _wraps(container, pts: np.ndarray) -> bool:
    bits = next((_CLOCK_BITS[n] for n in container.format.name.split(",") if n in _CLOCK_BITS), None)
    return bits is not None and len(pts) > 0 and crosses_wrap(int(pts.min()), int(pts.max()), bits)


def _make_timeline(pts, keys, last_duration, stream, container) -> _Timeline:
    pts = np.unique(np.asarray(pts, dtype=np.int64))
    tb = float(stream.time_base) if stream.time_base else 1.0
    origin = stream.start_time if stream.start_time is not None else int(pts[0])
    times = (pts - origin).astype(np.float64) * tb
    return _Timeline(
        pts=pts,
        times=times,
        keyframes=np.unique(np.asarray(keys, dtype=np.int64)),
        duration=video_duration(times, None if last_duration is None else last_duration * tb),
        declared=declared_seconds(container, stream),
        wraps=_wraps(container, pts),
    )


def _packet_timeline(container, stream, sizes: set[tuple[int, int]] | None = None) -> _Timeline | None:
    """One demux pass (no decoding). None when some packet has no pts or two share one (then the
    decoder's timestamps are used, `_decoded_timeline`). `sizes`: also decode the keyframes and
    collect their (width, height), to tell a stream whose frame size changes (costs a decode per GOP).
    """
    import av

    pts: list[int] = []
    keys: list[int] = []
    durations: dict[int, int] = {}
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            if packet.is_discard:  # edit-list pre-roll: decoded, never shown
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            durations[packet.pts] = packet.duration or 0
            if packet.is_keyframe:
                keys.append(packet.pts)
                if sizes is not None:
                    sizes.update(_keyframe_sizes(packet))
    except (av.FFmpegError, OSError):
        pass  # a damaged tail ends the index: what was read is what the file holds
    if not pts or len(durations) < len(pts):
        return None  # duplicate pts (seen in MPEG-PS): frames cannot be told apart by timestamp
    return _make_timeline(pts, keys, durations[max(pts)], stream, container)


def _keyframe_sizes(packet) -> set[tuple[int, int]]:
    import av

    try:
        return {(frame.width, frame.height) for frame in packet.decode()}
    except (av.FFmpegError, OSError):
        return set()


def _decoded_timeline(container, stream, notes: list[str]) -> _Timeline:
    """Presentation times from a full decode, for streams whose packets carry no usable pts.

    Raw elementary streams (.h264) have none; AVI stores none, and with B-frames the demuxer's
    are decode-order numbers; some files repeat a pts here and there. FFmpeg's best-effort rule,
    repaired frame by frame (`timestamps.best_effort_ticks`): the frames' pts or dts where sound,
    the bad ones re-timed between their neighbours; with no timestamp at all, frame n at n / the
    stream's frame rate. Times count from the first frame (a dts carries the decoder's delay).
    """
    pts: list[int | None] = []
    dts: list[int | None] = []
    for frame in _frames(container, stream, notes):
        pts.append(frame.pts)
        dts.append(frame.dts)
    if not pts:
        raise DecodeError(container.name, "no decodable video frame")
    tb = float(stream.time_base) if stream.time_base else None
    rate = float(stream.guessed_rate or stream.average_rate or 25)
    ticks = best_effort_ticks(pts, dts, step=1.0 / (rate * tb) if tb else None) if tb else None
    if ticks is not None:
        times = (ticks - ticks[0]) * tb
    else:
        times = np.arange(len(pts), dtype=np.float64) / rate
    return _Timeline(
        pts=np.arange(len(pts), dtype=np.int64),
        times=times,
        keyframes=np.zeros(0, dtype=np.int64),
        duration=video_duration(times),
        declared=declared_seconds(container, stream),
        by_position=True,
    )


def _has_packet_pts(container, stream) -> bool:
    """False where the demuxer's pts are not presentation times: AVI with B-frames."""
    return not (container.format.name == "avi" and stream.codec_context.has_b_frames)


# ------------------------------------------------------------------------------------- decode


def _frames(container, stream, notes: list[str], skip_below: Callable[[], int | None] | None = None) -> Iterator:
    """Decoded frames in presentation order; a packet that fails to decode is skipped, not fatal.

    A container that cannot be read on (damaged structure) ends the frames with a note.
    `skip_below()`: a pts; packets before it are decoded only if other frames reference them
    (FFmpeg's skip_frame=NONREF), which is exact for every later frame and saves the B-frames a
    seek has to decode through.
    """
    import av

    context = stream.codec_context
    skipping = False
    try:
        for packet in container.demux(stream):
            if skip_below is not None:
                below = skip_below()
                skip = below is not None and packet.pts is not None and packet.pts < below
                if skip != skipping:
                    context.skip_frame = "NONREF" if skip else "DEFAULT"
                    skipping = skip
            try:
                frames = packet.decode()
            except (av.FFmpegError, OSError):
                continue  # damaged data: the picker substitutes around the frames it loses
            yield from frames
    except (av.FFmpegError, OSError) as err:
        notes.append(f"reading stopped early ({_short_detail(err)})")
    finally:
        if skipping:
            context.skip_frame = "DEFAULT"


# A decoder emits frames in presentation order except around damage, where frames decoded against
# lost references can come out of order; a passed sample's substitute is final after this many more.
_REORDER_WINDOW = 16


class _Picker:
    """Takes decoded frames in presentation order and keeps the one for each wanted pts.

    A wanted pts that never comes out of the decoder (damaged data) gets the nearest frame that
    did (the earlier on a tie), among the frames decoded up to `_REORDER_WINDOW` frames after the
    first one past it. `got[w] = (pts used, rgb)`; `open` is False once every wanted pts is settled.
    """

    def __init__(
        self, wanted: list[int], convert: Callable[[object], np.ndarray], known: set[int] | None = None
    ) -> None:
        self.pending: deque[int] = deque(sorted(set(wanted)))
        self.passed: dict[int, list] = {}  # wanted pts -> [best pts, its frame, frames seen since]
        self.got: dict[int, tuple[int, np.ndarray]] = {}
        self.convert = convert
        self.prev: tuple[int, object] | None = None
        self._rgb: dict[int, np.ndarray] = {}
        self.known = known  # the timeline's pts: a decoded frame outside it means the timeline is wrong
        self.unknown = 0

    @property
    def open(self) -> bool:
        return bool(self.pending or self.passed)

    def _keep(self, wanted: int, pts: int, frame) -> None:
        if pts not in self._rgb:
            self._rgb[pts] = self.convert(frame)
        self.got[wanted] = (pts, self._rgb[pts])

    @staticmethod
    def _nearer(wanted: int, pts: int, best: int) -> bool:
        return (abs(pts - wanted), pts) < (abs(best - wanted), best)

    def _settle(self) -> None:
        for wanted, (pts, frame, _) in self.passed.items():
            self._keep(wanted, pts, frame)
        self.passed.clear()

    def reset(self) -> None:
        """Before a seek: settle what passed, and the previous frame is no longer a neighbour."""
        self._settle()
        self.prev = None

    def feed(self, pts: int, frame) -> None:
        if self.known is not None and pts not in self.known:
            self.unknown += 1
        for wanted in list(self.passed):
            entry = self.passed[wanted]
            if self._nearer(wanted, pts, entry[0]):
                entry[0], entry[1] = pts, frame
            entry[2] += 1
            if entry[0] == wanted or entry[2] >= _REORDER_WINDOW:
                self._keep(wanted, entry[0], entry[1])
                del self.passed[wanted]
        while self.pending and self.pending[0] < pts:
            wanted = self.pending.popleft()
            best = (pts, frame)
            if self.prev is not None and self._nearer(wanted, self.prev[0], pts):
                best = self.prev
            self.passed[wanted] = [best[0], best[1], 0]
        if self.pending and self.pending[0] == pts:
            self._keep(self.pending.popleft(), pts, frame)
        self.prev = (pts, frame)

    def finish(self) -> None:
        """End of the stream: settle what passed; what is still pending gets the last frame."""
        self._settle()
        while self.pending and self.prev is not None:
            self._keep(self.pending.popleft(), *self.prev)


def _frame_pts(frame) -> int | None:
    return frame.pts


def _decode_sequential(
    container, stream, picker: _Picker, notes: list[str], by_position: bool = False, orienter: FrameOrienter | None = None
) -> None:
    """Decode from the start; frames are known by pts, or by position for `_Timeline.by_position`.
    `orienter` learns the stream's first frame on the way."""
    for position, frame in enumerate(_frames(container, stream, notes)):
        if position == 0 and orienter is not None:
            orienter.learn(frame)
        pts = position if by_position else _frame_pts(frame)
        if pts is None:
            continue
        picker.feed(pts, frame)
        if not picker.open:
            return
    picker.finish()


def _decode_seeking(
    container, stream, keyframes: np.ndarray, picker: _Picker, notes: list[str], skip_nonref: bool = True
) -> None:
    """Seek to the keyframe at or before each wanted pts and decode forward.

    A run goes on decoding while the next wanted frame's keyframe has not been passed yet (cheaper
    than a seek). Frames before the keyframe a run seeked to are ignored: they are an open GOP's
    leading frames, whose references lie before the seek point. If the demuxer lands past the
    wanted frame, the run restarts from an earlier keyframe.
    """
    frames: Iterator | None = None
    last: int | None = None
    run_target = -1

    def skip_below() -> int | None:
        return picker.pending[0] if picker.pending else None

    seeks_land = True  # False once the demuxer landed past a target even from 3 keyframes earlier
    while picker.open:
        if not picker.pending:  # only passed samples left: decode on to settle them
            for frame in frames or ():
                if (pts := _frame_pts(frame)) is not None:
                    picker.feed(pts, frame)
                if not picker.open:
                    return
            picker.finish()
            return
        target = picker.pending[0]
        j = max(int(np.searchsorted(keyframes, target, side="right")) - 1, 0)
        if frames is not None and last is not None and last < target and keyframes[j] <= last:
            pass  # the current run reaches the target before any seek could
        else:
            first = None
            for back in (0, 1, 3, None):  # None: from the start of the file
                floor = int(keyframes[max(j - back, 0)]) if back is not None else None
                if floor is None:
                    container.seek(0)
                else:
                    container.seek(floor, stream=stream, backward=True, any_frame=False)
                # A retry means damage or imprecise seeking: decode every frame, so that the
                # nearest decodable frame can stand in for a lost one.
                frames = _frames(container, stream, notes, skip_below if back == 0 and skip_nonref else None)
                first = next((f for f in frames if (p := _frame_pts(f)) is not None and (floor is None or p >= floor)), None)
                if first is None or _frame_pts(first) <= target:
                    break
            seeks_land = seeks_land and floor is not None
            run_target = target  # a run that started early must reach this target before it seeks again
            picker.reset()
            if first is None:  # nothing decodes from here on
                break
            last = _frame_pts(first)
            picker.feed(last, first)
        for frame in frames:
            pts = _frame_pts(frame)
            if pts is None:
                continue
            picker.feed(pts, frame)
            last = pts
            if not picker.open:
                return
            if not picker.pending:
                continue  # settle the passed samples first
            nxt = picker.pending[0]
            if (
                seeks_land
                and not picker.passed  # a sample still waiting for late frames: decode on
                and nxt > run_target
                and keyframes[max(int(np.searchsorted(keyframes, nxt, side="right")) - 1, 0)] > last
            ):
                break  # its keyframe lies ahead: seek there (else: decode on, seeking is not precise here)
        else:  # end of the stream: what is still pending gets the last frame
            picker.finish()
            return


def _substitution_notes(times: np.ndarray, wanted: np.ndarray, got, timeline: _Timeline) -> list[str]:
    tb_times = dict(zip(timeline.pts.tolist(), timeline.times.tolist(), strict=True))
    notes = []
    for t, w in zip(times.tolist(), wanted.tolist(), strict=True):
        used = got[w][0]
        if used != w:
            notes.append(
                f"sample at {t:.2f} s: its frame ({tb_times[w]:.3f} s) did not decode; "
                f"used the nearest decodable frame ({tb_times.get(used, float('nan')):.3f} s)"
            )
    return notes


def _short_file_note(timeline: _Timeline) -> list[str]:
    if timeline.declared is not None and timeline.declared > timeline.duration + _SHORT_FILE_SLACK_S:
        return [
            f"header declares {timeline.declared:.2f} s but the file holds {timeline.duration:.2f} s "
            "of video (cut short, or a wrong header): sampled what it holds"
        ]
    return []


def _open_pyav(path: Path):
    """(container, the video stream to decode: `streams.choose_video_stream`)."""
    import av

    try:
        container = av.open(str(path))
    except Exception as err:  # noqa: BLE001  any FFmpeg/OS error means the file is unusable
        raise _open_failure(path, err) from err
    stream = choose_video_stream(container)
    if stream is None:
        audio = bool(container.streams.audio)
        container.close()
        raise DecodeError(path, "no video stream (audio only)" if audio else "no video stream")
    return container, stream


def _pyav_timeline(path: Path, notes: list[str], sizes: set[tuple[int, int]] | None = None) -> _Timeline:
    """The stream's timeline from its packets, else from a full decode; `sizes`: see `_packet_timeline`."""
    container, stream = _open_pyav(path)
    with container:
        timeline = _packet_timeline(container, stream, sizes) if _has_packet_pts(container, stream) else None
    if timeline is None:
        container, stream = _open_pyav(path)
        with container:
            timeline = _decoded_timeline(container, stream, notes)
    return timeline


@dataclass(frozen=True)
class _Probe:
    """What the chosen stream's first frame tells: the container's format name, the frame as
    stored (rgb [H, W, 3], None when nothing decodes), the orientation it is shown with, and the
    note for a file with several video streams (None otherwise)."""

    formats: str
    first: np.ndarray | None
    orientation: Orientation
    streams_note: str | None


def _probe(path: Path, orienter: FrameOrienter | None = None) -> _Probe:
    """Decode the first frame of the chosen stream; `orienter` (of that stream) learns it."""
    container, stream = _open_pyav(path)
    with container:
        own = FrameOrienter(stream)
        note = stream_note(container, stream)
        for frame in _frames(container, stream, []):
            own.learn(frame)
            if orienter is not None:
                orienter.learn(frame)
            rgb = frame.to_ndarray(format="rgb24")
            return _Probe(container.format.name, rgb, own.orientation(frame), note)
        return _Probe(container.format.name, None, own.tag or UPRIGHT, note)


def _stack(frames: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One array [n, H, W, 3] when the frames share a size, else the list (a stream whose size changes)."""
    return np.stack(frames) if len({f.shape for f in frames}) == 1 else frames


def decode_pyav_report(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    *,
    seek: bool | None = None,
) -> DecodedClip:
    """PyAV backend of `decode_clip_report`. `seek`: None = only past SEEK_MIN_FRAMES frames."""
    path = Path(path)
    _check_file(path)
    notes: list[str] = []
    timeline = _pyav_timeline(path, notes)
    clip, consistent = _pick_pyav(path, timeline, max_frames, start, end, seek, notes)
    if not consistent:
        # Decoded frames carry pts that no packet had: the demuxer's pts were guesses (MPEG-PS
        # packs several frames per timestamp). The decoder's own timestamps decide instead.
        notes.clear()
        container, stream = _open_pyav(path)
        with container:
            timeline = _decoded_timeline(container, stream, notes)
        clip, _ = _pick_pyav(path, timeline, max_frames, start, end, False, notes)
    return clip


def _pick_pyav(
    path: Path,
    timeline: _Timeline,
    max_frames: int,
    start: float | None,
    end: float | None,
    seek: bool | None,
    notes: list[str],
) -> tuple[DecodedClip, bool]:
    """Decode the frames on screen at the sample times; False: the decoder contradicted `timeline`."""
    times = clip_sample_times(timeline.duration, max_frames, start, end)
    wanted = timeline.pts[displayed_frames(timeline.times, times)]
    position = int(np.searchsorted(timeline.pts, wanted.max()))
    use_seek = seek if seek is not None else position >= SEEK_MIN_FRAMES
    use_seek = use_seek and len(timeline.keyframes) > 0 and not timeline.by_position and not timeline.wraps

    container, stream = _open_pyav(path)
    with container:
        streams_note = stream_note(container, stream)
        orienter = FrameOrienter(stream)
        if use_seek:  # the seeks skip the first frame, whose orientation frames without one follow
            _probe(path, orienter)
        known = None if timeline.by_position else set(timeline.pts.tolist())
        picker = _Picker(wanted.tolist(), orienter.upright, known)
        if use_seek:
            _decode_seeking(container, stream, timeline.keyframes, picker, notes)
            if any(used != w for w, (used, _) in picker.got.items()):
                # A sample lost its frame: decode again without skipping non-reference frames, so
                # that the nearest decodable frame, whatever its kind, can stand in.
                picker = _Picker(wanted.tolist(), orienter.upright, known)
                _decode_seeking(container, stream, timeline.keyframes, picker, notes, skip_nonref=False)
        if picker.open or not use_seek:
            if use_seek:  # nothing decoded after a seek: one plain pass before giving up
                container.seek(0)
            _decode_sequential(container, stream, picker, notes, timeline.by_position, orienter)
    if picker.unknown:
        return DecodedClip(np.zeros((0, 0, 0, 3), np.uint8), times), False
    if picker.open or not picker.got:
        raise DecodeError(path, "no decodable video frame")
    warnings = [streams_note] if streams_note else []
    warnings += _substitution_notes(times, wanted, picker.got, timeline) + _short_file_note(timeline)
    warnings += sorted(set(notes))
    frames = _stack([picker.got[w][1] for w in wanted.tolist()])
    return DecodedClip(frames=frames, times=times, warnings=warnings), True


def decode_pyav(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    *,
    seek: bool | None = None,
) -> np.ndarray:
    """PyAV backend of `decode_clip` (frames only)."""
    return decode_pyav_report(path, max_frames, start, end, seek=seek).frames


# ------------------------------------------------------------------------------------- decord


# Containers whose seeking is index-based, so that decord's seek + sequential decode starts where
# it thinks it does; in MPEG-TS/PS it seeks by byte position and was measured to start 12 frames late.
_DECORD_CONTAINERS = ("mov", "mp4", "matroska", "webm", "avi", "flv")
# FFmpeg's demuxers of single images and GIFs (named "<codec>_pipe" besides these).
_IMAGE_FORMATS = ("gif", "image2", "apng", "webp")


def _decord_applied(decord_first: np.ndarray, pyav_first: np.ndarray) -> tuple[Orientation, float]:
    """The orientation decord applied itself (its bundled FFmpeg reads the display matrix
    differently), and the mean pixel difference of its first frame from PyAV's stored one after it."""
    errors = {}
    for orientation in ORIENTATIONS:
        turned = orientation.apply(pyav_first)
        if turned.shape == decord_first.shape:
            errors[orientation] = float(np.abs(turned.astype(np.int16) - decord_first.astype(np.int16)).mean())
    if not errors:
        return UPRIGHT, float("inf")
    best = min(errors, key=errors.get)  # on a tie the earlier in ORIENTATIONS: upright first
    return best, errors[best]


# decord's and PyAV's colour conversions of one frame differ by < 1 grey level on average.
_SAME_FRAME_MAX_DIFF = 3.0


def decode_decord_report(
    path: Path | str, max_frames: int, start: float | None = None, end: float | None = None
) -> DecodedClip:
    """decord backend of `decode_clip_report`: decord's own timestamps pick the frames.

    Checked first against PyAV's packet pass (same count and times), its first frame against
    PyAV's (which also tells the rotation decord applied itself). Short clips are read sequentially
    (decord's frame-counting seeks can land on the wrong frame); past SEEK_MIN_FRAMES frames its
    accurate seek, only where its keyframe numbering matches the stream's. Anything else: PyAV
    decodes, and the first warning says why.
    """
    try:
        import decord
    except ImportError as err:
        raise RuntimeError("the decord backend needs the `decord` package (pip install decord)") from err

    path = Path(path)
    _check_file(path)
    decord.logging.set_level(decord.logging.QUIET)  # what its FFmpeg logs reaches the user as warnings
    probe = _probe(path)  # also raises the short reasons (not a video, ...)

    def fallback(why: str) -> DecodedClip:
        clip = decode_pyav_report(path, max_frames, start, end)
        clip.warnings.insert(0, f"decord {why}; decoded with PyAV")
        return clip

    names = probe.formats.split(",")
    if any(name in _IMAGE_FORMATS or name.endswith("_pipe") for name in names):
        return fallback("does not read still images or GIFs")
    if not any(name in names for name in _DECORD_CONTAINERS):
        return fallback(f"cannot seek accurately in this container ({probe.formats})")
    if probe.streams_note is not None:  # decord reads the stream FFmpeg rates best, not the default one
        return fallback("cannot be told which of the file's video streams to read")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as err:  # noqa: BLE001  decord raises RuntimeError or DECORDError (an Exception)
        return fallback(f"could not open the file: {_decord_reason(err)}")
    n_frames = len(reader)
    if n_frames < 1:
        return fallback("found no frames")
    stamps = reader.get_frame_timestamp(list(range(n_frames))).astype(np.float64)
    frame_times, stops = stamps[:, 0], stamps[:, 1]
    if not np.all(np.isfinite(stamps)) or np.any(np.diff(frame_times) <= 0):
        return fallback("has no usable frame timestamps for this file")
    # Checked against the container's own packets (a demux pass, no decoding): where they differ
    # (a file cut short, packets without timestamps) decord silently repeats frames at the end.
    sizes: set[tuple[int, int]] = set()
    packets = _pyav_timeline(path, [], sizes)
    if len(sizes) > 1:  # decord scales every frame to the first one's size
        return fallback(f"would scale the frames of a stream whose size changes ({len(sizes)} sizes)")
    if packets.by_position:
        return fallback("cannot be checked: the packets carry no usable timestamps")
    if len(packets.times) != n_frames or np.abs(packets.times - frame_times).max() > TIME_TOLERANCE:
        return fallback("indexes this file differently from its packets")
    duration = video_duration(frame_times, float(stops[-1] - frame_times[-1]))
    times = clip_sample_times(duration, max_frames, start, end)
    indices = displayed_frames(frame_times, times)
    unique = sorted(set(indices.tolist()))
    if unique[-1] >= SEEK_MIN_FRAMES:
        # decord numbers keyframes in decode order but frames in presentation order; where the two
        # differ (open GOPs: leading B-frames come after their keyframe) its seeks land off by a
        # frame or more. Trust them only where every keyframe has the same number both ways.
        key_positions = np.searchsorted(packets.pts, packets.keyframes)
        if not np.array_equal(np.asarray(reader.get_key_indices()), key_positions):
            return fallback("cannot seek accurately in this file (open GOPs)")
    try:
        if unique[-1] < SEEK_MIN_FRAMES:
            got = {}
            keep = set(unique)
            reader.seek(0)
            for i in range(unique[-1] + 1):
                frame = reader.next()
                if i in keep:
                    got[i] = frame.asnumpy()
        else:
            batch = reader.get_batch(unique).asnumpy()
            got = dict(zip(unique, batch, strict=True))
    except Exception as err:  # noqa: BLE001  corrupt data mid-stream, or decord's copy-out bugs
        return fallback(f"failed while decoding: {_decord_reason(err)}")
    shapes = {frame.shape for frame in got.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        # decord 0.6 copies some frame sizes out wrongly (e.g. 48x80 comes back with 4 channels)
        return fallback(f"returned malformed frames {sorted(shapes)}")
    turn = probe.orientation  # every frame is shown like the first (decord gives no per-frame matrix)
    if probe.first is not None:
        # decord's frame 0 must be the stream's first frame: a cheap check that its reading starts
        # where its numbering says, and the way to learn the orientation decord applied itself.
        decord_first = got[unique[0]] if unique[0] == 0 else reader[0].asnumpy()
        applied, diff = _decord_applied(decord_first, probe.first)
        if diff > _SAME_FRAME_MAX_DIFF:
            return fallback("does not start at the stream's first frame")
        turn = applied.inverse().then(probe.orientation)
    frames = np.stack([turn.apply(np.ascontiguousarray(got[i], dtype=np.uint8)) for i in indices.tolist()])
    return DecodedClip(frames=frames, times=times, warnings=_short_file_note(packets))


def decode_decord(
    path: Path | str, max_frames: int, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """decord backend of `decode_clip` (frames only)."""
    return decode_decord_report(path, max_frames, start, end).frames


# ------------------------------------------------------------------------------------ dispatch

Backend = Callable[[Path | str, int, float | None, float | None], DecodedClip]

BACKENDS: dict[str, Backend] = {"pyav": decode_pyav_report, "decord": decode_decord_report}


def decode_clip_report(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
) -> DecodedClip:
    """The frames shown at the clip's sample times, the times, and the decoder's warnings.

    Window [start, end) in seconds of stream time (None: the video's own bounds). Raises
    `DecodeError` when the file has no decodable video frame (see the module docstring).
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown decode backend {backend!r}; known: {', '.join(sorted(BACKENDS))}"
        ) from None
    return fn(path, max_frames, start, end)


def decode_clip(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
) -> np.ndarray:
    """Sampled frames of the clip [start, end) of `path` (spec section 1).

    Returns uint8 [n, H, W, 3] RGB with 1 <= n <= max_frames (padding to max_frames is the
    caller's job), or a list of n [H_i, W_i, 3] arrays where the frame size changes mid-stream
    (see `DecodedClip`). Raises `DecodeError` when the file has no decodable video frame.
    """
    return decode_clip_report(path, max_frames, start=start, end=end, backend=backend).frames
