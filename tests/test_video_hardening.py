"""Decoding cases from the hardening round (issue 17), each on a file generated here.

Ground truth never comes from the code under test: a file's frames show their own index
(`VideoMaker.index_of`), and each test knows when it wrote every frame (frame k on screen from its
written time), checks with plain PyAV that the file really has the defect it is about, and, for
orientation, applies FFmpeg's own autorotation rule (fftools' choice of transpose/hflip/vflip
filters, restated here) to the frames as stored.
"""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from muse_pipeline.data import load_dataset
from muse_pipeline.data.folder import IMAGE_EXTENSIONS
from muse_pipeline.video import decode_clip, decode_clip_report, preprocess_frames
from muse_pipeline.video.decode import BACKENDS, decode_pyav_report
from muse_pipeline.video.orientation import from_display_matrix
from muse_pipeline.video.timestamps import best_effort_ticks, longest_increasing, repair_ticks

BACKEND_NAMES = sorted(BACKENDS)


def _indices(make_video, frames):
    return [make_video.index_of(np.asarray(f)) for f in frames]


def _shown(written_times, times):
    """Index on screen at each time: the last frame written at or before t (else the first)."""
    out = []
    for t in times:
        before = [k for k, w in enumerate(written_times) if w <= t + 1e-9]
        out.append(before[-1] if before else 0)
    return out


