"""Moments: hits carry start/end (window, else 0 and the file's duration), `muse search` prints them,
`--group` gathers them per file, the `--html` page plays each at its moment (search/moments.py,
query.py, html.py, cli/search.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from search_helpers import RANDOM_INIT_CLIP, TINY_D, caption_store, unit_text_embeddings
from typer.testing import CliRunner

from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.cli.main import app
from muse_pipeline.search.index_format import write_index
from muse_pipeline.search.moments import group_by_source, media_fragment, moment_label
from muse_pipeline.search.query import Searcher

QUERY = "a red circle moves left"


@pytest.fixture()
def moments_index(tmp_path: Path, tiny_clip):
    """An index of 7 rows from 3 files: long.mp4 cut in 4 windows, short.mp4 whole (duration 4 s),
    gone.mp4 whole (deleted, duration unknown). Row scores for QUERY are set by construction."""
    files = tmp_path / "videos"
    files.mkdir()
    for name in ("long.mp4", "short.mp4"):
        (files / name).write_bytes(b"x")
    q = unit_text_embeddings(tiny_clip, [QUERY])[0]
    other = np.linalg.qr(np.stack([q, *np.random.default_rng(0).normal(size=(1, TINY_D))]).T)[0][:, 1]
    cosines = [0.2, 0.9, 0.5, 0.1, 0.7, 0.95, 0.3]  # score of each row for QUERY
    emb = np.stack([c * q + np.sqrt(1 - c * c) * other for c in cosines]).astype(np.float32)
    ids = ["long@0-30", "long@15-45", "long@30-60", "long@45-60", "short", "gone", "long@60-75"]
    sources = ["long", "long", "long", "long", "short", "gone", "long"]
    paths = [str(files / f"{s}.mp4") for s in sources]
    windows = np.array([[0, 30], [15, 45], [30, 60], [45, 60], [np.nan, np.nan], [np.nan, np.nan], [60, 75]])
    durations = np.array([75, 75, 75, 75, 4.0, np.nan, 75])
    out = write_index(tmp_path / "index", emb, ids=ids, paths=paths, sources=sources, windows=windows,
                      durations=durations, clip=RANDOM_INIT_CLIP, words=16)
    return out, cosines, ids


def test_hits_carry_moments_and_missing_files(moments_index) -> None:
    out, cosines, ids = moments_index
    hits = Searcher(out).search([QUERY], top_k=7)[0]
    order = np.argsort(-np.array(cosines), kind="stable")
    assert [h["id"] for h in hits] == [ids[i] for i in order]
    by_id = {h["id"]: h for h in hits}
    assert (by_id["long@15-45"]["start"], by_id["long@15-45"]["end"], by_id["long@15-45"]["source"]) == (15, 45, "long")
    assert (by_id["short"]["start"], by_id["short"]["end"]) == (0.0, 4.0)  # whole file: its duration
    assert (by_id["gone"]["start"], by_id["gone"]["end"]) == (0.0, None)  # duration unknown
    assert by_id["gone"]["missing"] is True and not any(h["missing"] for h in hits if h["id"] != "gone")


def test_group_by_source_against_brute_force(moments_index) -> None:
    out, cosines, ids = moments_index
    groups = Searcher(out).search_grouped([QUERY], top_k=2)[0]
    # By hand: best rows per file: gone 0.95, long 0.9 (then 0.5, 0.3, 0.2, 0.1), short 0.7.
    assert [g["source"] for g in groups] == ["gone", "long"]
    assert [m["id"] for m in groups[1]["moments"]] == ["long@15-45", "long@30-60", "long@60-75", "long@0-30",
                                                       "long@45-60"]
    assert groups[1]["score"] == pytest.approx(0.9, abs=1e-5) and groups[0]["missing"] is True
    assert [g["rank"] for g in groups] == [1, 2]
    # top_k larger than the number of files: every file once.
    assert [g["source"] for g in Searcher(out).search_grouped([QUERY], top_k=10)[0]] == ["gone", "long", "short"]
    hits = [{"id": "a", "source": "f", "path": "/f", "score": 0.5}, {"id": "b", "source": "g", "path": "/g",
                                                                     "score": 0.4}]
    assert [g["source"] for g in group_by_source(hits, 1)] == ["f"]


def test_cli_prints_moments_and_groups(moments_index) -> None:
    out, _, _ = moments_index
    runner = CliRunner()
    result = runner.invoke(app, ["search", QUERY, "--index", str(out), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "15-45 s" in result.output and "0-4 s" in result.output and "(missing)" in result.output
    result = runner.invoke(app, ["search", QUERY, "--index", str(out), "-k", "2", "--group", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["source"] for r in rows] == ["gone", "long"] and len(rows[1]["moments"]) == 5
    assert rows[1]["moments"][0]["start"] == 15 and rows[1]["moments"][0]["end"] == 45
    result = runner.invoke(app, ["search", QUERY, "--index", str(out), "-k", "2", "--per-video"])
    assert result.exit_code == 0 and "15-45 s (0.900)" in result.output


def test_html_page_plays_each_hit_at_its_moment(moments_index, tmp_path: Path) -> None:
    out, _, _ = moments_index
    page = tmp_path / "hits.html"
    result = CliRunner().invoke(app, ["search", QUERY, "--index", str(out), "-k", "3", "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    long_uri = (tmp_path / "videos" / "long.mp4").as_uri()
    assert f'<video controls preload="none" src="{long_uri}#t=15,45">' in text
    assert f'href="{long_uri}#t=15,45">open at 15-45 s</a>' in text
    assert f'src="{(tmp_path / "videos" / "short.mp4").as_uri()}#t=0,4"' in text
    assert "the file no longer exists" in text  # gone.mp4: no player


def test_moment_helpers() -> None:
    assert moment_label(None, None) == "0-? s" and moment_label(1.5, 4) == "1.5-4 s"
    assert media_fragment(0.0, None) == "#t=0" and media_fragment(12.5, 42.5) == "#t=12.5,42.5"


def test_cache_columns_durations_and_sources(tmp_path: Path, tiny_clip) -> None:
    """The index copies each row's file duration and source id from the cache's readers."""
    ids = ["a@0-30", "a@15-45", "b", "c", "d", "e"]
    cache = caption_store(tmp_path, tiny_clip, ids=ids)
    group = zarr.open_group(str(cache.path), mode="r+")
    group["videos/duration"][:] = [60.0, 60.0, 5.0, np.nan, np.nan, np.nan]
    group["videos/source"][:] = np.array(["a", "a", "b", "c", "d", "e"], dtype=group["videos/source"].dtype)
    legacy = tmp_path / "legacy.zarr"
    shutil.copytree(cache.path, legacy)
    legacy_group = zarr.open_group(str(legacy), mode="r+")
    del legacy_group["videos/duration"], legacy_group["videos/source"]
    rows = np.array([2, 0])
    store = FeatureCache.open(cache.path)
    np.testing.assert_array_equal(store.read_durations(rows), [5.0, 60.0])
    assert store.read_sources(rows) == ["b", "a"]
    # Stores made before the arrays: durations unknown, the source is the row id.
    old = FeatureCache.open(legacy)
    assert np.isnan(old.read_durations(np.array([0, 1]))).all()
    assert old.read_sources(np.array([2, 0])) == ["b", "a@0-30"]


def test_server_groups_per_file(moments_index) -> None:
    from fastapi.testclient import TestClient

    from muse_pipeline.search.app import create_app

    out, _, _ = moments_index
    client = TestClient(create_app(Searcher(out)))
    data = client.get("/search", params={"q": QUERY, "k": 2, "group": "true"}).json()
    assert [g["source"] for g in data["groups"]] == ["gone", "long"] and data["groups"][0]["missing"] is True
    assert [m["id"] for m in data["groups"][1]["moments"]][:2] == ["long@15-45", "long@30-60"]
    assert data["groups"][1]["moments"][0]["video_url"] == "/video?id=long%4015-45"
    assert [h["id"] for h in data["hits"]] == ["gone"] + [m["id"] for m in data["groups"][1]["moments"]]
    plain = client.get("/search", params={"q": QUERY, "k": 2}).json()
    assert "groups" not in plain and [h["id"] for h in plain["hits"]] == ["gone", "long@15-45"]
