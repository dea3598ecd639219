"""Decode the sampled frames of a clip to RGB, with PyAV or decord (spec section 1).

Both backends read the frame count and the average frame rate of the first video stream and pick
frames with the one rule of `sampling.clip_frame_indices`, so they return the same frames.

Failures raise `DecodeError` with a short reason (it goes to the extraction failure ledger).

Truncated files: a file cut short can still open (its index survives when the index is at the
front of an mp4) and decode its first frames. The PyAV backend returns the sampled frames when
ALL of them decode and raises `DecodeError` when any sampled frame lies in the lost part; it never
silently returns fewer frames than the protocol asks for, so a cached video always holds the frames
the protocol names. decord builds a full packet index when it opens a file, so it rejects every
truncated file at open time.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from muse_pipeline.video.sampling import clip_frame_indices

# Above this many frames the PyAV backend seeks to keyframes instead of decoding everything in
# between (about 1 min at 30 fps): short clips decode faster sequentially.
SEEK_MIN_FRAMES = 1800

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


def _open_failure(path: Path, err: BaseException) -> DecodeError:
    detail = str(err).split(":")[0].strip() if str(err) else type(err).__name__
    kind = _sniff_container(path)
    if kind is None:
        return DecodeError(path, f"not a video (unrecognised data: {detail})")
    return DecodeError(path, f"truncated or corrupt {kind} file ({detail})")


def _rate_to_float(rate: Fraction | float | None) -> float | None:
    if rate is None:
        return None
    value = float(rate)
    return value if value > 0 else None


# --------------------------------------------------------------------------------------- PyAV


def _pyav_index(container, stream) -> tuple[list[int] | None, list[int], int]:
    """One demux pass (no decoding): presentation-ordered pts of all frames, keyframe positions, count.

    pts is None when some packet has no timestamp (raw elementary streams): the caller then
    cannot seek and decodes sequentially.
    """
    pts: list[int] = []
    keyframe_pts: list[int] = []
    has_all_pts = True
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            count += 1
            if packet.pts is None:
                has_all_pts = False
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keyframe_pts.append(packet.pts)
    except Exception:  # noqa: BLE001  a damaged tail ends the index; missing frames are caught later
        pass
    if not has_all_pts:
        return None, [], count
    pts.sort()
    position = {p: i for i, p in enumerate(pts)}
    keyframes = sorted(position[p] for p in keyframe_pts)
    return pts, keyframes, count


def _decode_sequential(container, stream, wanted: set[int]) -> dict[int, np.ndarray]:
    """Decode from the start, counting frames, and keep the wanted indices."""
    got: dict[int, np.ndarray] = {}
    last = max(wanted)
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    except Exception:  # noqa: BLE001  corrupt data mid-stream: keep what decoded, the caller checks
        pass
    return got


def _decode_seeking(container, stream, wanted: list[int], pts: list[int], keyframes: list[int]):
    """Seek to the keyframe before each wanted frame, unless decoding on reaches it sooner.

    Frames are identified by their pts in the demux index, so the result is the same frames that
    sequential decoding would number `wanted`.
    """
    got: dict[int, np.ndarray] = {}
    frames: Iterator | None = None
    position = -1  # index of the last frame decoded by `frames`
    for target in wanted:
        if target >= len(pts):
            break  # past the frames the file still holds: reported as missing
        # Last keyframe at or before the target: seeking helps only if it lies ahead of us.
        k = bisect.bisect_right(keyframes, target) - 1
        keyframe = keyframes[k] if k >= 0 else 0
        if frames is None or position >= target or keyframe > position + 1:
            container.seek(pts[keyframe], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            position = -1
        try:
            for frame in frames:
                if frame.pts is None:
                    continue
                position = bisect.bisect_left(pts, frame.pts)
                if position >= target:
                    got[target] = frame.to_ndarray(format="rgb24")
                    break
        except Exception:  # noqa: BLE001  corrupt data: later targets are reported as missing
            frames = None
    return got


def decode_pyav(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    *,
    seek: bool | None = None,
) -> np.ndarray:
    """PyAV backend of `decode_clip`. `seek`: None = only for videos over SEEK_MIN_FRAMES frames."""
    import av

    path = Path(path)
    _check_file(path)
    try:
        container = av.open(str(path))
    except Exception as err:  # noqa: BLE001  any FFmpeg/OS error means the file is unusable
        raise _open_failure(path, err) from err
    with container:
        if not container.streams.video:
            raise DecodeError(path, "no video stream")
        stream = container.streams.video[0]
        fps = _rate_to_float(stream.average_rate) or _rate_to_float(stream.guessed_rate)
        if fps is None:
            raise DecodeError(path, "unknown frame rate")
        n_frames = stream.frames
        pts: list[int] | None = None
        keyframes: list[int] = []
        want_seek = seek if seek is not None else n_frames > SEEK_MIN_FRAMES
        if n_frames <= 0 or want_seek:
            # No frame count in the header (mkv, webm, ...) or seeking wanted: index the packets.
            pts, keyframes, counted = _pyav_index(container, stream)
            if n_frames <= 0:
                n_frames = counted
            container.seek(0)
        if n_frames <= 0:
            raise DecodeError(path, "no decodable frames")
        indices = clip_frame_indices(n_frames, fps, max_frames, start, end)
        unique = sorted(set(indices.tolist()))
        if want_seek and pts is not None and keyframes:
            got = _decode_seeking(container, stream, unique, pts, keyframes)
        else:
            got = _decode_sequential(container, stream, set(unique))
    return _assemble(path, indices, got, n_frames)


def _assemble(path: Path, indices: np.ndarray, got: dict[int, np.ndarray], n_frames: int) -> np.ndarray:
    if not got:
        raise DecodeError(path, "no decodable frames")
    missing = [i for i in indices.tolist() if i not in got]
    if missing:
        raise DecodeError(
            path, f"truncated: sampled frame {missing[0]} of {n_frames} could not be decoded ({len(got)} did)"
        )
    return np.stack([got[i] for i in indices.tolist()])


# ------------------------------------------------------------------------------------- decord


def decode_decord(
    path: Path | str, max_frames: int, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """decord backend of `decode_clip`: frame count and average rate from decord's own index."""
    try:
        import decord
    except ImportError as err:
        raise RuntimeError("the decord backend needs the `decord` package (pip install decord)") from err

    path = Path(path)
    _check_file(path)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as err:  # noqa: BLE001  decord raises RuntimeError or DECORDError (an Exception)
        raise _open_failure(path, err) from err
    n_frames = len(reader)
    fps = _rate_to_float(reader.get_avg_fps())
    if n_frames <= 0:
        raise DecodeError(path, "no decodable frames")
    if fps is None:
        raise DecodeError(path, "unknown frame rate")
    indices = clip_frame_indices(n_frames, fps, max_frames, start, end)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception:  # noqa: BLE001
        # decord 0.6 fails to copy out some frame sizes (e.g. 48x80: "size must exactly match")
        # and corrupt data mid-stream. PyAV picks the same frames by the same rule, so it can stand
        # in: it returns the protocol's frames or raises DecodeError itself.
        return decode_pyav(path, max_frames, start, end)
    return np.ascontiguousarray(frames, dtype=np.uint8)


