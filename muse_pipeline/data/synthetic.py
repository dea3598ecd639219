"""A built-in synthetic text-video dataset: real encoded videos of a coloured shape crossing the frame.

Each video shows one shape (circle / square / triangle) of one colour moving left, right, up or
down over a plain background of another colour; its two captions name exactly those attributes.
Videos vary in size (odd aspect ratios), frame rate (29.97, 12, ...), duration (under 1 s to 6 s)
and some carry an audio track, so the synthetic set also exercises the decoder's awkward cases.
Shapes are large and colours saturated so a small head on CLIP-like features of a few frames can
learn them. Generation is deterministic: the same parameters give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from muse_pipeline.data.base import DATASETS, SPLITS, AnnotationError, CaptionItem, DatasetIndex, VideoItem
from muse_pipeline.data.base import checksum_files as _checksum_files

FORMAT = "muse-synthetic"
# Bump when the rendering or encoding changes, so that old sets on disk are regenerated.
GENERATOR_VERSION = 1
ANNOTATION_FILE = "synthetic.json"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# direction -> (axis, sign, "from", "to", adverb); axis 0 = horizontal, sign +1 = towards larger x / y.
DIRECTIONS: dict[str, tuple[int, int, str, str, str]] = {
    "right": (0, +1, "left", "right", "rightward"),
    "left": (0, -1, "right", "left", "leftward"),
    "down": (1, +1, "top", "bottom", "downward"),
    "up": (1, -1, "bottom", "top", "upward"),
}
FPS_CHOICES: tuple[Fraction, ...] = (
    Fraction(30000, 1001),
    Fraction(12),
    Fraction(24),
    Fraction(25),
    Fraction(15),
)
MAX_ASPECT = 16 / 9
DEFAULT_SPLITS: tuple[tuple[str, float], ...] = (("train", 0.5), ("val", 0.25), ("test", 0.25))


# ------------------------------------------------------------------------------ video writing


def _as_fraction(fps: Fraction | float | int | str) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return rate


def pick_video_codec() -> str:
    """libx264 when this FFmpeg build has it, else the always-present mpeg4 encoder."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: Path | str,
    frames: Iterable[np.ndarray],
    fps: Fraction | float | int | str,
    *,
    audio: bool = False,
    codec: str | None = None,
    gop: int | None = None,
    faststart: bool = False,
) -> Path:
    """Encode RGB uint8 frames [H, W, 3] (all the same size) to `path` with PyAV.

    yuv420p needs even sizes: odd sizes are encoded as yuv444p with libx264 (keeping every pixel)
    and cropped to even otherwise. `audio` adds a mono AAC sine track as long as the video.
    `faststart` puts the mp4 index first (such a file still opens when truncated).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = _as_fraction(fps)
    codec = codec or pick_video_codec()
    options = {"movflags": "faststart"} if faststart else {}
    n_written = 0
    with av.open(str(path), "w", options=options) as container:
        stream = None
        audio_stream = None
        for frame in frames:
            frame = np.asarray(frame, dtype=np.uint8)
            if stream is None:
                height, width = frame.shape[:2]
                odd = height % 2 or width % 2
                pix_fmt = "yuv444p" if odd and codec == "libx264" else "yuv420p"
                if odd and pix_fmt == "yuv420p":
                    height, width = height - height % 2, width - width % 2
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                stream.codec_context.thread_count = 1  # single-threaded: byte-identical output
                stream.codec_context.gop_size = gop or max(1, round(float(rate)))
                if codec == "libx264":
                    stream.options = {"preset": "veryfast", "crf": "16"}
                else:
                    stream.codec_context.bit_rate = 2_000_000
                # Every stream must exist before the first packet is muxed (the header is written then).
                audio_stream = _add_audio_stream(container) if audio else None
            frame = frame[: stream.height, : stream.width]
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = n_written
            for packet in stream.encode(video_frame):
                container.mux(packet)
            n_written += 1
        if stream is None:
            raise ValueError("write_video needs at least one frame")
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            _write_sine_audio(container, audio_stream, n_written / float(rate))
    return path


_AUDIO_RATE = 16000


def _add_audio_stream(container):
    stream = container.add_stream("aac", rate=_AUDIO_RATE)
    stream.layout = "mono"
    return stream


def _write_sine_audio(container, stream, seconds: float, hz: float = 440.0) -> None:
    import av

    sample_rate = _AUDIO_RATE
    total = max(1, int(round(seconds * sample_rate)))
    chunk = 1024  # the AAC frame size
    for offset in range(0, total, chunk):
        k = min(chunk, total - offset)
        t = np.arange(offset, offset + k, dtype=np.float64) / sample_rate
        samples = (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = offset
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


# ---------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "triangle":  # apex up, base down; width grows linearly from apex to base
        depth = yy - (cy - r)
        return (depth >= 0) & (depth <= 2 * r) & (np.abs(xx - cx) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_frames(
    width: int, height: int, n_frames: int, shape: str, color: str, background: str, direction: str
) -> Iterable[np.ndarray]:
    """RGB uint8 frames [height, width, 3]: the shape crosses the frame in `direction` over the clip."""
    axis, sign, _, _, _ = DIRECTIONS[direction]
    # Sized by the frame's area, so elongated frames still show a large shape; capped to fit.
    r = min(0.22 * (width * height) ** 0.5, 0.4 * min(width, height))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fg = np.array(COLORS[color], dtype=np.uint8)
    bg = np.array(COLORS[background], dtype=np.uint8)
    extent = (width, height)[axis]
    for k in range(n_frames):
        progress = k / (n_frames - 1) if n_frames > 1 else 0.5
        if sign < 0:
            progress = 1.0 - progress
        along = r + progress * (extent - 2 * r)
        cx, cy = (along, height / 2) if axis == 0 else (width / 2, along)
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[:] = bg
        frame[_shape_mask(shape, xx, yy, cx, cy, r)] = fg
        yield frame


def captions_for(shape: str, color: str, background: str, direction: str) -> list[str]:
    """Two wordings that name exactly the shape, its colour, its motion and the background."""
    _, _, src, dst, adverb = DIRECTIONS[direction]
    return [
        f"{_article(color)} {color} {shape} moves from {src} to {dst} on {_article(background)} {background} background",
        f"on {_article(background)} {background} background, {_article(color)} {color} {shape} travels {adverb}",
    ]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# --------------------------------------------------------------------------------- generation


def _split_counts(n: int, splits: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    names = [s for s, _ in splits]
    fracs = [float(f) for _, f in splits]
    unknown = set(names) - set(SPLITS)
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"splits must be distinct names out of {SPLITS}, got {names}")
    if any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fracs}")
    counts = [int(round(f * n)) for f in fracs]
    # Every split asked for gets a video when there are enough; the last split absorbs rounding.
    for i, f in enumerate(fracs):
        if f > 0 and counts[i] == 0 and n >= len(fracs):
            counts[i] = 1
    counts[-1] = n - sum(counts[:-1])
    if counts[-1] < 0:
        raise ValueError(f"cannot split {n} videos as {list(splits)}")
    return list(zip(names, counts, strict=True))


def _plan(
    n_videos: int,
    seed: int,
    splits: Sequence[tuple[str, float]],
    size_range: tuple[int, int],
    duration_range: tuple[float, float],
    audio_fraction: float,
) -> list[dict]:
    """The attributes of every video, drawn from one seeded generator (no I/O)."""
    rng = np.random.default_rng(seed)
    split_of = []
    for name, count in _split_counts(n_videos, splits):
        split_of += [name] * count
    split_of = [split_of[i] for i in rng.permutation(n_videos)]
    colors = list(COLORS)
    plan = []
    for i in range(n_videos):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = colors[int(rng.integers(len(colors)))]
        background = [c for c in colors if c != color][int(rng.integers(len(colors) - 1))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        lo, hi = size_range
        width, height = (int(rng.integers(lo, hi + 1)) for _ in range(2))
        # Varied aspect ratios, but no slivers: at most 16:9 either way; even sides for yuv420p.
        height = int(min(max(height, width / MAX_ASPECT), width * MAX_ASPECT))
        width, height = width // 2 * 2, height // 2 * 2
        # The first videos pin the awkward cases; the rest are random.
        fps = (
            FPS_CHOICES[i % len(FPS_CHOICES)]
            if i < len(FPS_CHOICES)
            else FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
        )
        duration = duration_range[0] if i == 0 else float(rng.uniform(*duration_range))
        audio = bool(rng.random() < audio_fraction) or (i == 1 and audio_fraction > 0)
        plan.append(
            {
                "id": f"syn{i:04d}",
                "file": f"videos/syn{i:04d}.mp4",
                "split": split_of[i],
                "shape": shape,
                "color": color,
                "background": background,
                "direction": direction,
                "width": max(2, width),
                "height": max(2, height),
                "fps": f"{fps.numerator}/{fps.denominator}",
                "n_frames": max(1, int(round(duration * float(fps)))),
                "audio": audio,
            }
        )
    return plan


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_complete(root: Path, params: dict) -> bool:
    meta_path = root / ANNOTATION_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("format") != FORMAT or meta.get("params") != params:
        return False
    for video in meta.get("videos", []):
        path = root / video.get("file", "")
        if not path.is_file() or _sha256(path) != video.get("sha256"):
            return False
    return True


def generate_synthetic(
    root: Path | str,
    n_videos: int = 24,
    seed: int = 0,
    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
    size_range: tuple[int, int] = (64, 160),
    duration_range: tuple[float, float] = (0.6, 6.0),
    audio_fraction: float = 0.25,
    codec: str | None = None,
) -> Path:
    """Write `n_videos` videos under `root/videos/` and `root/synthetic.json`; return `root`.

    Idempotent: when `root/synthetic.json` already describes these parameters and every file is
    present with its recorded checksum, nothing is written.
    """
    if n_videos < 1:
        raise ValueError(f"n_videos must be >= 1, got {n_videos}")
    if not (2 <= size_range[0] <= size_range[1]):
        raise ValueError(f"size_range must be (lo, hi) with 2 <= lo <= hi, got {size_range}")
    if not (0 < duration_range[0] <= duration_range[1]):
        raise ValueError(f"duration_range must be (lo, hi) with 0 < lo <= hi, got {duration_range}")
    root = Path(root)
    codec = codec or pick_video_codec()
    params = {
        "generator_version": GENERATOR_VERSION,
        "n_videos": n_videos,
        "seed": seed,
        "splits": [[s, float(f)] for s, f in splits],
        "size_range": list(size_range),
        "duration_range": list(duration_range),
        "audio_fraction": audio_fraction,
        "codec": codec,
    }
    if _is_complete(root, params):
        return root
    plan = _plan(n_videos, seed, splits, size_range, duration_range, audio_fraction)
    captions = []
    for video in plan:
        frames = render_frames(
            video["width"],
            video["height"],
            video["n_frames"],
            video["shape"],
            video["color"],
            video["background"],
            video["direction"],
        )
        path = write_video(
            root / video["file"], frames, Fraction(video["fps"]), audio=video["audio"], codec=codec
        )
        video["sha256"] = _sha256(path)
        for text in captions_for(video["shape"], video["color"], video["background"], video["direction"]):
            captions.append({"video": video["id"], "text": text})
    meta = {"format": FORMAT, "params": params, "videos": plan, "captions": captions}
    # Written last and atomically: a crash mid-generation leaves no json claiming a complete set.
    tmp = root / (ANNOTATION_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(root / ANNOTATION_FILE)
    return root


# ------------------------------------------------------------------------------------- loader


@DATASETS.register("synthetic")
def load_synthetic(root: Path) -> DatasetIndex:
    """Index of `root/synthetic.json`, generating the default set first if it is missing."""
    root = Path(root)
    meta_path = root / ANNOTATION_FILE
    if not meta_path.exists():
        generate_synthetic(root)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(meta_path, f"bad JSON: {err}") from err
    if not isinstance(meta, dict):
        raise AnnotationError(meta_path, "expected a JSON object")
    for key in ("videos", "captions"):
        if key not in meta:
            raise AnnotationError(meta_path, f"missing key {key!r}")
    entries = []
    for i, video in enumerate(meta["videos"]):
        for key in ("id", "file", "split"):
            if key not in video:
                raise AnnotationError(meta_path, f"video entry missing key {key!r}", entry=i)
        if video["split"] not in SPLITS:
            raise AnnotationError(meta_path, f"unknown split {video['split']!r}", entry=video["id"])
        entries.append(video)
    entries.sort(key=lambda v: v["id"])
    videos = tuple(VideoItem(v["id"], root / v["file"], v["split"]) for v in entries)
    position = {v.id: i for i, v in enumerate(videos)}
    if len(position) != len(videos):
        raise AnnotationError(meta_path, "duplicate video ids")
    rows = []
    for j, cap in enumerate(meta["captions"]):
        if "video" not in cap or "text" not in cap:
            raise AnnotationError(meta_path, "caption entry needs keys 'video' and 'text'", entry=j)
        if cap["video"] not in position:
            raise AnnotationError(meta_path, "caption refers to an unknown video", entry=cap["video"])
        rows.append((position[cap["video"]], j, cap["text"]))
    rows.sort()  # grouped by video, file order within a video
    captions = tuple(CaptionItem(text, vi, videos[vi].split) for vi, _, text in rows)
    return DatasetIndex(
        "synthetic",
        root,
        videos,
        captions,
        annotation_checksum=_checksum_files([meta_path]),
        extra={
            "attributes": {
                v["id"]: {k: v.get(k) for k in ("shape", "color", "background", "direction")} for v in entries
            }
        },
    )