def _raw_frames(path, stream_index=0):
    """Plain PyAV, every frame in order: [(pts, dts, frame)]."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[stream_index]
        return [(f.pts, f.dts, f) for f in container.decode(stream)]


def _encode(path, images, rate, codec="libx264", container_options=None, options=None, bit_rate=None, display=None):
    """Encode `images` (rgb arrays) as frames 0, 1, ... at `rate` into `path`; `display`: a display
    matrix as (counter-clockwise degrees, hflip, vflip)."""
    import av

    height, width = images[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if options:
            stream.options = options
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        if display is not None:
            degrees, hflip, vflip = display
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for k, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _x264(gop, bframes=0):
    return {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"}


# ------------------------------------------------------------------------------ 1. repeated pts


def _repeat_some_pts(src, dst, repeated):
    """Remux `src` so that the frames at presentation positions `repeated` carry the pts of the
    frame before them (where the decode timestamp allows it)."""
    import av

    with av.open(str(src)) as source:
        stream = source.streams.video[0]
        packets = [p for p in source.demux(stream) if p.size]
        order = sorted(range(len(packets)), key=lambda j: packets[j].pts)
        pts = [p.pts for p in packets]
        for r in sorted(repeated):
            j, before = order[r], order[r - 1]
            if pts[before] >= packets[j].dts:
                pts[j] = pts[before]
        with av.open(str(dst), "w") as out:
            out_stream = out.add_stream_from_template(stream)
            for packet, value in zip(packets, pts, strict=True):
                packet.pts = value
                packet.stream = out_stream
                out.mux(packet)
    return dst


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_a_few_repeated_pts_keep_the_good_timestamps(tmp_path, timed_video, make_video, suffix):
    written = [i * 0.2 for i in range(50)] + [10 + i * 0.02 for i in range(500)]  # 5 fps 10 s, then 50 fps
    src = timed_video(tmp_path / "vfr.mp4", written, gop=25, bframes=2)
    repeated = set(range(60, 550, 7))  # includes 151: frames 150 and 151 both claim 12.0 s
    path = _repeat_some_pts(src, tmp_path / f"dup.{suffix}", repeated)
    pts = [p for p, _, _ in _raw_frames(path)]
    assert sum(b <= a for a, b in zip(pts, pts[1:], strict=False)) >= 50  # the defect is really there
    times = np.arange(20.0)
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 64, backend=backend)
        np.testing.assert_allclose(clip.times, times)
        got = _indices(make_video, clip.frames)
        assert got[1] == 5, backend  # the frame shown at 1.0 s, not the one at 5.0 s
        assert got == _shown(written, times), backend
        assert not [w for w in clip.warnings if not w.startswith("decord")], clip.warnings


# ------------------------------------------------------------------------------ 2. AVI, B-frames

_VOP = b"\x00\x00\x01\xb6"


def _vop_type(data):
    return "IPBS"[data[data.index(_VOP) + 4] >> 6]


def _not_coded_vop(slot):
    """An MPEG-4 P-VOP with vop_coded = 0 (a frame the encoder skipped: the picture before stays),
    timed at display slot `slot` (time increment resolution 24000, so a 15-bit increment)."""
    bits = "01" + "0" + "1" + format((slot * 1001) % 24000, "015b") + "1" + "0"
    bits += "0" + "1" * ((8 - (len(bits) + 1) % 8) % 8)  # next_start_code stuffing
    return _VOP + int(bits, 2).to_bytes(len(bits) // 8, "big")


def _packed_divx_avi(tmp_path, make_video, n_frames, skip_after_slot):
    """An AVI as DivX/Xvid wrote them: "packed" B-frames (a P-VOP and the B-VOP shown before it in
    one chunk, then a placeholder N-VOP chunk), no pts (AVI has none), and one skipped frame: a
    lone not-coded VOP after the placeholder at display slot `skip_after_slot`.

    Returns (path, slots): frame k is on screen from display slot slots[k] (slot s = s x 1001/24000 s).
    """
    import av

    rate = Fraction(24000, 1001)
    images = list(make_video.frames(n_frames, 64, 48))
    plain = _encode(tmp_path / "plain.avi", images, rate, codec="mpeg4", options={"bf": "1", "g": "24"}, bit_rate=10**6)
    with av.open(str(plain)) as source:
        stream = source.streams.video[0]
        packets = [(bytes(p), p.is_keyframe) for p in source.demux(stream) if p.size]
    head, key = packets[0]
    at = head.index(_VOP)  # DivX's user data with the "p" that tells a decoder the B-frames are packed
    chunks = [(head[:at] + b"\x00\x00\x01\xb2DivX503b1393p" + head[at:], key)]
    placeholder = _not_coded_vop(0)[:4] + b"\x7f"  # what DivX writes: a start code and stuffing
    rest = packets[1:]
    j = 0
    while j < len(rest):
        data, key = rest[j]
        if j + 1 < len(rest) and _vop_type(rest[j + 1][0]) == "B":
            chunks += [(data + rest[j + 1][0], key), (placeholder, False)]
            j += 2
        else:
            chunks.append((data, key))
            j += 1
        if len(chunks) - 1 == skip_after_slot:
            assert chunks[-1][0] == placeholder
            chunks.append((_not_coded_vop(skip_after_slot), False))
    assert len(chunks) == n_frames + 1
    path = tmp_path / "packed.avi"
    with av.open(str(plain)) as source, av.open(str(path), "w") as out:
        out_stream = out.add_stream_from_template(source.streams.video[0])
        for slot, (data, key) in enumerate(chunks):
            packet = av.Packet(data)
            packet.pts = packet.dts = slot
            packet.time_base, packet.is_keyframe, packet.stream = Fraction(1001, 24000), key, out_stream
            out.mux(packet)
    slots = [k if k <= skip_after_slot else k + 1 for k in range(n_frames)]  # the skipped slot repeats one
    return path, slots


def test_avi_with_packed_b_frames_and_a_skipped_frame(tmp_path, make_video):
    path, slots = _packed_divx_avi(tmp_path, make_video, 241, skip_after_slot=60)
    raw = _raw_frames(path)  # the defect: pts out of order, and the decoder's flush frame has no dts
    assert [make_video.index_of(f.to_ndarray(format="rgb24")) for *_, f in raw] == list(range(241))
    assert any(b <= a for (a, _, _), (b, _, _) in zip(raw, raw[1:], strict=False)) and raw[-1][1] is None
    written = [Fraction(s * 1001, 24000) for s in slots]
    for backend in BACKEND_NAMES:
        for window in ((None, None), (0.3, 9.5)):
            clip = decode_clip_report(path, 64, *window, backend=backend)
            assert _indices(make_video, clip.frames) == _shown(written, clip.times), (backend, window)
    # at 5 s slot 119 is on screen and it shows frame 118 (counting frames, 119, is a frame early)
    assert _indices(make_video, decode_clip(path, 64))[5] == 118


# --------------------------------------------------------------------------- 3. MPEG-TS clock wrap


@pytest.mark.parametrize(("frames", "offset", "seek"), [(250, "95440", True), (2000, "95400", None)])
def test_mpeg_ts_whose_clock_wraps_inside_the_file(tmp_path, make_video, frames, offset, seek):
    images = list(make_video.frames(frames, 64, 16))
    path = _encode(tmp_path / "wrap.ts", images, 25, container_options={"output_ts_offset": offset}, options=_x264(50, 2))
    import av

    with av.open(str(path)) as container:  # the 33-bit clock really wraps: raw pts pass 2^33 ticks
        pts = [p.pts for p in container.demux(container.streams.video[0]) if p.size]
    assert min(pts) // 2**33 != max(pts) // 2**33
    written = [k / 25 for k in range(frames)]
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 64, backend=backend)
        assert _indices(make_video, clip.frames) == _shown(written, clip.times), backend
        assert not [w for w in clip.warnings if not w.startswith("decord")], clip.warnings
    clip = decode_pyav_report(path, 12, 0.5, None, seek=seek)
    assert _indices(make_video, clip.frames) == _shown(written, clip.times)
    assert clip.warnings == []


# ---------------------------------------------------------------------------- 4. size changes


def _two_sizes_ts(tmp_path, make_video):
    first = list(make_video.frames(75, 64, 48))
    second = [np.ascontiguousarray(f) for f in list(make_video.frames(150, 96, 32))[75:]]
    a = _encode(tmp_path / "a.ts", first, 25, options=_x264(25))
    b = _encode(tmp_path / "b.ts", second, 25, container_options={"output_ts_offset": "3"}, options=_x264(25))
    path = tmp_path / "sizes.ts"
    path.write_bytes(a.read_bytes() + b.read_bytes())  # `cat a.ts b.ts`: consecutive segments
    return path


def _two_sizes_webm(tmp_path, make_video):
    import av

    first = list(make_video.frames(75, 64, 48))
    second = list(make_video.frames(150, 96, 32))[75:]
    a = _encode(tmp_path / "a.webm", first, 25, codec="libvpx-vp9", bit_rate=500_000)
    b = _encode(tmp_path / "b.webm", second, 25, codec="libvpx-vp9", bit_rate=500_000)
    path = tmp_path / "sizes.webm"
    with av.open(str(a)) as one, av.open(str(b)) as two, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(one.streams.video[0])
        for source, shift in ((one, 0), (two, 3000)):  # 1 ms time base: the second part from 3 s
            for packet in source.demux(source.streams.video[0]):
                if packet.size:
                    packet.pts += shift
                    packet.dts += shift
                    packet.stream = stream
                    out.mux(packet)
    return path


@pytest.mark.parametrize("make", [_two_sizes_ts, _two_sizes_webm])
def test_frame_size_that_changes_mid_stream(tmp_path, make_video, make):
    path = make(tmp_path, make_video)
    sizes = {(f.width, f.height) for *_, f in _raw_frames(path)}
    assert sizes == {(64, 48), (96, 32)}
    written = [k / 25 for k in range(150)]
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 12, backend=backend)
        assert [f.shape for f in clip.frames] == [(48, 64, 3)] * 3 + [(32, 96, 3)] * 3, backend
        assert _indices(make_video, clip.frames) == _shown(written, clip.times), backend
        pixels = preprocess_frames(clip.frames, 32)
        assert pixels.shape == (6, 3, 32, 32)
        for frame, row in zip(clip.frames, pixels, strict=True):  # each frame as it would be alone
            assert torch.equal(row, preprocess_frames(frame[None], 32)[0])
    decord = decode_clip_report(path, 12, backend="decord")
    assert decord.warnings and decord.warnings[0].startswith("decord"), decord.warnings


def _with_orientation_sei(src, dst):
    """Remux an Annex B H.264 TS with a display orientation SEI (90 degrees anticlockwise) put in
    front of the first frame's slice only: FFmpeg gives that one frame a display matrix."""
    import av

    # payload type 47, 3 bytes: cancel 0, hor_flip 0, ver_flip 0, anticlockwise_rotation 0x4000
    # (90 degrees), repetition_period ue(0) = 1, extension 0, then payload alignment 1 0 0.
    sei = b"\x00\x00\x00\x01\x06\x2f\x03\x08\x00\x14\x80"
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        first = True
        for packet in source.demux(stream):
            if not packet.size:
                continue
            data = bytes(packet)
            if first:
                slice_at = data.index(b"\x00\x00\x01\x65")  # the IDR slice NAL
                start = slice_at - 1 if data[slice_at - 1] == 0 else slice_at
                data = data[:start] + sei + data[start:]
                first = False
            new = av.Packet(data)
            new.pts, new.dts, new.time_base = packet.pts, packet.dts, packet.time_base
            new.is_keyframe = packet.is_keyframe
            new.stream = out_stream
            out.mux(new)
    return dst