# ------------------------------------------------------------------------------------ dispatch

Backend = Callable[[Path | str, int, float | None, float | None], np.ndarray]

BACKENDS: dict[str, Backend] = {"pyav": decode_pyav, "decord": decode_decord}


@dataclass
class DecodedClip:
    """The sampled frames of one clip and what the decoder had to do to get them.

    frames:   uint8 [n, H, W, 3] RGB, upright, 1 <= n <= max_frames
    times:    float64 [n] the sample times (seconds, stream time) the frames stand for
    warnings: short human-readable notes for the failure ledger (e.g. a sample whose frame did not
              decode and was replaced by the nearest decodable one); empty for a clean decode
    """

    frames: np.ndarray
    times: np.ndarray
    warnings: list[str] = field(default_factory=list)


def decode_clip_report(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
) -> DecodedClip:
    """`decode_clip` with the sample times and the decoder's warnings (see `DecodedClip`)."""
    frames = decode_clip(path, max_frames, start=start, end=end, backend=backend)
    return DecodedClip(frames=frames, times=np.full(len(frames), np.nan), warnings=[])


def decode_clip(
    path: Path | str,
    max_frames: int,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
) -> np.ndarray:
    """Sampled frames of the clip [start, end) of `path` (spec section 1).

    Returns uint8 [n, H, W, 3] RGB with 1 <= n <= max_frames (padding to max_frames is the
    caller's job). Raises `DecodeError` when the file cannot give its sampled frames.
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
