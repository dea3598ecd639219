"""Sampling protocol, both decode backends, and CLIP preprocessing (spec section 1)."""

from __future__ import annotations

import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from muse_pipeline.video import DecodeError, decode_clip, decode_clip_report, preprocess_frames
from muse_pipeline.video.decode import BACKENDS, decode_pyav, decode_pyav_report
from muse_pipeline.video.sampling import (
    clip_sample_times,
    displayed_frames,
    sample_times,
    subsample,
    video_duration,
)
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


def test_displayed_frames_is_the_last_frame_at_or_before_t():
    frame_times = np.array([0.0, 0.2, 0.4, 10.0, 10.02])
    got = displayed_frames(frame_times, np.array([0.0, 0.1, 0.2, 0.39, 5.0, 9.998, 10.0, 10.03, 99.0]))
    np.testing.assert_array_equal(got, [0, 0, 1, 1, 2, 2, 3, 4, 4])
    # before the first frame (a stream that starts late): the first frame
    np.testing.assert_array_equal(displayed_frames(np.array([0.5, 1.5]), np.array([0.0, 1.0])), [0, 0])
    # float32 timestamps (decord) a hair above t still count as shown at t: two frames either side
    # of t, so that without the tolerance the sample would get the earlier one
    above = float(np.float32(1.1))  # 1.10000002384...
    assert above > 1.1
    np.testing.assert_array_equal(displayed_frames(np.array([0.5, above]), [1.1]), [1])
    np.testing.assert_array_equal(displayed_frames(np.array([0.5, 1.1 + 0.01]), [1.1]), [0])  # a real frame after t
    with pytest.raises(ValueError, match="no frames"):
        displayed_frames(np.array([]), np.array([0.0]))
    with pytest.raises(ValueError, match="sorted"):
        displayed_frames(np.array([1.0, 0.5]), np.array([0.0]))


def test_video_duration_is_the_end_of_the_last_frame():
    assert video_duration(np.array([0.0, 0.5, 1.0]), 0.5) == 1.5
    assert video_duration(np.array([0.0, 0.5, 1.0])) == 1.5  # no declared duration: median step
    assert video_duration(np.array([2.0])) == 2.0


def _reference_times(duration, max_frames, start, end):
    """Slow, literal version of steps 1-2: walk the seconds one by one."""
    lo = 0.0 if start is None else min(max(start, 0.0), duration)
    hi = duration if end is None else min(max(end, lo), duration)
    times = []
    t = lo
    while t < hi - 5e-4 - 1e-9:  # a sample needs more than TIME_TOLERANCE before the end
        times.append(t)
        t = lo + len(times)
    if not times:
        times = [lo]
    if len(times) > max_frames:
        times = [times[int(p)] for p in np.linspace(0, len(times) - 1, max_frames)]
    return times


def test_clip_sample_times_matches_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(500):
        duration = float(rng.uniform(0, 300))
        max_frames = int(rng.integers(1, 70))
        start = None if rng.random() < 0.5 else float(rng.uniform(-2, duration + 3))
        end = None if rng.random() < 0.5 else (start or 0.0) + float(rng.uniform(0, 40))
        got = clip_sample_times(duration, max_frames, start, end)
        want = _reference_times(duration, max_frames, start, end)
        np.testing.assert_allclose(got, want, atol=1e-9, err_msg=str((duration, max_frames, start, end)))
        assert 1 <= len(got) <= max_frames


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
        ("truncated", "truncated or corrupt mp4/mov file"),  # index at the end: cut off
    ],
)
def test_bad_videos_raise_decode_error(bad_videos, backend, case, reason):
    with pytest.raises(DecodeError) as info:
        decode_clip(bad_videos[case], 12, backend=backend)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason and len(info.value.reason) < 150
    assert isinstance(info.value, RuntimeError)
    assert str(bad_videos[case]) in str(info.value)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_file_cut_short_decodes_what_it_holds_with_a_warning(bad_videos, make_video, backend):
    # 120 frames at 12 fps (10 s) with the index first, cut in half: the frames that remain decode
    path = bad_videos["truncated_faststart"]
    clip = decode_clip_report(path, 12, backend=backend)
    truth = _ground_truth(path)
    assert 3 <= len(clip.times) < 10
    np.testing.assert_allclose(clip.times, np.arange(len(clip.times)))
    assert _decoded_indices(make_video, clip.frames) == _expected_indices(truth, clip.times)
    assert any("cut short" in w for w in clip.warnings), clip.warnings