def test_orientation_on_the_first_frame_only(tmp_path, make_video):
    images = list(make_video.frames(50, 64, 32))
    for image in images:
        image[:8, :10] = 255  # a marker in the top-left corner
    src = _encode(tmp_path / "plain.ts", images, 25, options=_x264(25))
    path = _with_orientation_sei(src, tmp_path / "sei.ts")
    raw = _raw_frames(path)
    matrices = [_matrix(f) for *_, f in raw]
    assert matrices[0] is not None and all(m is None for m in matrices[1:])  # really the first only
    # frames 0 and 25 (samples at 0 s and 1 s), all shown the way the first one is
    want = np.stack([_ffmpeg_autorotate(raw[k][2].to_ndarray(format="rgb24"), matrices[0]) for k in (0, 25)])
    assert want.shape == (2, 64, 32, 3)  # portrait: the SEI turns the picture
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 12, backend=backend)
        assert isinstance(clip.frames, np.ndarray) and clip.frames.shape == want.shape, backend
        assert np.abs(clip.frames.astype(int) - want.astype(int)).mean() < 2.0, backend


# ------------------------------------------------------------------------ 5. two video streams


@pytest.mark.parametrize("default_second", [True, False])
def test_two_video_streams_both_backends_take_the_same_one(tmp_path, make_video, default_second):
    import av

    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as container:
        streams = []
        for bit_rate in (300_000, 3_000_000):  # decord's own pick would be the richer second one
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            stream.options = {**_x264(10), "b": str(bit_rate)}
            streams.append(stream)
        if default_second:
            streams[0].disposition = av.stream.Disposition(0)
            streams[1].disposition = av.stream.Disposition.default
        for k, image in enumerate(make_video.frames(330, 64, 48)):
            if k >= 30 and k < 300:
                continue
            target = streams[0] if k < 30 else streams[1]  # stream 0 shows 0..29, stream 1 300..329
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k % 30
            for packet in target.encode(frame):
                container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)
    with av.open(str(path)) as container:
        flags = [bool(s.disposition & av.stream.Disposition.default) for s in container.streams.video]
    chosen = flags.index(True) if any(flags) else 0
    assert chosen == (1 if default_second else 0)
    want = [300 * chosen + k for k in (0, 10, 20)]
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 12, backend=backend)
        assert _indices(make_video, clip.frames) == want, backend
        assert f"the file has 2 video streams; decoded stream #{chosen}" in " | ".join(clip.warnings), clip.warnings


