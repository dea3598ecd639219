"""FeatureCache: the documented Zarr v3 layout, write/read semantics, resume, fingerprint, HDF5 export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import store_videos

from muse_pipeline.cache import (
    FeatureCache,
    FingerprintMismatch,
    cache_info,
    default_videos_per_shard,
    export_hdf5,
)
from muse_pipeline.cache.schema import RowFacts
from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem

T, L, D, W, S = 3, 5, 4, 6, 3  # frames, tokens per frame, dim, words, videos per shard
SPLITS = ["train", "train", "test", "val", "train", "test", "test"]  # 7 videos -> shards of 3, 3, 1
FP = {"dataset": "toy", "encoder": {"model_name": "muse-tiny", "weights_id": "random-init"}, "frames": T}


def _index() -> DatasetIndex:
    videos = tuple(VideoItem(f"vid{i}", Path(f"/data/vid{i}.mp4"), s) for i, s in enumerate(SPLITS))
    captions = tuple(
        CaptionItem(f"caption {j} of video {v}", v, SPLITS[v])
        for j, v in enumerate([0, 0, 1, 2, 3, 4, 5, 6, 6])
    )
    return DatasetIndex("toy", Path("/data"), videos, captions, "abc")


def _text_tokens(m: int = 9) -> np.ndarray:
    return np.arange(m * W, dtype=np.int32).reshape(m, W) + 7


def _create(path: Path, **kw) -> FeatureCache:
    args = dict(frames=T, num_tokens=L, dim=D, words=W, fingerprint=FP, videos_per_shard=S)
    args.update(kw)
    return FeatureCache.create(path, _index(), **args)


def _tokens(i: int, n: int) -> np.ndarray:
    return (np.random.default_rng(i).standard_normal((n, L, D)) + i).astype(np.float16)


def _snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


def test_layout_matches_the_documented_format(tmp_path: Path) -> None:
    _create(tmp_path / "c.zarr", text_tokens=_text_tokens())
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert root.metadata.zarr_format == 3
    attrs = dict(root.attrs)
    assert attrs == {"format": "muse-cache", "format_version": 1, "fingerprint": FP, "failures": []}
    expected = {
        "videos/tokens": ((7, T, L, D), "float16"),
        "videos/mask": ((7, T), "uint8"),
        "videos/done": ((7,), "uint8"),
        "videos/start": ((7,), "float64"),
        "videos/end": ((7,), "float64"),
        "texts/tokens": ((9, W), "int32"),
        "texts/embeddings": ((9, D), "float16"),
        "texts/video_index": ((9,), "int32"),
        "texts/done": ((9,), "uint8"),
    }
    for name, (shape, dtype) in expected.items():
        arr = root[name]
        assert arr.shape == shape and arr.dtype == np.dtype(dtype), name
    for name, n in (
        ("videos/ids", 7),
        ("videos/split", 7),
        ("videos/paths", 7),
        ("texts/split", 9),
        ("texts/captions", 9),
    ):
        arr = root[name]
        assert arr.shape == (n,) and arr.dtype.kind == "T", name  # zarr's variable-length string dtype
        assert json.loads((tmp_path / "c.zarr" / name / "zarr.json").read_text())["data_type"] == "string"
    tokens = root["videos/tokens"]
    assert tokens.chunks == (1, T, L, D) and tokens.shards == (S, T, L, D)
    assert tokens.compressors == ()  # raw by default: reads are ~4x faster than zstd (BENCHMARKS.md)
    _create(tmp_path / "z.zarr", compression="zstd")
    (blosc,) = zarr.open_group(str(tmp_path / "z.zarr"), mode="r")["videos/tokens"].compressors
    assert type(blosc).__name__ == "BloscCodec" and blosc.cname.value == "zstd"
    with pytest.raises(ValueError, match="compression"):
        _create(tmp_path / "bad.zarr", compression="lz4")
    assert root["videos/mask"].chunks == (S, T) and root["videos/mask"].shards is None
    assert root["videos/done"].chunks == (S,) and root["videos/done"].shards is None
    assert root["videos/ids"][:].tolist() == [f"vid{i}" for i in range(7)]
    assert root["videos/split"][:].tolist() == SPLITS
    assert root["videos/paths"][:].tolist() == [f"/data/vid{i}.mp4" for i in range(7)]
    assert np.isnan(root["videos/start"][:]).all() and np.isnan(root["videos/end"][:]).all()  # whole videos
    assert root["texts/video_index"][:].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert root["texts/captions"][2] == "caption 2 of video 1"
    np.testing.assert_array_equal(root["texts/tokens"][:], _text_tokens())
    assert (root["videos/done"][:] == 0).all() and (root["texts/done"][:] == 0).all()


def test_default_videos_per_shard() -> None:
    # ViT-B/32, 12 frames: 614,400 B per video -> 436 videos in 256 MiB.
    assert default_videos_per_shard(10_000, 12, 50, 512) == (256 * 2**20) // (12 * 50 * 512 * 2) == 436
    assert default_videos_per_shard(100, 12, 50, 512) == 100  # at most N
    assert default_videos_per_shard(5, 64, 785, 8192) == 1  # at least 1 even if one video exceeds it


def test_properties_and_shard_ranges(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    assert (cache.n_videos, cache.n_texts, cache.frames, cache.num_tokens, cache.dim, cache.words) == (
        7,
        9,
        T,
        L,
        D,
        W,
    )
    assert (cache.videos_per_shard, cache.n_shards) == (S, 3)
    assert [cache.shard_range(k) for k in range(3)] == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(IndexError):
        cache.shard_range(3)
    assert cache.fingerprint == FP
    assert _create(tmp_path / "d.zarr", videos_per_shard=None).videos_per_shard == 7  # tiny videos: one shard


def test_write_read_round_trip_with_mask_and_done(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    frames = {0: 3, 1: 1, 3: 2, 4: 3, 5: 3, 6: 1}
    store_videos(cache, {i: None if i == 2 else _tokens(i, frames[i]) for i in range(7)})
    reader = FeatureCache.open(tmp_path / "c.zarr")
    tokens, mask = reader.read_videos(range(7))
    assert tokens.dtype == np.float16 and tokens.shape == (7, T, L, D)
    assert mask.dtype == np.uint8 and mask.shape == (7, T)
    for i in range(7):
        n = frames.get(i, 0)
        assert mask[i].tolist() == [1] * n + [0] * (T - n)
        if n:
            np.testing.assert_array_equal(tokens[i, :n], _tokens(i, n))
        assert (tokens[i, n:] == 0).all()  # padding and failed videos are zeros
    assert reader.read_done().tolist() == [1, 1, 2, 1, 1, 1, 1]
    assert reader.progress() == {
        "videos": 7,
        "cached": 6,
        "failed": 1,
        "pending": 0,
        "retired": 0,
        "texts": 9,
        "texts_done": 0,
    }
    assert reader.pending_videos().tolist() == []


def test_read_videos_order_duplicates_and_sparse(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    store_videos(cache, {i: _tokens(i, 1 + i % T) for i in range(7)})
    full_tokens, full_mask = cache.read_videos(np.arange(7))
    for idx in ([6, 0, 3], [1, 1, 5], [0, 2, 6], [4]):
        tokens, mask = cache.read_videos(idx)
        np.testing.assert_array_equal(tokens, full_tokens[idx])
        np.testing.assert_array_equal(mask, full_mask[idx])
    assert cache.read_videos([])[0].shape == (0, T, L, D)
    with pytest.raises(IndexError):
        cache.read_videos([7])


def test_write_shard_videos_batch(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    tokens = np.stack([np.pad(_tokens(i, 2), ((0, T - 2), (0, 0), (0, 0))) for i in (3, 4)])
    mask = np.array([[1, 1, 0], [1, 1, 0]], np.uint8)
    cache.write_shard_videos(3, tokens, mask, np.array([1, 1], np.uint8))
    got, got_mask = FeatureCache.open(tmp_path / "c.zarr").read_videos([3, 4])
    np.testing.assert_array_equal(got, tokens)
    np.testing.assert_array_equal(got_mask, mask)
    with pytest.raises(ValueError, match="span shards"):
        cache.write_shard_videos(2, tokens, mask, np.array([1, 1], np.uint8))


def test_a_write_to_shard_k_touches_only_shard_k_files(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    cache = _create(path)
    store_videos(cache, {i: _tokens(i, 2) for i in (0, 1, 2, 6)})  # shards 0 and 2 have data files already
    before = _snapshot(path)
    store_videos(cache, {i: _tokens(i, 3) for i in (3, 4, 5)})
    after = _snapshot(path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed == {"videos/tokens/c/1/0/0/0", "videos/mask/c/1/0", "videos/done/c/1"}


def test_reopen_resumes_the_pending_list(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    cache = _create(path)
    store_videos(cache, {i: _tokens(i, 1) for i in (3, 4, 5)})  # shard 1 stored, then the process "dies"
    del cache
    resumed = FeatureCache.open_or_create(
        path, _index(), frames=T, num_tokens=L, dim=D, words=W, fingerprint=FP
    )
    assert resumed.pending_videos().tolist() == [0, 1, 2, 6]
    assert resumed.progress()["cached"] == 3
    np.testing.assert_array_equal(resumed.read_videos([4])[0][0, 0], _tokens(4, 1)[0])


def test_fingerprint_mismatch_is_refused_and_overwrite_recreates(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    cache = _create(path)
    store_videos(cache, {i: _tokens(i, 1) for i in range(3)})
    other = {**FP, "encoder": {"model_name": "muse-tiny", "weights_id": "sha256-of-a-file"}, "extra": 1}
    kw = dict(frames=T, num_tokens=L, dim=D, words=W)
    with pytest.raises(FingerprintMismatch) as err:
        FeatureCache.open_or_create(path, _index(), fingerprint=other, **kw)
    assert err.value.keys == ["fingerprint.encoder.weights_id", "fingerprint.extra"]
    assert "--overwrite" in str(err.value) and "encoder.weights_id" in str(err.value)
    with pytest.raises(FingerprintMismatch) as err:
        FeatureCache.open_or_create(path, _index(), fingerprint=FP, **{**kw, "frames": T + 1})
    assert err.value.keys == ["layout.frames"]
    assert FeatureCache.open(path).progress()["cached"] == 3  # refused: nothing was touched
    with pytest.raises(FileExistsError, match="--overwrite"):
        _create(path)

    fresh = FeatureCache.open_or_create(path, _index(), fingerprint=other, overwrite=True, **kw)
    assert fresh.fingerprint == other
    assert fresh.pending_videos().tolist() == list(range(7))
    assert not list(tmp_path.glob(".c.zarr.tmp-*"))


def test_overwrite_never_deletes_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a muse feature cache"):
        _create(foreign, overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_texts_and_failures(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    cache = _create(path)
    ids = _text_tokens()
    emb = np.random.default_rng(0).standard_normal((9, D)).astype(np.float16)
    cache.write_texts(0, token_ids=ids)
    cache.write_texts(2, embeddings=emb[2:5])
    reader = FeatureCache.open(path)
    assert reader.read_text_done().tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(reader.read_text_embeddings([4, 2]), emb[[4, 2]])
    np.testing.assert_array_equal(reader.read_text_tokens([8, 0, 8]), ids[[8, 0, 8]])
    tok, e = reader.read_texts()
    np.testing.assert_array_equal(tok, ids)
    assert (e[[0, 1, 5]] == 0).all()

    cache.add_failures([{"id": "vid2", "reason": "no decodable frames"}])
    cache.add_failures([{"id": "vid5", "reason": "missing file"}, {"id": "vid2", "reason": "truncated"}])
    assert FeatureCache.open(path).failures == [
        {"id": "vid5", "reason": "missing file"},
        {"id": "vid2", "reason": "truncated"},
    ]
    assert FeatureCache.open(path).fingerprint == FP  # attrs update keeps the other keys


def test_split_indices(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    v, t = cache.split_indices("test")
    assert v.tolist() == [2, 5, 6] and t.tolist() == [3, 6, 7, 8]
    v, t = cache.split_indices("train")
    assert v.tolist() == [0, 1, 4] and t.tolist() == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="unknown split"):
        cache.split_indices("dev")


def test_bad_writes_are_refused(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    one = (np.zeros((1, T, L, D), np.float16), np.ones((1, T), np.uint8), np.ones(1, np.uint8))
    with pytest.raises(ValueError, match="expected tokens"):
        cache.write_shard_videos(0, np.zeros((1, T + 1, L, D)), *one[1:])
    with pytest.raises(ValueError, match="done values"):
        cache.write_shard_videos(0, *one[:2], np.array([4], np.uint8))
    with pytest.raises(IndexError):
        cache.write_shard_videos(7, *one)
    with pytest.raises(PermissionError, match="read-only"):
        FeatureCache.open(tmp_path / "c.zarr").write_shard_videos(0, *one)
    with pytest.raises(ValueError, match="not a muse feature cache"):
        FeatureCache.open(tmp_path)


def test_hdf5_export_equals_the_zarr_arrays(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    n = len(SPLITS)
    facts = RowFacts(np.arange(n) + 0.5, np.arange(n, dtype=np.int64) * 1000, np.arange(n, dtype=np.int64) + 7)
    cache = _create(path, text_tokens=_text_tokens(), facts=facts)
    store_videos(cache, {i: None if i == 5 else _tokens(i, 1 + i % T) for i in range(6)})  # video 6 stays pending
    cache.write_texts(0, embeddings=np.random.default_rng(1).standard_normal((9, D)).astype(np.float16))
    cache.add_failures([{"id": "vid5", "reason": "missing file"}])

    out = export_hdf5(path, tmp_path / "export" / "c.h5")
    root = zarr.open_group(str(path), mode="r")
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "muse-cache" and f.attrs["format_version"] == 1
        assert json.loads(f.attrs["fingerprint"]) == FP
        assert json.loads(f.attrs["failures"]) == [{"id": "vid5", "reason": "missing file"}]
        assert set(f["videos"]) == {"tokens", "mask", "done", "ids", "split", "paths", "start", "end", "source",
                                    "duration", "grid_step", "file_size", "file_mtime_ns"}
        assert set(f["texts"]) == {"tokens", "embeddings", "video_index", "split", "captions", "done"}
        for group in ("videos", "texts"):
            for name in f[group]:
                ours, theirs = f[group][name], root[f"{group}/{name}"]
                if theirs.dtype.kind == "T":
                    assert [s.decode() for s in ours[:]] == theirs[:].tolist(), name
                else:
                    assert ours.dtype == theirs.dtype, name
                    np.testing.assert_array_equal(ours[:], theirs[:], err_msg=name)
        assert f["videos/tokens"].chunks == (1, T, L, D) and f["videos/tokens"].compression == "gzip"
        assert f["videos/duration"][:].tolist() == [i + 0.5 for i in range(n)]  # the facts given, exported


def test_cache_info(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    cache = _create(path)
    store_videos(cache, {0: _tokens(0, 1), 1: _tokens(1, 1), 2: None})
    cache.write_texts(0, embeddings=np.ones((2, D), np.float16))
    cache.add_failures([{"id": "vid2", "reason": "broken"}])
    info = cache_info(path)
    json.dumps(info)
    assert info["splits"]["train"] == {
        "videos": 3,
        "cached": 2,
        "failed": 0,
        "pending": 1,
        "texts": 4,
        "texts_done": 2,
    }
    assert info["splits"]["test"] == {
        "videos": 3,
        "cached": 0,
        "failed": 1,
        "pending": 2,
        "texts": 4,
        "texts_done": 0,
    }
    assert info["splits"]["val"]["pending"] == 1
    assert (info["cached"], info["failed"], info["pending"]) == (2, 1, 4)
    assert info["fingerprint"] == FP and info["failures"] == [{"id": "vid2", "reason": "broken"}]
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) > 0
    assert (info["n_shards"], info["videos_per_shard"], info["frames"]) == (3, S, T)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_batch_reads_equal_zarr_bit_for_bit(tmp_path: Path, compression) -> None:
    """read_videos (whole chunks straight from the shard files) against zarr's own reads of the same
    store: unsorted, repeated, across shards, never-written rows (fill value) and the short last shard."""
    cache = _create(tmp_path / "c.zarr", compression=compression)
    # 3 and 5 stay pending: shard 1 is partial, row 5 never written
    store_videos(cache, {i: _tokens(i, 1 + i % T) for i in (0, 1, 2, 4, 6)})
    reader = FeatureCache.open(tmp_path / "c.zarr")
    raw = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    want_tokens, want_mask = raw["videos/tokens"][:], raw["videos/mask"][:]
    for rows in ([6, 0, 3], [1, 1, 5, 5], list(range(7)), [4], [], [5, 2, 6, 0]):
        tokens, mask = reader.read_videos(rows)
        assert tokens.dtype == np.float16 and tokens.shape == (len(rows), T, L, D)
        np.testing.assert_array_equal(tokens, want_tokens[rows])
        np.testing.assert_array_equal(mask, want_mask[rows])
    assert reader._shard_files, "the direct shard reader should apply to the layout create() writes"


def test_batch_reads_fall_back_to_zarr_slices_for_other_layouts(tmp_path: Path, monkeypatch) -> None:
    cache = _create(tmp_path / "c.zarr")
    store_videos(cache, {i: _tokens(i, 1 + i % T) for i in range(7)})
    direct = FeatureCache.open(tmp_path / "c.zarr").read_videos([6, 1, 2, 3])
    from muse_pipeline.cache import shard_reader

    monkeypatch.setattr(shard_reader.ShardFileReader, "open", classmethod(lambda cls, root: None))
    reader = FeatureCache.open(tmp_path / "c.zarr")
    sliced = reader.read_videos([6, 1, 2, 3])
    assert reader._shard_files is False
    np.testing.assert_array_equal(sliced[0], direct[0])
    np.testing.assert_array_equal(sliced[1], direct[1])


def test_reader_sees_a_rewritten_shard_and_rejects_a_damaged_index(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    store_videos(cache, {i: _tokens(i, T) for i in range(3)})
    first, _ = cache.read_videos([0, 1, 2])
    np.testing.assert_array_equal(first[1], _tokens(1, T))
    cache.write_shard_videos(0, np.stack([_tokens(10 + i, T) for i in range(3)]), np.ones((3, T), np.uint8),
                             np.ones(3, np.uint8))
    again, _ = cache.read_videos([1])
    np.testing.assert_array_equal(again[0], _tokens(11, T))  # the cached shard index was refreshed

    shard = tmp_path / "c.zarr" / "videos" / "tokens" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its crc32c
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match="crc32c"):
        FeatureCache.open(tmp_path / "c.zarr").read_videos([0])


def test_read_videos_into_validates_its_buffers(tmp_path: Path) -> None:
    cache = _create(tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="float16"):
        cache.read_videos_into(np.array([0]), np.zeros((1, T, L, D), np.float32))
    with pytest.raises(ValueError, match="sorted"):
        cache.read_videos_into(np.array([2, 1]), np.zeros((2, T, L, D), np.float16))
    out = np.full((2, T, L, D), 7, np.float16)
    cache.read_videos_into(np.array([3, 4]), out)
    assert (out == 0).all()  # pending rows read as the fill value


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_shard_file_reader_equals_its_zarr_slice_reference(tmp_path: Path, compression) -> None:
    from muse_pipeline.cache.shard_reader import ShardFileReader, read_rows_sliced

    cache = _create(tmp_path / "c.zarr", compression=compression)
    store_videos(cache, {i: _tokens(i, 1 + i % T) for i in (0, 2, 3, 6)})  # row 1 and rows 4-5 never written
    array = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["videos/tokens"]
    reader = ShardFileReader.open(tmp_path / "c.zarr" / "videos" / "tokens")
    assert reader is not None
    for rows in ([0, 1, 2, 3, 4, 5, 6], [1, 4], [6], [0, 3, 5]):
        rows = np.asarray(rows, dtype=np.int64)
        fast = np.full((rows.size, T, L, D), 9, np.float16)
        slow = np.full((rows.size, T, L, D), 7, np.float16)
        reader.read_into(rows, fast, cache.videos_per_shard)
        read_rows_sliced(array, rows, slow)
        assert fast.tobytes() == slow.tobytes()


def test_read_windows_of_a_store_without_window_arrays_is_nan(tmp_path: Path) -> None:
    import shutil

    _create(tmp_path / "c.zarr")
    for name in ("start", "end"):  # a store made before the window arrays existed
        shutil.rmtree(tmp_path / "c.zarr" / "videos" / name)
    windows = FeatureCache.open(tmp_path / "c.zarr").read_windows([0, 6])
    assert windows.shape == (2, 2) and np.isnan(windows).all()
    with pytest.raises(IndexError):
        FeatureCache.open(tmp_path / "c.zarr").read_windows([7])


def test_fingerprint_key_sets_compare_as_their_callers_did() -> None:
    from muse_pipeline.cache.compat import CLIP_KEYS, RESUME_KEYS, differing_keys, fingerprint_paths_differing

    run = {"dataset": "msrvtt", "model": "ViT-B-32", "weights": "w1", "frames": 12, "extra": 1}
    # resume: a key the cache lacks differs; keys outside the set never count
    assert differing_keys(run, {"dataset": "msrvtt", "model": "ViT-B-32", "weights": "w1"}, RESUME_KEYS) == ["frames"]
    assert differing_keys(run, {**run, "weights": "w2", "extra": 2}, RESUME_KEYS) == ["weights"]
    # evaluation: only the CLIP keys, and only where both sides have them
    assert differing_keys(run, {"model": "ViT-B-16"}, CLIP_KEYS) == ["model"]
    assert differing_keys(run, {"dataset": "didemo", "frames": 8}, CLIP_KEYS) == []
    assert differing_keys({}, {"model": "x"}, RESUME_KEYS) == []  # keys the run lacks are not compared
    assert fingerprint_paths_differing({"a": 1, "b": {"c": 1}}, {"a": 1, "b": {"c": 2}, "d": 0}, "fp.") == [
        "fp.b.c", "fp.d"]
    assert fingerprint_paths_differing({"a": [1]}, {"a": [1]}) == []
