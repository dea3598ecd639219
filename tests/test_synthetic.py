"""The synthetic dataset: real videos whose captions describe what is on screen."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import numpy as np
import pytest

from muse_pipeline.data import load_dataset
from muse_pipeline.data.synthetic import COLORS, DIRECTIONS, captions_for, generate_synthetic
from muse_pipeline.video import decode_clip


def _meta(root):
    return json.loads((root / "synthetic.json").read_text())


def test_loader_reads_generated_set(synthetic_root):
    index = load_dataset("synthetic", synthetic_root)
    meta = _meta(synthetic_root)
    assert len(index.videos) == 12
    assert [v.id for v in index.videos] == sorted(v["id"] for v in meta["videos"])
    assert {v.split for v in index.videos} == {"train", "val", "test"}
    assert sum(v.split == "train" for v in index.videos) == 6
    for i, video in enumerate(index.videos):
        assert video.path.is_file()
        texts = [c.text for c in index.captions if c.video_index == i]
        attrs = index.extra["attributes"][video.id]
        assert texts == captions_for(attrs["shape"], attrs["color"], attrs["background"], attrs["direction"])
        assert len(set(texts)) == 2
        assert all(c.split == video.split for c in index.captions if c.video_index == i)
    assert load_dataset("synthetic", synthetic_root).annotation_checksum == index.annotation_checksum


def test_captions_name_the_attributes():
    a, b = captions_for("circle", "red", "blue", "right")
    assert a == "a red circle moves from left to right on a blue background"
    assert b == "on a blue background, a red circle travels rightward"
    assert captions_for("square", "orange", "white", "up")[0] == (
        "an orange square moves from bottom to top on a white background"
    )


def test_videos_cover_awkward_cases(synthetic_root):
    meta = _meta(synthetic_root)
    rates = {Fraction(v["fps"]) for v in meta["videos"]}
    assert Fraction(30000, 1001) in rates and Fraction(12) in rates
    durations = [v["n_frames"] / float(Fraction(v["fps"])) for v in meta["videos"]]
    assert min(durations) < 1.0 and max(durations) > 2.0
    assert any(v["width"] != v["height"] for v in meta["videos"])
    with_audio = []
    for v in meta["videos"]:
        with av.open(str(synthetic_root / v["file"])) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height) == (v["width"], v["height"])
            assert stream.frames == v["n_frames"]
            assert stream.average_rate == Fraction(v["fps"])
            with_audio.append(bool(container.streams.audio))
    assert with_audio == [v["audio"] for v in meta["videos"]]
    assert any(with_audio) and not all(with_audio)


def _shape_centroid(frame: np.ndarray, color: str) -> tuple[float, float, float]:
    """(x, y) centroid as a fraction of the frame, and the fraction of pixels of `color`."""
    close = np.abs(frame.astype(np.int16) - np.array(COLORS[color])).max(axis=-1) < 40
    ys, xs = np.nonzero(close)
    h, w = close.shape
    return xs.mean() / w, ys.mean() / h, close.mean()


def test_pixels_show_what_the_caption_says(synthetic_root):
    meta = _meta(synthetic_root)
    checked = 0
    for v in meta["videos"]:
        frames = decode_clip(synthetic_root / v["file"], 8)
        background = np.abs(frames[0, 0, 0].astype(int) - COLORS[v["background"]]).max()
        assert background < 30, v["id"]  # the corner shows the background colour
        if len(frames) < 2:
            continue  # a sub-second clip gives one frame: no motion to check
        x0, y0, area0 = _shape_centroid(frames[0], v["color"])
        x1, y1, area1 = _shape_centroid(frames[-1], v["color"])
        assert area0 > 0.05 and area1 > 0.05, v["id"]  # a large shape, for a learnable signal
        axis, sign = DIRECTIONS[v["direction"]][:2]
        moved = (x1 - x0) if axis == 0 else (y1 - y0)
        assert sign * moved > 0.1, (v["id"], v["direction"], moved)
        checked += 1
    assert checked >= 8


def _decode_all(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_generation_is_deterministic_and_idempotent(tmp_path):
    kwargs = {"n_videos": 3, "seed": 5, "size_range": (64, 80), "duration_range": (0.6, 1.5)}
    a = generate_synthetic(tmp_path / "a", **kwargs)
    b = generate_synthetic(tmp_path / "b", **kwargs)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    # The pictures are deterministic; the bitstream is not always: this libx264 (threads=1) was seen
    # to entropy-code one 66x64 clip two ways from identical input frames, both decoding to the same
    # pixels. So: annotations equal apart from each file's own checksum, decoded frames equal.
    meta_a, meta_b = _meta(a), _meta(b)
    for meta in (meta_a, meta_b):
        for video in meta["videos"]:
            video.pop("sha256")
    assert meta_a == meta_b
    for rel in files_a:
        if rel.suffix == ".mp4":
            frames_a, frames_b = _decode_all(a / rel), _decode_all(b / rel)
            assert len(frames_a) == len(frames_b) > 0, rel
            assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b, strict=True)), rel

    stamps = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    generate_synthetic(a, **kwargs)  # same parameters, files intact: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == stamps

    video = a / _meta(a)["videos"][0]["file"]
    video.write_bytes(b"damaged")
    generate_synthetic(a, **kwargs)  # a damaged file is noticed and rewritten
    rewritten, reference = _decode_all(video), _decode_all(b / video.relative_to(a))
    assert len(rewritten) == len(reference) > 0
    assert all(np.array_equal(x, y) for x, y in zip(rewritten, reference, strict=True))

    generate_synthetic(a, **{**kwargs, "seed": 6})  # new parameters: a new set
    assert _meta(a)["params"]["seed"] == 6


def test_loader_generates_default_set_in_empty_root(tmp_path):
    index = load_dataset("synthetic", tmp_path / "fresh")
    assert len(index.videos) == 24 and len(index.captions) == 48
    assert (tmp_path / "fresh" / "synthetic.json").is_file()


def test_generator_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        generate_synthetic(tmp_path, n_videos=4, splits=(("train", 0.5), ("test", 0.2)))
    with pytest.raises(ValueError, match="distinct names"):
        generate_synthetic(tmp_path, n_videos=4, splits=(("train", 0.5), ("dev", 0.5)))
    with pytest.raises(ValueError, match="n_videos"):
        generate_synthetic(tmp_path, n_videos=0)