# ------------------------------------------------------------------------ 6. display matrices


def _matrix(frame):
    for side in frame.side_data:
        if side.type.name == "DISPLAYMATRIX":
            return np.frombuffer(bytes(side)[:36], dtype="<i4").copy()
    return None


def _ffmpeg_autorotate(image, matrix):
    """fftools/ffmpeg_filter.c's autorotation, restated: theta = -round(av_display_rotation_get),
    then the filters it inserts for 90, 180, 270 and 0 degrees."""
    m = [float(v) for v in matrix]
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    theta = -round(-math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    transpose = {  # the transpose filter's directions
        "clock": lambda x: np.rot90(x, -1),
        "cclock": lambda x: np.rot90(x, 1),
        "cclock_flip": lambda x: np.swapaxes(x, 0, 1),
        "clock_flip": lambda x: np.flipud(np.rot90(x, -1)),
    }
    if abs(theta - 90) < 1:
        return transpose["cclock_flip" if m[3] > 0 else "clock"](image)
    if abs(theta - 180) < 1:
        out = image[:, ::-1] if m[0] < 0 else image
        return out[::-1] if m[4] < 0 else out
    if abs(theta - 270) < 1:
        return transpose["clock_flip" if m[3] < 0 else "cclock"](image)
    return image[::-1] if m[4] < 0 else image


@pytest.mark.parametrize(
    ("degrees", "hflip", "vflip"),
    [(0, True, False), (0, False, True), (90, True, False), (90, False, True), (270, True, False), (180, True, False)],
    ids=["hflip", "vflip", "rot90+hflip", "rot90+vflip", "rot270+hflip", "rot180+hflip"],
)
@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_flip_display_matrices_are_applied_in_full(tmp_path, make_video, degrees, hflip, vflip, suffix):
    images = list(make_video.frames(30, 64, 32))
    for image in images:
        image[:8, :10] = 255  # the top-left corner, so that every mirror shows
    path = _encode(tmp_path / f"flip.{suffix}", images, 10, options=_x264(10), display=(degrees, hflip, vflip))
    raw = _raw_frames(path)
    matrix = _matrix(raw[0][2])
    assert matrix is not None
    want = np.stack([_ffmpeg_autorotate(f.to_ndarray(format="rgb24"), matrix) for *_, f in raw][::10])
    for backend in BACKEND_NAMES:
        frames = decode_clip(path, 12, backend=backend)
        assert frames.shape == want.shape, backend
        assert np.abs(frames.astype(int) - want.astype(int)).mean() < 2.0, backend
    np.testing.assert_array_equal(decode_clip(path, 12), want)


def _ffmpeg_display_matrix(clockwise_degrees, hflip, vflip):
    """libavutil's av_display_rotation_set + av_display_matrix_flip, restated (16.16 fixed point)."""
    radians = -clockwise_degrees * math.pi / 180
    c, s = math.cos(radians), math.sin(radians)
    m = [round(c * 65536), round(-s * 65536), 0, round(s * 65536), round(c * 65536), 0, 0, 0, 1 << 30]
    flip = [-1 if hflip else 1, -1 if vflip else 1, 1]
    return [v * flip[i % 3] for i, v in enumerate(m)]


def test_every_axis_aligned_matrix_matches_ffmpegs_autorotation():
    image = np.arange(2 * 3).reshape(2, 3)  # no symmetry: every orientation moves it differently
    seen = set()
    for degrees in (0, 90, 180, 270, 30, 100):
        for hflip in (False, True):
            for vflip in (False, True):
                matrix = _ffmpeg_display_matrix(degrees, hflip, vflip)
                got = from_display_matrix(matrix).apply(image)
                if degrees in (30, 100):  # not axis-aligned: the nearest quarter turn
                    matrix = _ffmpeg_display_matrix(round(degrees / 90) * 90, hflip, vflip)
                want = _ffmpeg_autorotate(image, matrix)
                assert got.shape == want.shape and np.array_equal(got, want), (degrees, hflip, vflip)
                seen.add(want.tobytes() + bytes(want.shape))
    assert len(seen) == 8  # all eight orientations were among the cases


# ------------------------------------------------------------------- 7. declared length, Matroska


def _mkv_with_audio(path, video_times, audio_seconds):
    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=1000)
        video.width, video.height, video.pix_fmt = 64, 32, "yuv420p"
        audio = container.add_stream("aac", rate=8000) if audio_seconds else None
        if audio is not None:
            audio.layout = "mono"
        from conftest import VideoMaker

        for t, image in zip(video_times, VideoMaker.frames(len(video_times), 64, 32), strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        samples = 0
        while audio is not None and samples < audio_seconds * 8000:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, samples
            samples += 1024
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode() if audio is not None else ():
            container.mux(packet)
    return path


@pytest.mark.parametrize(("start", "audio_seconds"), [(0.0, 10.0), (36000.0, 0.0)], ids=["long-audio", "10h-offset"])
def test_no_cut_short_warning_for_matroska_audio_or_start_offset(tmp_path, make_video, start, audio_seconds):
    import av

    written = [start + k / 10 for k in range(30)]
    path = _mkv_with_audio(tmp_path / "v.mkv", written, audio_seconds)
    with av.open(str(path)) as container:  # the container's duration is not the video's 3 s
        assert container.duration / 1e6 > 9.0
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(path, 12, backend=backend)
        assert _indices(make_video, clip.frames) == [0, 10, 20], backend
        assert clip.warnings == [], clip.warnings


@pytest.mark.parametrize(("start", "audio_seconds"), [(0.0, 10.0), (36000.0, 0.0)], ids=["long-audio", "10h-offset"])
def test_probed_length_is_the_video_streams_not_the_containers(tmp_path, start, audio_seconds):
    # The probe decides a folder file's auto windows: the container's 10 s (audio) or 36003 s (an
    # end time) would give windows after the video's last frame, each a failed row.
    from muse_pipeline.video.probe import probe_duration

    written = [start + k / 10 for k in range(30)]  # 3 s of video
    path = _mkv_with_audio(tmp_path / "v.mkv", written, audio_seconds)
    assert abs(probe_duration(path) - 3.0) <= 0.15


def test_matroska_video_really_cut_short_still_warns(tmp_path, timed_video, make_video):
    full = timed_video(tmp_path / "full.mkv", [k / 10 for k in range(100)], gop=10)  # 10 s
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for backend in BACKEND_NAMES:
        clip = decode_clip_report(cut, 12, backend=backend)
        assert len(clip.warnings) == 1 and "declares 9.90 s" in clip.warnings[0], clip.warnings


# --------------------------------------------------------------------- 8. native logs, quiet


def test_decord_prints_nothing_of_ffmpegs_own_log(bad_videos, tmp_path):
    # In a child process: FFmpeg writes to fd 2 from C, and a failure must not take pytest with it.
    code = (
        "import sys\n"
        "from muse_pipeline.video import decode_clip_report\n"
        "clip = decode_clip_report(sys.argv[1], 12, backend='decord')\n"
        "print(len(clip.frames), clip.warnings)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bad_videos["truncated_faststart"])], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no "partial file", "Read error", ... lines
    assert "did not decode" in done.stdout or "cut short" in done.stdout or "decord" in done.stdout, done.stdout


def test_decord_fallback_reasons_are_plain_words(tmp_path, make_video):
    # decord's bundled FFmpeg cannot read AV1: it fails a C++ check ("Check failed: st_nb >= 0 ...")
    path = _encode(tmp_path / "av1.mkv", list(make_video.frames(20, 64, 48)), 10, codec="libsvtav1")
    clip = decode_clip_report(path, 4, backend="decord")
    assert _indices(make_video, clip.frames) == [0, 10]
    assert clip.warnings == ["decord could not open the file: finds no video stream it can read; decoded with PyAV"]


# --------------------------------------------------------------------- 9. stills and GIFs


def test_folder_dataset_takes_stills_and_gifs(tmp_path, make_video):
    from PIL import Image

    frames = list(make_video.frames(3, 48, 32))
    Image.fromarray(frames[1]).save(tmp_path / "photo.png")
    Image.fromarray(frames[2]).save(tmp_path / "snap.jpg", quality=95)
    images = [Image.fromarray(f).convert("P", palette=Image.ADAPTIVE) for f in frames]
    images[0].save(tmp_path / "anim.gif", save_all=True, append_images=images[1:], duration=1000, loop=0)
    (tmp_path / "notes.txt").write_text("not a video")
    index = load_dataset("folder", tmp_path)
    assert sorted(v.path.name for v in index.videos) == ["anim.gif", "photo.png", "snap.jpg"]
    assert {".gif", ".png", ".jpg"} <= set(IMAGE_EXTENSIONS)
    want = {"anim.gif": [0, 1, 2], "photo.png": [1], "snap.jpg": [2]}
    for video in index.videos:
        for backend in BACKEND_NAMES:
            clip = decode_clip_report(video.path, 12, backend=backend)
            assert _indices(make_video, clip.frames) == want[video.path.name], (backend, video.path.name)
            if backend == "decord":  # decord reads no images: PyAV, with the reason in words
                assert clip.warnings[0] == "decord does not read still images or GIFs; decoded with PyAV"


def test_named_datasets_still_ignore_images_next_to_videos(tmp_path, make_video):
    from muse_pipeline.data.folder import VideoFinder

    make_video(tmp_path / "video7.mp4", 3, 10)
    (tmp_path / "video7.jpg").write_bytes(b"thumbnail")
    assert VideoFinder([tmp_path]).find("video7").name == "video7.mp4"


# -------------------------------------------------------------- timestamps: against brute force


def _brute_longest(values):
    """Length of the longest strictly increasing subsequence, by trying every subset."""
    best = 0
    n = len(values)
    for mask in range(1 << n):
        chosen = [values[i] for i in range(n) if mask >> i & 1]
        if any(v is None for v in chosen):
            continue
        if all(b > a for a, b in zip(chosen, chosen[1:], strict=False)):
            best = max(best, len(chosen))
    return best


def test_longest_increasing_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 11))
        values = [None if rng.random() < 0.15 else int(rng.integers(0, 6)) for _ in range(n)]
        keep = longest_increasing(values)
        kept = [values[i] for i in np.flatnonzero(keep)]
        assert None not in kept
        assert all(b > a for a, b in zip(kept, kept[1:], strict=False)), values
        assert len(kept) == _brute_longest(values), values


