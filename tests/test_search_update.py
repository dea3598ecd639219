"""`muse index` on an existing index: a new generation with only the new rows embedded, retired rows
dropped, the rest copied; faiss updated or rebuilt; generation folders immutable and pruned
(stages/search.py, search/update.py, search/generations.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from search_helpers import FP, TINY_D, TINY_L

from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.errors import InputError
from muse_pipeline.search.generations import current_generation, generations, open_index
from muse_pipeline.search.index_format import write_index
from muse_pipeline.search.topk import SearchPlan
from muse_pipeline.search.update import RowPlan, ann_choice, plan_rows
from muse_pipeline.stages.search import build_index

T = 2
RETIRED = 3


def _store(tmp_path: Path, n: int, cached: int, seed: int = 0, frames: int = T) -> tuple[FeatureCache, np.ndarray]:
    """A cache of n rows (one shard) whose first `cached` rows are extracted; returns it and all tokens."""
    from test_evaluate import make_store

    tokens = np.random.default_rng(seed).normal(size=(n, frames, TINY_L, TINY_D)).astype(np.float32)
    done = np.zeros(n, np.uint8)
    done[:cached] = 1
    cache = make_store(tmp_path / "lib.zarr", tokens, np.ones((n, frames), np.uint8), done, ["test"] * n,
                       np.zeros((0, TINY_D), np.float32), np.zeros(0, np.int64),
                       ids=[f"f{i}" for i in range(n)], paths=[f"/lib/f{i}.mp4" for i in range(n)],
                       fingerprint={**FP, "frames": frames})
    return cache, tokens


def _set_done(cache: FeatureCache, rows: list[int], value: int) -> None:
    """Change /videos/done as extraction does (extract more rows, or retire them: 3)."""
    done = zarr.open_array(str(cache.path / "videos" / "done"), mode="r+")
    for r in rows:
        done[r] = value


def _meanp(tokens: np.ndarray) -> np.ndarray:
    cls = tokens[:, :, 0, :].astype(np.float16).astype(np.float64)
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    pooled = cls.mean(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.fixture()
def read_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every cache row whose tokens are read (a spy on FeatureCache.read_videos)."""
    seen: list[int] = []
    original = FeatureCache.read_videos

    def spy(self, indices):
        seen.extend(int(i) for i in np.asarray(indices).reshape(-1))
        return original(self, indices)

    monkeypatch.setattr(FeatureCache, "read_videos", spy)
    return seen


def test_update_embeds_only_new_rows_and_drops_retired(tmp_path: Path, read_rows: list[int]) -> None:
    cache, tokens = _store(tmp_path, n=10, cached=6)
    out = tmp_path / "index"
    first = build_index(None, cache.path, out)
    assert (first.generation, first.added, first.kept, first.removed) == ("gen-000001", 6, 0, 0)
    assert sorted(read_rows) == list(range(6))
    old_bytes = {p.name: p.read_bytes() for p in (out / "gen-000001").iterdir()}
    # Extraction added rows 6-8 (a changed file's new rows among them) and retired rows 1 and 4.
    _set_done(cache, [6, 7, 8], 1)
    _set_done(cache, [1, 4], RETIRED)
    read_rows.clear()
    second = build_index(None, cache.path, out)
    assert sorted(read_rows) == [6, 7, 8]  # the copied rows' tokens are not even read
    assert (second.generation, second.added, second.kept, second.removed, second.faiss) == (
        "gen-000002", 3, 4, 2, "none")
    index = open_index(out)
    assert index.generation == "gen-000002" and index.ids.all() == ["f0", "f2", "f3", "f5", "f6", "f7", "f8"]
    np.testing.assert_allclose(np.asarray(index.embeddings), _meanp(tokens[[0, 2, 3, 5, 6, 7, 8]]), atol=1e-5)
    np.testing.assert_array_equal(index.cache_rows, [0, 2, 3, 5, 6, 7, 8])
    assert index.meta["update"] == {"previous": "gen-000001", "added": 3, "removed": 2, "kept": 4, "faiss": "none"}
    # The previous generation is untouched (a server may still be reading it).
    assert {p.name: p.read_bytes() for p in (out / "gen-000001").iterdir()} == old_bytes
    # Nothing changed since: no new generation.
    from typer.testing import CliRunner

    from muse_pipeline.cli.main import app

    read_rows.clear()
    same = CliRunner().invoke(app, ["index", "--cache", str(cache.path), "--out", str(out)])
    assert same.exit_code == 0 and "is up to date (gen-000002, 7 videos)" in same.output and read_rows == []
    # A third generation removes the first (two newer ones exist), keeps the second.
    _set_done(cache, [9], 1)
    third = CliRunner().invoke(app, ["index", "--cache", str(cache.path), "--out", str(out)])
    assert third.exit_code == 0, third.output
    assert "gen-000003: 1 embedded, 7 copied, 0 removed; exact search, no faiss index" in " ".join(third.output.split())
    assert generations(out) == ["gen-000002", "gen-000003"] and current_generation(out) == "gen-000003"