def test_decode_clip_rejects_bad_arguments(videos):
    with pytest.raises(ValueError, match="unknown decode backend"):
        decode_clip(videos["plain"], 4, backend="opencv")
    with pytest.raises(ValueError, match="max_frames"):
        decode_clip(videos["plain"], 0)


# ------------------------------------------------- real-world timing: ground truth by full decode


_TRUTH_CACHE: dict = {}


def _ground_truth(path):
    """Independent full sequential decode: [(Fraction seconds from stream start, index shown, rgb)].

    Every packet is decoded in file order; one that fails is skipped (damaged files). Not the code
    under test: plain PyAV, exact rational times. Cached per file version (the long videos).
    """
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _TRUTH_CACHE:
        _TRUTH_CACHE[key] = _decode_everything(path)
    return _TRUTH_CACHE[key]


def _decode_everything(path):
    import av
    from conftest import VideoMaker

    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        origin = stream.start_time or 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue
            for frame in frames:
                rgb = frame.to_ndarray(format="rgb24")
                out.append(((frame.pts - origin) * stream.time_base, VideoMaker.index_of(rgb), rgb))
    return out


def _expected_indices(truth, times):
    """The index shown at each time: the last decoded frame with time <= t (else the first)."""
    result = []
    for t in times:
        shown = [k for when, k, _ in truth if when <= Fraction(float(t)).limit_denominator(10**6)]
        result.append(shown[-1] if shown else truth[0][1])
    return result


def _literal_times(duration, max_frames, start=None, end=None):
    return np.array(_reference_times(duration, max_frames, start, end))


def _check_against_truth(
    path, duration, max_frames, make_video, start=None, end=None, decord_itself=True, **pyav_kwargs
):
    truth = _ground_truth(path)
    times = _literal_times(duration, max_frames, start, end)
    want = _expected_indices(truth, times)
    clips = {}
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, max_frames, start, end, backend=backend)
        np.testing.assert_allclose(clip.times, times, atol=1e-6, err_msg=backend)
        assert _decoded_indices(make_video, clip.frames) == want, backend
        if decord_itself:  # decord decoded, no PyAV stand-in
            assert not any(w.startswith("decord") for w in clip.warnings), clip.warnings
        clips[backend] = clip
    if pyav_kwargs:
        clip = decode_pyav_report(path, max_frames, start, end, **pyav_kwargs)
        assert _decoded_indices(make_video, clip.frames) == want, pyav_kwargs
    a, b = clips["pyav"].frames, clips["decord"].frames
    assert a.shape == b.shape
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 2.0
    return clips


@pytest.fixture(scope="module")
def timed(tmp_path_factory, timed_video):
    d = tmp_path_factory.mktemp("timed")
    vfr_times = [i * 0.2 for i in range(50)] + [10 + i * 0.02 for i in range(200)]  # 5 fps, then 50 fps
    rng = np.random.default_rng(3)
    kept = sorted(set(range(300)) - set(rng.choice(np.arange(1, 299), 20, replace=False).tolist()))
    return {
        "vfr": (timed_video(d / "vfr.mp4", vfr_times), 14.0),
        "dropped": (timed_video(d / "dropped.mp4", [k / 25 for k in kept], indices=kept), 12.0),
        "open_gop": (
            timed_video(d / "open_gop.mp4", [k / 30 for k in range(300)], gop=24, bframes=3, open_gop=True),
            10.0,
        ),
        # 2400 frames, 80 s, open GOPs of 250: past SEEK_MIN_FRAMES, so the default path seeks
        "long_gop": (
            timed_video(
                d / "long_gop.mp4", [k / 30 for k in range(2400)], gop=250, bframes=2, open_gop=True, size=(64, 16)
            ),
            80.0,
        ),
        "long_closed_gop": (
            timed_video(d / "long_closed.mp4", [k / 30 for k in range(2400)], gop=250, bframes=2, size=(64, 16)),
            80.0,
        ),
        "long_mjpeg": (
            timed_video(d / "long.avi", [k / 25 for k in range(2000)], codec="mjpeg", rate=25, size=(64, 16)),
            80.0,
        ),
    }