def test_repair_keeps_good_timestamps_and_retimes_only_bad_ones():
    ticks = [0, 10, 20, 20, 40, None, 60, 5, 80]
    out = repair_ticks(ticks)
    assert out.tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    assert np.all(np.diff(out) > 0)
    # the first of two equal timestamps keeps it; ends extrapolate by the typical step
    assert repair_ticks([None, 100, 200, 200, 300, 400, 400]).tolist() == [0, 100, 200, 250, 300, 400, 500]
    assert repair_ticks([None, None]) is None


def test_best_effort_prefers_the_series_with_fewer_faults():
    pts = [0, 1, 1, 3, 4]
    dts = [0, 1, 2, 3, 4]
    assert best_effort_ticks(pts, dts).tolist() == [0, 1, 2, 3, 4]  # dts: no fault, pts: one
    assert best_effort_ticks([None, None], [None, None]) is None
    # a constant-rate series that repeats a pts and catches up later is counted, not shifted
    assert best_effort_ticks([0, 10, 20, 20, 30, 50, 60], [None] * 7).tolist() == [0, 10, 20, 30, 40, 50, 60]
    # variable rate with one repeat: only the repeat moves
    assert best_effort_ticks([0, 10, 20, 21, 21, 22], [None] * 6).tolist() == [0, 10, 20, 21, 21.5, 22]
