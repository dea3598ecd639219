"""Shared test fixtures: tiny real videos, a small synthetic dataset, and broken video files.

- `make_video(path, n_frames, fps, size=(64, 48), audio=False, faststart=False, gop=None)`
  writes a real encoded video whose frame k shows its own index (three grey stripes, base-16
  digits of k), so a test can tell which frames a decoder returned: `make_video.index_of(frame)`.
  `size` is (width, height); odd sizes are allowed.
- `synthetic_root`: a generated 12-video synthetic dataset (session-wide, read-only by convention).
- `bad_videos`: {"missing", "empty", "truncated", "truncated_faststart", "not_video"} -> Path;
  `decode_clip` of any of them (whole video) raises DecodeError.
- `store_videos(cache, {row: tokens [n, L, D] | None})` (plain function, `from conftest import ...`):
  writes cached (tokens, n real frames, zero padding) or failed (None) videos into a FeatureCache with
  `write_shard_videos`, one call per contiguous run of rows within a shard.
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


def write_timed_video(
    path: Path | str,
    times: list[float] | np.ndarray,
    *,
    indices: list[int] | None = None,
    size: tuple[int, int] = (64, 32),
    codec: str = "libx264",
    rate: int = 1000,
    gop: int = 12,
    bframes: int = 0,
    open_gop: bool = False,
    rotation: int | None = None,
    tags: dict[str, str] | None = None,
    marker: bool = False,
) -> Path:
    """Write index-coded frames (`VideoMaker.index_of` reads them back) at chosen presentation times.

    times: seconds of each frame (any spacing: variable rate, gaps); stored as pts in a 1/`rate`
    time base, so `rate` must make them whole (1000: milliseconds). `indices` (default 0..n-1) is
    what each frame shows. `codec` "mjpeg" makes an intra-only stream (use an .avi path with a
    constant step). `bframes` > 0 with `open_gop` makes x264 write open GOPs with B-frames.
    `rotation`: a display matrix (counter-clockwise degrees, as PyAV's set_display_rotation);
    `tags`: stream metadata (e.g. the legacy {"rotate": "90"}). `marker` paints the top-left
    quarter-stripe-height white, so a test can see where the top-left corner went.
    """
    import av

    path = Path(path)
    times = list(times)
    indices = list(range(len(times))) if indices is None else list(indices)
    width, height = size
    frames = list(VideoMaker.frames(max(indices) + 1, width, height))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"
            if open_gop:
                params += ":open-gop=1"
            stream.options = {"preset": "veryfast", "crf": "16", "x264-params": params}
        else:
            stream.codec_context.bit_rate = 2_000_000
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for key, value in (tags or {}).items():
            stream.metadata[key] = value
        for t, k in zip(times, indices, strict=True):
            image = frames[k].copy()
            if marker:
                image[: height // 4, : width // 6] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = round(t * rate)
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def timed_video():
    """`write_timed_video` (see there): videos with chosen frame times, codecs, GOPs and rotation."""
    return write_timed_video


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny random-init CLIP (`muse-tiny`, D = 64) of the search tests (read-only by convention)."""
    from muse_pipeline.encoders.clip import ClipEncoder

    return ClipEncoder("muse-tiny", pretrained=None)


@pytest.fixture()
def caption_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_clip):
    """(index folder, cache) of `build_index` over search_helpers.caption_store with its FakeRun."""
    from search_helpers import FP, FakeRun, caption_store

    import muse_pipeline.models.checkpoint as checkpoint
    from muse_pipeline.stages.search import build_index

    cache = caption_store(tmp_path, tiny_clip)
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"head": "fake"}, "cache": str(cache.path), "fingerprint": FP}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    return build_index(run, cache.path, tmp_path / "index").path, cache


def store_videos(cache, videos: dict) -> None:
    """See the module docstring: rows -> tokens [n, L, D] (status 1) or None (status 2)."""
    rows = sorted(videos)
    runs: list[list[int]] = []
    for i in rows:
        if runs and i == runs[-1][-1] + 1 and cache.shard_of(i) == cache.shard_of(runs[-1][0]):
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        tokens = np.zeros((len(run), cache.frames, cache.num_tokens, cache.dim), np.float16)
        mask = np.zeros((len(run), cache.frames), np.uint8)
        done = np.full(len(run), 2, np.uint8)
        for r, i in enumerate(run):
            if videos[i] is not None:
                n = len(videos[i])
                tokens[r, :n] = videos[i]
                mask[r, :n] = 1
                done[r] = 1
        cache.write_shard_videos(run[0], tokens, mask, done)