def test_ann_index_updated_when_only_added_rebuilt_after_removals(tmp_path: Path, read_rows: list[int]) -> None:
    cache, tokens = _store(tmp_path, n=60, cached=50, seed=1)
    out = tmp_path / "index"
    kw = {"approx_threshold": 20}
    assert build_index(None, cache.path, out, **kw).faiss == "rebuilt"
    first_ann = (out / "gen-000001" / "ann.faiss").read_bytes()
    _set_done(cache, list(range(50, 55)), 1)
    read_rows.clear()
    updated = build_index(None, cache.path, out, **kw)
    assert updated.faiss == "updated" and sorted(read_rows) == list(range(50, 55))
    index = open_index(out)
    assert index.kind == "hnsw" and index.ann_index().ntotal == 55
    assert (out / "gen-000001" / "ann.faiss").read_bytes() == first_ann
    # The added rows are found through the updated faiss index (their own vectors as queries).
    want = _meanp(tokens[:55]).astype(np.float32)
    _, rows = index.search_vectors(want[50:55], 1)
    assert rows[:, 0].tolist() == [50, 51, 52, 53, 54]
    assert index.meta["search"]["params"]["efSearch"] >= 1
    _set_done(cache, [3], RETIRED)
    rebuilt = build_index(None, cache.path, out, **kw)
    assert rebuilt.faiss == "rebuilt" and open_index(out).ann_index().ntotal == 54


def test_other_source_needs_overwrite_and_legacy_flat_index_is_generation_0(tmp_path: Path) -> None:
    cache, _ = _store(tmp_path, n=4, cached=4)
    out = tmp_path / "index"
    # An index written before generations (flat folder, no cache rows) is generation "0".
    write_index(out, np.eye(4, TINY_D, dtype=np.float32), ids=["a", "b", "c", "d"], paths=["/a"] * 4,
                clip={"model": "muse-tiny", "weights_id": "random-init"}, words=16)
    assert current_generation(out) == "0" and open_index(out).generation == "0"
    with pytest.raises(InputError, match="another run / cache / clip.*--overwrite"):
        build_index(None, cache.path, out)
    built = build_index(None, cache.path, out, overwrite=True)
    assert built.generation == "gen-000001" and (out / "index.json").is_file()  # gen 0 kept: one newer only
    _set_done(cache, [2], RETIRED)
    build_index(None, cache.path, out)
    assert not (out / "index.json").exists() and not (out / "embeddings.npy").exists()
    assert sorted(p.name for p in out.iterdir()) == ["CURRENT", "gen-000001", "gen-000002", "text-encoder"]
    # The library re-extracted from scratch with another frame count is another cache: refused.
    import shutil

    shutil.rmtree(cache.path)
    _store(tmp_path, n=4, cached=4, frames=3)
    with pytest.raises(InputError, match="another cache"):
        build_index(None, cache.path, out)


def test_plan_rows_against_hand_counts() -> None:
    cache_ids = ["a", "b", "c", "d", "e", "f"]
    # Old generation: cache rows 0, 1, 3 (row 3's id was "x" then: not the same video).
    old_rows, old_ids = np.array([0, 1, 3]), ["a", "b", "x"]
    plan = plan_rows(old_rows, old_ids, np.array([0, 3, 4, 5]), cache_ids)
    assert plan.keep.tolist() == [0] and plan.new_cache_rows.tolist() == [3, 4, 5] and plan.removed == 2
    assert plan.cache_rows.tolist() == [0, 3, 4, 5]
    fresh = plan_rows(None, ["a"], np.array([5, 0]), cache_ids)
    assert fresh.keep.size == 0 and fresh.new_cache_rows.tolist() == [0, 5] and fresh.removed == 1
    hnsw = SearchPlan("hnsw", {})
    grow = RowPlan(np.arange(10), np.arange(10), np.arange(10, 15), 0)
    assert ann_choice("hnsw", True, hnsw, grow) == "updated"
    assert ann_choice("hnsw", True, hnsw, RowPlan(np.arange(10), np.arange(10), np.arange(10, 16), 0)) == "rebuilt"
    assert ann_choice("hnsw", True, hnsw, RowPlan(np.arange(10), np.arange(10), np.arange(10, 11), 1)) == "rebuilt"
    assert ann_choice("ivf-flat", True, hnsw, grow) == "rebuilt" and ann_choice(None, False, hnsw, grow) == "rebuilt"
    assert ann_choice("hnsw", True, SearchPlan("exact", {}), grow) == "none"