@pytest.mark.parametrize("max_frames", [12, 64])
def test_variable_frame_rate_samples_by_timestamp(timed, make_video, max_frames):
    # index x average fps picks the frame of 11.7 s for t = 5 s here
    path, duration = timed["vfr"]
    clips = _check_against_truth(path, duration, max_frames, make_video, seek=True)
    if max_frames == 64:  # all 14 seconds: frames 0, 5, ..., 45 then 50, 100, 150, 200
        assert _decoded_indices(make_video, clips["pyav"].frames) == [5 * s for s in range(10)] + [50, 100, 150, 200]


def test_dropped_frames_give_the_frame_still_on_screen(timed, make_video):
    path, duration = timed["dropped"]
    _check_against_truth(path, duration, 12, make_video, seek=True)
    _check_against_truth(path, duration, 12, make_video, start=2.5, end=9.0)


def test_open_gop_b_frames_sequential_and_seeking(timed, make_video):
    path, duration = timed["open_gop"]
    _check_against_truth(path, duration, 12, make_video, seek=True)
    _check_against_truth(path, duration, 12, make_video, start=0.51, end=7.3, seek=True)


@pytest.mark.parametrize("name", ["long_gop", "long_closed_gop", "long_mjpeg"])
def test_long_videos_seek_to_the_right_frames(timed, make_video, name):
    path, duration = timed[name]
    # decord's own seeks land a frame off in open GOPs (measured: 1501 for 1500): PyAV stands in
    decord_ok = name != "long_gop"
    _check_against_truth(path, duration, 64, make_video, decord_itself=decord_ok, seek=False)
    _check_against_truth(path, duration, 12, make_video, start=33.3, end=75.0, decord_itself=decord_ok)
    if not decord_ok:
        clip = decode_clip_report(path, 12, backend="decord")
        assert clip.warnings == ["decord cannot seek accurately in this file (open GOPs); decoded with PyAV"]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("raw.h264", {"bframes": 2}),  # an elementary stream: no timestamps at all
        ("bframes.avi", {"bframes": 2}),  # AVI stores no pts: the demuxer's are decode-order numbers
        ("open_gop.ts", {"bframes": 2, "open_gop": True}),  # decord seeks by bytes here
        ("mpeg2.mpg", {"codec": "mpeg2video"}),
        ("vp9.webm", {"codec": "libvpx-vp9"}),
    ],
)
def test_other_containers_and_streams_without_usable_timestamps(tmp_path, timed_video, make_video, name, options):
    path = timed_video(tmp_path / name, [k / 25 for k in range(150)], rate=25, **options)  # 6 s
    for window, times in (((None, None), [0.0, 1.0, 3.0, 5.0]), ((1.3, 4.9), [1.3, 2.3, 3.3, 4.3])):
        want = [int(t * 25 + 1e-9) for t in times]  # as written: frame k is on screen from k / 25 s
        for backend in BACKEND_NAMES:
            clip = decode_clip_report(path, 4, *window, backend=backend)
            np.testing.assert_allclose(clip.times, times, atol=1e-9, err_msg=backend)
            assert _decoded_indices(make_video, clip.frames) == want, (backend, clip.warnings)
            assert not [w for w in clip.warnings if not w.startswith("decord")], clip.warnings


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("long.ts", {"bframes": 2, "open_gop": True, "gop": 250}),  # seeks by bytes: lands late
        ("long.mpg", {"codec": "mpeg2video", "gop": 15}),  # FFmpeg's PS muxer repeats a pts
    ],
)
def test_long_mpeg_ts_and_ps(tmp_path, timed_video, make_video, name, options):
    path = timed_video(tmp_path / name, [k / 25 for k in range(2500)], rate=25, size=(64, 16), **options)  # 100 s
    times = _literal_times(100.0, 64)
    want = [int(t * 25 + 1e-9) for t in times]  # as written
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 64, backend=backend)
        np.testing.assert_allclose(clip.times, times, atol=1e-9)
        assert _decoded_indices(make_video, clip.frames) == want, backend
    for seek in (False, True):
        assert _decoded_indices(make_video, decode_pyav(path, 64, seek=seek)) == want, seek


