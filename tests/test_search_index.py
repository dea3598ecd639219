"""`muse index` (stages/search.py build_index) and the index folder (search/index_format.py,
search/cache_columns.py): what is written, that it is self-contained, and how it is read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from search_helpers import CAPTIONS, FP, RANDOM_INIT_CLIP, TINY_D, TINY_T, FakeRun, brute_order, caption_store
from test_evaluate import _real_meanp_run

import muse_pipeline.models.checkpoint as checkpoint
from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.errors import InputError, UserError
from muse_pipeline.evaluation.embed import embed_videos
from muse_pipeline.search.cache_columns import clip_windows
from muse_pipeline.search.generations import open_index
from muse_pipeline.search.index_format import (
    IndexFormatError,
    StringColumn,
    VideoIndex,
    write_index,
    write_string_column,
)
from muse_pipeline.search.query import Searcher
from muse_pipeline.stages.search import build_index


def test_index_is_self_contained(caption_index) -> None:
    out, cache = caption_index
    assert (out / "CURRENT").read_text() == "gen-000001\n"
    index = open_index(out)
    assert index.path == (out / "gen-000001").resolve() and index.generation == "gen-000001"
    emb = np.asarray(index.embeddings)
    assert emb.dtype == np.float32 and emb.shape == (len(CAPTIONS), TINY_D)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert index.ids.all() == [f"clip{i}" for i in range(len(CAPTIONS))]
    assert index.paths[2] == "/videos/clip2.mp4"
    # Captions of the dataset: video 0 and 2 have one, the others none.
    assert [index.captions[i] for i in range(3)] == ["caption 0", "", "caption 1"]
    meta = json.loads((out / "gen-000001" / "index.json").read_text())
    assert meta["format"] == "muse-index" and meta["format_version"] == 3 and meta["n_videos"] == len(CAPTIONS)
    assert meta["clip"] == RANDOM_INIT_CLIP
    assert meta["search"] == {"kind": "exact", "params": {}} and meta["words"] == 16
    assert "run_dir" not in meta and str(cache.path) not in json.dumps(meta)  # nothing points back


def test_another_run_is_refused_unless_overwrite(caption_index, tmp_path: Path) -> None:
    out, cache = caption_index
    again = build_index(tmp_path / "run", cache.path, out)  # the same run and cache: nothing to do
    assert not again.published and again.generation == "gen-000001" and again.added == 0
    (tmp_path / "run2").mkdir()
    with pytest.raises(InputError, match="another run.*--overwrite"):
        build_index(tmp_path / "run2", cache.path, out)
    assert (out / "CURRENT").read_text() == "gen-000001\n" and sorted(p.name for p in out.iterdir()) == [
        "CURRENT", "gen-000001", "text-encoder"]
    replaced = build_index(tmp_path / "run2", cache.path, out, overwrite=True)
    assert replaced.path == out and replaced.generation == "gen-000002" and replaced.added == 5


def test_not_an_index_is_one_user_error(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="muse index"):
        VideoIndex(tmp_path / "nope")
    folder = write_index(tmp_path / "idx", np.eye(2, 4, dtype=np.float32), ids=["a", "b"], paths=["/a", "/b"],
                         clip=RANDOM_INIT_CLIP, words=8)
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(UserError, match="version 3"):
        VideoIndex(folder)


def test_string_column_round_trip(tmp_path: Path) -> None:
    values = ["a", "", "ünïcödé ✓", "x" * 1000, ""]
    write_string_column(tmp_path, "col", values)
    offsets = np.load(tmp_path / "col.off.npy")
    blob = (tmp_path / "col.bin").read_bytes()
    assert offsets.dtype == np.int64 and offsets.tolist()[0] == 0 and len(offsets) == len(values) + 1
    assert [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(values))] == values
    column = StringColumn(tmp_path, "col")
    assert len(column) == len(values) and column.all() == values
    write_string_column(tmp_path, "empty", ["", ""])
    assert StringColumn(tmp_path, "empty").all() == ["", ""]


def test_end_to_end_run_is_not_indexed_from_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"model": {"head": "muse"}, "cache": None, "end_to_end": True}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    with pytest.raises(UserError, match="end-to-end run"):
        build_index(tmp_path, tmp_path / "c.zarr", tmp_path / "i")


def test_moved_index_keeps_working_and_uses_the_stored_text_adapter(tmp_path: Path, tiny_clip) -> None:
    cache = caption_store(tmp_path, tiny_clip)
    run = _real_meanp_run(tmp_path, cache.path, FP, TINY_D, 2, TINY_T)
    # A non-trivial trained text adapter: the index must apply exactly the run's text side.
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "best.safetensors"))
    gen = torch.Generator().manual_seed(0)
    state["text_adapter.fc.weight"] = 0.05 * torch.randn(TINY_D, TINY_D, generator=gen)
    state["text_adapter.fc.bias"] = 0.05 * torch.randn(TINY_D, generator=gen)
    save_file(state, str(run / "best.safetensors"))
    model, _ = checkpoint.load_run(run)
    with torch.inference_mode():
        clip_q = tiny_clip.encode_texts(tiny_clip.tokenize(CAPTIONS, 16))
        want_q = model.embed_texts(clip_q).numpy()
        want_v = np.asarray(embed_videos(model, cache, np.arange(5), 8, "cpu"))
    want_v /= np.linalg.norm(want_v, axis=1, keepdims=True)
    built = build_index(run, None, None).path  # the run's own cache, index inside the run
    assert built == run.resolve() / "index"
    moved = tmp_path / "elsewhere" / "my-index"
    moved.parent.mkdir()
    shutil.copytree(built, moved)
    shutil.rmtree(run)
    shutil.rmtree(cache.path)
    searcher = Searcher(moved)
    np.testing.assert_allclose(searcher.encoder.encode(CAPTIONS), want_q, atol=1e-5)
    for k in (0, 3):
        hits = searcher.search([CAPTIONS[k]], top_k=5)[0]
        order = brute_order(want_v, want_q[k])
        assert [h["id"] for h in hits] == [f"clip{i}" for i in order]


def test_windows_from_clip_ids_and_media_path_fallback(tmp_path: Path, tiny_clip) -> None:
    videos = tmp_path / "data"
    videos.mkdir()
    for i in range(6):
        (videos / f"clip{i}.webm").write_bytes(b"x")
    ids = ["a@1.5-4", "b@-3", "c", "d@2-", "e", "f"]
    cache = caption_store(tmp_path, tiny_clip, ids=ids, paths=[str(videos / f"clip{i}.webm") for i in range(6)])
    # A store records each clip's window (extraction writes them from the dataset's clips) ...
    group = zarr.open_group(str(cache.path), mode="r+")
    group["videos/start"][:] = [1.5, np.nan, np.nan, 2.0, np.nan, np.nan]
    group["videos/end"][:] = [4.0, 3.0, np.nan, np.nan, np.nan, np.nan]
    # ... and a store made before it did is read by the rules of its ids
    legacy = tmp_path / "legacy.zarr"
    shutil.copytree(cache.path, legacy)
    legacy_group = zarr.open_group(str(legacy), mode="r+")
    del legacy_group["videos/start"], legacy_group["videos/end"]
    for store in (cache.path, legacy):
        w = clip_windows(FeatureCache.open(store), np.arange(5))
        np.testing.assert_array_equal(w[0], [1.5, 4.0])
        assert np.isnan(w[1, 0]) and w[1, 1] == 3.0 and np.isnan(w[2]).all() and w[3, 0] == 2.0
    assert FeatureCache.open(cache.path).has_windows and not FeatureCache.open(legacy).has_windows
    # An index moved together with its videos finds them through the relative paths.
    out = write_index(tmp_path / "idx", np.eye(5, TINY_D, dtype=np.float32), ids=ids[:5],
                      paths=[str(videos / f"clip{i}.webm") for i in range(5)], windows=w,
                      clip=RANDOM_INIT_CLIP, words=16)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.move(str(out), bundle / "idx")
    shutil.move(str(videos), bundle / "data")
    index = VideoIndex(bundle / "idx")
    assert index.media_path(1) == bundle / "idx" / ".." / "data" / "clip1.webm"
    assert index.media_path(1).is_file()
    hit = index.hit(0, 0.5, 1)
    assert (hit["start"], hit["end"], hit["caption"]) == (1.5, 4.0, None)
    assert index.hit(2, 0.5, 1)["start"] == 0.0 and index.hit(2, 0.5, 1)["end"] is None
