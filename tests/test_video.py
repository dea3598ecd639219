"""Sampling protocol, both decode backends, and CLIP preprocessing (spec section 1)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from muse_pipeline.video import DecodeError, decode_clip, preprocess_frames
from muse_pipeline.video.decode import BACKENDS, decode_pyav
from muse_pipeline.video.sampling import clip_frame_indices, frame_indices, sample_times, subsample
from muse_pipeline.video.transforms import center_crop_box, resized_size

BACKEND_NAMES = sorted(BACKENDS)

# ------------------------------------------------------------------------------------ sampling


def test_sample_times_whole_video_one_per_second():
    np.testing.assert_allclose(sample_times(3.0), [0, 1, 2])  # half-open: t = 3.0 is past the end
    np.testing.assert_allclose(sample_times(3.5), [0, 1, 2, 3])
    np.testing.assert_allclose(sample_times(0.4), [0])  # shorter than 1 s: still one frame
    np.testing.assert_allclose(sample_times(0.0), [0])


def test_sample_times_windows():
    np.testing.assert_allclose(sample_times(10, 2.5, 5), [2.5, 3.5, 4.5])
    np.testing.assert_allclose(sample_times(5, 3, 100), [3, 4])  # end clamped to the video
    np.testing.assert_allclose(sample_times(5, 2, 2), [2])  # empty window: its start
    np.testing.assert_allclose(sample_times(5, 7, 9), [5])  # starts after the end: the last instant
    np.testing.assert_allclose(sample_times(5, 7), [5])
    np.testing.assert_allclose(sample_times(5, -3, 1.5), [0, 1])
    with pytest.raises(ValueError, match="before its start"):
        sample_times(5, 3, 2)


def test_subsample_rule():
    np.testing.assert_array_equal(subsample(30, 12), [0, 2, 5, 7, 10, 13, 15, 18, 21, 23, 26, 29])
    np.testing.assert_array_equal(subsample(30, 12), np.linspace(0, 29, 12).astype(int))
    np.testing.assert_array_equal(subsample(5, 12), np.arange(5))
    np.testing.assert_array_equal(subsample(12, 12), np.arange(12))
    with pytest.raises(ValueError):
        subsample(5, 0)


def test_frame_indices_ntsc_rate_and_clamping():
    fps = 30000 / 1001
    np.testing.assert_array_equal(frame_indices(np.array([0.0, 1.0, 2.0]), fps, 100), [0, 29, 59])
    np.testing.assert_array_equal(frame_indices(np.array([3.0]), 12.0, 100), [36])  # no float under-shoot
    np.testing.assert_array_equal(frame_indices(np.array([100.0]), 12.0, 50), [49])
    with pytest.raises(ValueError, match="no frames"):
        frame_indices(np.array([0.0]), 12.0, 0)


def _reference_indices(n_frames, fps, max_frames, start, end):
    """Slow, literal version of the protocol: walk the seconds one by one."""
    duration = n_frames / fps
    lo = 0.0 if start is None else min(max(start, 0.0), duration)
    hi = duration if end is None else min(max(end, lo), duration)
    times = []
    t = lo
    while t < hi - 1e-9:
        times.append(t)
        t = lo + len(times)
    if not times:
        times = [lo]
    if len(times) > max_frames:
        times = [times[int(p)] for p in np.linspace(0, len(times) - 1, max_frames)]
    return [min(int(math.floor(x * fps + 1e-6)), n_frames - 1) for x in times]


def test_clip_frame_indices_matches_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 2000))
        fps = float(rng.choice([30000 / 1001, 12.0, 25.0, 24000 / 1001, 7.5, 60.0]))
        max_frames = int(rng.integers(1, 70))
        start = None if rng.random() < 0.5 else float(rng.uniform(-2, n / fps + 3))
        end = None if rng.random() < 0.5 else (start or 0.0) + float(rng.uniform(0, 40))
        got = clip_frame_indices(n, fps, max_frames, start, end)
        want = _reference_indices(n, fps, max_frames, start, end)
        assert got.tolist() == want, (n, fps, max_frames, start, end)
        assert 1 <= len(got) <= max_frames
        assert got.min() >= 0 and got.max() < n


# -------------------------------------------------------------------------------------- decode


@pytest.fixture(scope="module")
def videos(tmp_path_factory, make_video):
    d = tmp_path_factory.mktemp("videos")
    return {
        # 10 s at 10 fps, several GOPs (B-frames from x264's preset)
        "plain": make_video(d / "plain.mp4", 100, 10, size=(64, 48), gop=10),
        # 29.97 fps, odd size and aspect, with audio: 100 frames = 3.34 s
        "ntsc_odd_audio": make_video(d / "ntsc.mp4", 100, Fraction(30000, 1001), size=(97, 61), audio=True),
        # 5 frames at 12 fps: shorter than one second
        "short": make_video(d / "short.mp4", 5, 12, size=(48, 80)),
        # Matroska has no frame count in its header: the PyAV backend must count frames
        "mkv": make_video(d / "nocount.mkv", 37, 12, size=(64, 48)),
    }


def _decoded_indices(make_video, frames):
    return [make_video.index_of(f) for f in frames]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_decode_picks_protocol_frames(videos, make_video, backend):
    frames = decode_clip(videos["plain"], 12, backend=backend)
    assert frames.dtype == np.uint8 and frames.shape == (10, 48, 64, 3)
    assert _decoded_indices(make_video, frames) == list(range(0, 100, 10))
    frames = decode_clip(videos["plain"], 4, backend=backend)
    assert _decoded_indices(make_video, frames) == [0, 30, 60, 90]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_decode_ntsc_odd_size_with_audio(videos, make_video, backend):
    frames = decode_clip(videos["ntsc_odd_audio"], 12, backend=backend)
    assert frames.shape == (4, 61, 97, 3)
    assert _decoded_indices(make_video, frames) == [0, 29, 59, 89]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_decode_short_video_and_windows(videos, make_video, backend):
    short = decode_clip(videos["short"], 12, backend=backend)
    assert short.shape == (1, 80, 48, 3) and _decoded_indices(make_video, short) == [0]
    window = decode_clip(videos["plain"], 12, start=2.5, end=5.0, backend=backend)
    assert _decoded_indices(make_video, window) == [25, 35, 45]
    past_end = decode_clip(videos["plain"], 12, start=50.0, end=60.0, backend=backend)
    assert _decoded_indices(make_video, past_end) == [99]
    tail = decode_clip(videos["plain"], 12, start=8.2, end=30.0, backend=backend)
    assert _decoded_indices(make_video, tail) == [82, 92]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_decode_counts_frames_without_header_count(videos, make_video, backend):
    frames = decode_clip(videos["mkv"], 12, backend=backend)  # 37 frames at 12 fps = 3.08 s
    assert _decoded_indices(make_video, frames) == [0, 12, 24, 36]


@pytest.mark.parametrize("name", ["plain", "ntsc_odd_audio", "short", "mkv"])
def test_backends_return_same_pixels(videos, name):
    for kwargs in ({}, {"start": 1.0, "end": 2.5}):
        a = decode_clip(videos[name], 6, backend="pyav", **kwargs)
        b = decode_clip(videos[name], 6, backend="decord", **kwargs)
        assert a.shape == b.shape
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 1.0


def test_backends_agree_on_synthetic_videos(synthetic_root):
    paths = sorted((synthetic_root / "videos").glob("*.mp4"))
    assert paths
    for path in paths:
        a = decode_clip(path, 8, backend="pyav")
        b = decode_clip(path, 8, backend="decord")
        assert a.shape == b.shape, path
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 1.0, path


@pytest.mark.parametrize("name", ["plain", "ntsc_odd_audio", "mkv"])
def test_pyav_seeking_returns_the_sequential_frames(videos, name):
    for kwargs in ({}, {"start": 1.2, "end": 3.0}, {"start": 50.0}):
        sequential = decode_pyav(videos[name], 12, seek=False, **kwargs)
        seeking = decode_pyav(videos[name], 12, seek=True, **kwargs)
        np.testing.assert_array_equal(seeking, sequential)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "not found"),
        ("empty", "empty"),
        ("not_video", "not a video"),
        ("truncated", "truncated"),
        ("truncated_faststart", "truncated"),
    ],
)
def test_bad_videos_raise_decode_error(bad_videos, backend, case, reason):
    with pytest.raises(DecodeError) as info:
        decode_clip(bad_videos[case], 12, backend=backend)
    assert reason in info.value.reason
    assert isinstance(info.value, RuntimeError)
    assert str(bad_videos[case]) in str(info.value)


def test_pyav_truncated_file_returns_frames_only_when_all_sampled_frames_decode(bad_videos, make_video):
    frames = decode_pyav(bad_videos["truncated_faststart"], 12, start=0.0, end=1.5)
    assert _decoded_indices(make_video, frames) == [0, 12]


def test_decode_clip_rejects_bad_arguments(videos):
    with pytest.raises(ValueError, match="unknown decode backend"):
        decode_clip(videos["plain"], 4, backend="opencv")
    with pytest.raises(ValueError, match="max_frames"):
        decode_clip(videos["plain"], 0)


# ---------------------------------------------------------------------------------- transforms


def test_resize_geometry_follows_torchvision():
    assert resized_size(61, 97, 224) == (224, 356)
    assert resized_size(97, 61, 224) == (356, 224)
    assert resized_size(240, 320, 224) == (224, 298)
    assert center_crop_box(224, 356, 224) == (0, 66)
    assert center_crop_box(224, 225, 224) == (0, 0)  # round(0.5) == 0, as torchvision


def _test_image(height, width, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx * 3 + yy * 5) % 256], -1).astype(np.int64)
    img[height // 4 : height // 2, width // 3 : width // 2] = (250, 10, 40)
    img += rng.integers(-25, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("height", "width"), [(61, 97), (240, 320), (360, 202), (224, 224), (120, 120)])
def test_preprocess_matches_open_clip(height, width):
    open_clip = pytest.importorskip("open_clip", reason="open_clip provides the reference preprocess")
    from PIL import Image

    frames = np.stack([_test_image(height, width, seed) for seed in range(2)])
    reference_tf = open_clip.image_transform(224, is_train=False)
    reference = torch.stack([reference_tf(Image.fromarray(f)) for f in frames])
    ours = preprocess_frames(frames, 224)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 224, 224)
    diff = (ours - reference).abs()
    # normalised units: 0.02 is about 1.4 grey levels of 255 on average
    assert diff.mean().item() < 0.02, diff.mean().item()
    assert diff.max().item() < 0.6


def test_preprocess_normalises_a_flat_frame_exactly():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    frames = np.full((1, 30, 50, 3), 255, dtype=np.uint8)
    out = preprocess_frames(frames, 16, mean, std)
    expected = torch.tensor([(1 - m) / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected.expand(1, 3, 16, 16), atol=1e-5, rtol=0)


def test_preprocess_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        preprocess_frames(np.zeros((1, 8, 8, 3), dtype=np.float32), 8)
    with pytest.raises(ValueError, match="shape"):
        preprocess_frames(np.zeros((8, 8, 3), dtype=np.uint8), 8)