def _patch_avi_frame_count(path, count):
    """Overwrite the frame count the AVI header declares (avih TotalFrames, strh Length)."""
    data = bytearray(path.read_bytes())
    avih = data.index(b"avih") + 8
    data[avih + 16 : avih + 20] = struct.pack("<I", count)
    strh = data.index(b"strh") + 8
    data[strh + 32 : strh + 36] = struct.pack("<I", count)
    path.write_bytes(bytes(data))
    return path


def test_header_that_lies_about_the_frame_count(tmp_path, timed_video, make_video):
    import av

    path = timed_video(tmp_path / "lies.avi", [k / 10 for k in range(68)], codec="mjpeg", rate=10)
    _patch_avi_frame_count(path, 444)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 444  # the header really lies
    clips = _check_against_truth(path, 6.8, 12, make_video)  # not a failure: the 68 frames are sampled
    assert clips["pyav"].warnings == [
        "header declares 44.40 s but the file holds 6.80 s of video (cut short, or a wrong header): "
        "sampled what it holds"
    ]


def _corner(frame):
    """Which corner the white marker sits in: 'tl', 'tr', 'bl' or 'br'."""
    h, w = frame.shape[:2]
    quads = {
        "tl": frame[: h // 2, : w // 2], "tr": frame[: h // 2, w // 2 :],
        "bl": frame[h // 2 :, : w // 2], "br": frame[h // 2 :, w // 2 :],
    }
    return max(quads, key=lambda q: (quads[q] > 240).all(-1).sum())


@pytest.mark.parametrize(
    ("suffix", "rotation", "tags", "corner"),
    [
        # display matrix, counter-clockwise degrees: ffmpeg turns the picture 90 deg ccw (transpose=cclock)
        ("mp4", 90, None, "bl"),
        ("mp4", 270, None, "tr"),
        ("mkv", 90, None, "bl"),  # decord's bundled FFmpeg does not see mkv's matrix: corrected
        ("mp4", 180, None, "br"),
        ("mkv", None, {"rotate": "90"}, "tr"),  # legacy tag: clockwise degrees, as old ffmpeg wrote it
    ],
)
def test_display_rotation_makes_frames_upright(tmp_path, timed_video, make_video, suffix, rotation, tags, corner):
    path = timed_video(
        tmp_path / f"rot.{suffix}", [k / 10 for k in range(30)], size=(64, 32), rotation=rotation, tags=tags,
        marker=True,
    )
    portrait = rotation in (90, 270) or tags is not None
    for backend in BACKEND_NAMES:
        frames = decode_clip(path, 12, backend=backend)
        assert frames.shape == ((3, 64, 32, 3) if portrait else (3, 32, 64, 3)), backend
        assert [_corner(f) for f in frames] == [corner] * 3, backend
    raw = np.stack([rgb for *_, rgb in _ground_truth(path)][::10])  # as stored, not turned
    turns = {"tl": 0, "bl": 1, "br": 2, "tr": 3}[corner]
    np.testing.assert_array_equal(decode_clip(path, 12), np.rot90(raw, turns, axes=(1, 2)))


def _write_audio_file(path, cover_art):
    """A short silent audio file; `cover_art` adds a PNG as an attached picture (a 'video' stream)."""
    import io

    import av
    from PIL import Image

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        if cover_art:
            png = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(png, format="PNG")
            cover = container.add_stream("png", rate=1)
            cover.width, cover.height, cover.pix_fmt = 32, 32, "rgb24"
            cover.disposition = av.stream.Disposition.attached_pic
            cover.time_base = Fraction(1, 90000)
            packet = av.Packet(png.getvalue())
            packet.stream, packet.pts, packet.dts, packet.time_base = cover, 0, 0, Fraction(1, 90000)
            container.mux(packet)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("cover_art", [False, True])
def test_audio_only_file_is_a_decode_error(tmp_path, backend, cover_art):
    path = _write_audio_file(tmp_path / "song.m4a", cover_art)
    with pytest.raises(DecodeError) as info:
        decode_clip(path, 12, backend=backend)
    assert info.value.reason == "no video stream (audio only)"


def _zero_packets(path, first, last):
    """Zero the payload of packets first..last (decode order) in place: damage in the middle."""
    import av

    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size][first : last + 1]
    data = bytearray(path.read_bytes())
    for pos, size in spans:
        data[pos : pos + size] = bytes(size)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("seek", [False, True])
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("damaged.avi", {"codec": "mjpeg", "rate": 10}),
        ("damaged.mp4", {"gop": 10, "bframes": 2, "size": (128, 64)}),  # the keyframe of 5 s is lost
    ],
)
def test_damaged_middle_substitutes_nearest_decodable_frame(tmp_path, timed_video, make_video, seek, name, options):
    path = timed_video(tmp_path / name, [k / 10 for k in range(100)], **options)
    _zero_packets(path, 48, 52)  # packets (decode order) around 5 s: the sample at 5 s has no frame
    truth = _ground_truth(path)
    decodable = [k for _, k, _ in truth]
    assert 50 not in decodable and len(decodable) >= 90
    times = _literal_times(10.0, 12)
    shown = _expected_indices([(Fraction(k, 10), k, None) for k in range(100)], times)  # as written
    want = [k if k in decodable else min(decodable, key=lambda d: (abs(d - k), d)) for k in shown]
    assert want != shown  # the damage hits a sample
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 12, backend=backend)
        assert _decoded_indices(make_video, clip.frames) == want, backend
        assert any("did not decode" in w and "5.00 s" in w for w in clip.warnings), clip.warnings
    clip = decode_pyav_report(path, 12, seek=seek)
    assert _decoded_indices(make_video, clip.frames) == want


