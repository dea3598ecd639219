"""Auto windows of the folder dataset: the window spec, the grid, and a long file extracted with each
grid time decoded and encoded exactly once."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import zarr
from conftest import VideoMaker

import muse_pipeline.video.grid as grid_module
from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.encoders.clip import ClipEncoder
from muse_pipeline.errors import InputError
from muse_pipeline.extract.config import ExtractConfig
from muse_pipeline.extract.windows import default_window_spec, window_spec, window_starts
from muse_pipeline.stages.extract import run_extract
from muse_pipeline.video.transforms import preprocess_frames

MODEL = "muse-tiny"
FRAME_STEP = 0.5  # the long test video shows frame k from k * 0.5 s


def test_default_windows_keep_short_clips_whole_and_cut_long_videos_into_moments():
    spec = default_window_spec(12)
    assert (spec.window, spec.stride, spec.step) == (24, 12, 2)
    assert window_starts(20.0, spec) == [0] and window_starts(24.0, spec) == [0]
    assert len(window_starts(180.0, spec)) == 14  # a 3-minute video: several moments
    starts = window_starts(600.0, spec)
    assert len(starts) == 49 and starts[-1] + spec.window >= 600.0  # the last moment reaches the end
    assert window_starts(float("nan"), spec) == [0]  # unknown length: one whole-file row


def test_no_window_starts_at_or_after_the_end_with_a_stride_longer_than_the_window():
    spec = window_spec(10, 20, 10)  # 1 s grid, windows 20 s apart
    assert window_starts(11.0, spec) == [0]  # a start at 20 s would hold no frame of an 11 s file
    assert window_starts(25.0, spec) == [0, 20]


@pytest.mark.parametrize("window, stride, frames", [(30, None, 12), (24, 5, 12), (-1, None, 12), (0, 12, 12)])
def test_a_window_the_grid_cannot_hold_is_refused_with_what_to_use(window, stride, frames):
    with pytest.raises(InputError, match="--window|--stride"):
        window_spec(window, stride, frames)


def test_window_options_are_refused_for_annotated_datasets(tmp_path):
    cfg = ExtractConfig(dataset="synthetic", data_root=tmp_path, model=MODEL, window=20, out=tmp_path / "s.zarr")
    with pytest.raises(InputError, match="--dataset folder"):
        run_extract(cfg)


@pytest.fixture(scope="module")
def library(tmp_path_factory, timed_video) -> Path:
    """A folder with a 95.5 s index-coded video (frame k at k * 0.5 s) and a 3 s clip."""
    root = tmp_path_factory.mktemp("library")
    timed_video(root / "long.mp4", [k * FRAME_STEP for k in range(191)], size=(48, 32), gop=24)
    timed_video(root / "short.mp4", [k * 0.5 for k in range(6)], size=(48, 32))
    return root


def _cfg(root: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(dataset="folder", data_root=root, model=MODEL, frames=4, out=out, workers=0, quiet=True,
                window=20, stride=10)
    base.update(kw)
    return ExtractConfig(**base)


def _sequential_frames(path: Path, times: np.ndarray) -> np.ndarray:
    """Independent of the pipeline: decode every frame in order, keep the one on screen at each time."""
    with av.open(str(path)) as container:
        decoded = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    pts = np.array([t for t, _ in decoded])
    return np.stack([decoded[int(np.searchsorted(pts, t + 1e-6, side="right")) - 1][1] for t in times])


def test_a_long_file_is_decoded_and_encoded_once_per_grid_time(library, tmp_path, monkeypatch):
    decoded_times: list[float] = []
    real_decode = grid_module.decode_clip_report

    def counting_decode(path, *args, **kwargs):
        clip = real_decode(path, *args, **kwargs)
        if Path(path).name == "long.mp4":
            decoded_times.extend(clip.times.tolist())
            assert [VideoMaker.index_of(f) for f in clip.frames] == [round(t / FRAME_STEP) for t in clip.times]
        return clip

    encoded: list[tuple[np.ndarray, np.ndarray]] = []
    real_encode = ClipEncoder.encode_frames

    def counting_encode(self, pixels):
        tokens = real_encode(self, pixels)
        encoded.append((pixels.numpy().copy(), tokens.to(dtype=pixels.dtype).numpy().astype(np.float16)))
        return tokens

    monkeypatch.setattr(grid_module, "decode_clip_report", counting_decode)
    monkeypatch.setattr(ClipEncoder, "encode_frames", counting_encode)
    out = tmp_path / "windows.zarr"
    summary = run_extract(_cfg(library, out))

    grid = np.arange(0.0, 95.5, 5.0)  # 0, 5, ..., 95: grid step = window 20 / 4 frames
    assert sorted(decoded_times) == grid.tolist()  # every grid time decoded, none twice
    # the short clip is one forward of its 3 frames (1 fps over 3 s); the long file's in batches of 4
    long_calls = [(p, t) for p, t in encoded if len(p) != 3]
    long_pixels = np.concatenate([p for p, _ in long_calls])
    assert summary.frames_encoded == len(grid) + 3
    assert len(long_pixels) == len(grid)

    cache = FeatureCache.open(out)
    rows = np.arange(cache.n_videos)
    ids = cache.video_ids
    starts = list(range(0, 81, 10))
    durations = cache.read_durations(rows)  # the header's length: the last frame lasts 1 ms here
    assert np.allclose(durations[:-1], 95.0, atol=0.01) and np.allclose(durations[-1], 2.5, atol=0.01)
    assert ids == [f"long@{s}-{min(s + 20, durations[0]):g}" for s in starts] + ["short"]
    assert cache.read_sources(rows) == ["long"] * len(starts) + ["short"]
    windows = cache.read_windows(rows)
    assert windows[:-1, 0].tolist() == starts and np.isnan(windows[-1]).all()

    # The frames the encoder saw are those of an independent sequential decode at the grid times.
    pixels = preprocess_frames(_sequential_frames(library / "long.mp4", grid), 224).numpy()
    assert np.array_equal(long_pixels, pixels)
    # Each window row holds the tokens of its grid times, scattered from the one encoding.
    token_of = np.concatenate([t for _, t in long_calls])
    tokens, mask = cache.read_videos(rows[:-1])
    for r, start in enumerate(starts):
        j = np.arange(start // 5, start // 5 + 4)
        assert mask[r].tolist() == [1, 1, 1, 1]
        assert np.array_equal(tokens[r], token_of[j])


def test_a_short_clip_keeps_the_bits_of_a_whole_file_store(library, tmp_path):
    windowed = tmp_path / "w.zarr"
    whole = tmp_path / "whole.zarr"
    run_extract(_cfg(library, windowed))
    run_extract(_cfg(library, whole, window=0, stride=None))
    a, b = zarr.open_group(str(windowed), mode="r"), zarr.open_group(str(whole), mode="r")
    assert list(b["videos/ids"][:]) == ["long", "short"]
    assert np.array_equal(a["videos/tokens"][-1], b["videos/tokens"][-1])
    assert np.array_equal(a["videos/mask"][-1], b["videos/mask"][-1])


def test_another_window_choice_never_mixes_into_a_store(library, tmp_path):
    from muse_pipeline.cache.compat import FingerprintMismatch

    out = tmp_path / "w.zarr"
    run_extract(_cfg(library, out))
    with pytest.raises(FingerprintMismatch, match="windows"):
        run_extract(_cfg(library, out, window=8, stride=4))
    with pytest.raises(FingerprintMismatch, match="split_selection"):
        run_extract(_cfg(library, out, splits=("test",)))