def test_file_with_no_decodable_frame_is_a_decode_error(tmp_path, timed_video):
    path = timed_video(tmp_path / "dead.avi", [k / 10 for k in range(20)], codec="mjpeg", rate=10)
    _zero_packets(path, 0, 19)
    for backend in BACKEND_NAMES:
        with pytest.raises(DecodeError, match="no decodable video frame"):
            decode_clip(path, 12, backend=backend)


def test_still_image_and_gif_named_mp4_are_videos_of_their_frames(tmp_path, make_video):
    from PIL import Image

    frames = list(make_video.frames(3, 48, 32))
    still = tmp_path / "photo.mp4"
    Image.fromarray(frames[2]).save(still, format="PNG")
    gif = tmp_path / "anim.mp4"
    images = [Image.fromarray(f).convert("P", palette=Image.ADAPTIVE) for f in frames]
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=1000, loop=0)
    for backend in BACKEND_NAMES:
        image = decode_clip(still, 12, backend=backend)
        assert image.shape == (1, 32, 48, 3) and _decoded_indices(make_video, image) == [2], backend
        anim = decode_clip_report(gif, 12, backend=backend)
        np.testing.assert_allclose(anim.times, [0, 1, 2])
        assert _decoded_indices(make_video, anim.frames) == [0, 1, 2], backend


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
