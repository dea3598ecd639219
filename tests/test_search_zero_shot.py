"""`muse index` without a run (zero-shot CLIP) and with a run on another cache (stages/search.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from search_helpers import CAPTIONS, FP, TINY_D, FakeRun, caption_store, unit_text_embeddings
from typer.testing import CliRunner

import muse_pipeline.models.checkpoint as checkpoint
from muse_pipeline.cli.main import app
from muse_pipeline.errors import InputError
from muse_pipeline.search.generations import open_index
from muse_pipeline.search.query import Searcher
from muse_pipeline.stages.search import build_index


def _mean_of_unit_cls(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """meanP by hand in float64: each real frame's CLS row to unit length, their mean, unit length."""
    out = []
    for video, real in zip(tokens, mask, strict=True):
        cls = video[real.astype(bool), 0, :].astype(np.float64)
        pooled = (cls / np.linalg.norm(cls, axis=-1, keepdims=True)).mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.stack(out)


def test_zero_shot_index_is_mean_of_real_frames(tmp_path: Path, tiny_clip) -> None:
    cache = caption_store(tmp_path, tiny_clip)
    # The second frame of video 1 is padding (mask 0) with non-zero tokens.
    from muse_pipeline.cache.store import FeatureCache

    writable = FeatureCache.open(cache.path, mode="r+")
    tokens, mask = writable.read_videos(np.arange(6))
    tokens, mask = np.asarray(tokens).copy(), np.asarray(mask).copy()
    mask[1, 1] = 0
    tokens[1, 1] = 3.0 * tokens[3, 0]  # stored, but not a real frame: must not count
    done = np.asarray(writable.read_done()).copy()
    writable.write_shard_videos(0, tokens, mask, done)
    result = CliRunner().invoke(app, ["index", "--cache", str(cache.path), "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    assert "indexed 5 videos" in result.output and "gen-000001" in result.output
    index = open_index(tmp_path / "zs")
    want = _mean_of_unit_cls(tokens[:5].astype(np.float32), mask[:5].astype(np.float64))
    np.testing.assert_allclose(np.asarray(index.embeddings), want, atol=1e-5)
    assert index.meta["head"] == "zero-shot-meanP" and "text_adapter.safetensors" not in {
        p.name for p in index.path.iterdir()}
    assert index.meta["frames"] == {"run": None, "cache": 2}
    # Identity text side: the query is CLIP's own unit text embedding, so caption k finds video k.
    searcher = Searcher(tmp_path / "zs")
    np.testing.assert_allclose(searcher.encoder.encode(CAPTIONS), unit_text_embeddings(tiny_clip, CAPTIONS),
                               atol=1e-6)
    for k, hits in enumerate(searcher.search(CAPTIONS, top_k=1)):
        assert hits[0]["id"] == f"clip{k}"


def test_zero_shot_needs_cache_and_out(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["index", "--out", str(tmp_path / "i")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--cache CACHE --out INDEX" in lines[0]
    assert not (tmp_path / "i").exists()


def _fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fingerprint: dict, frames: int) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    config = {"model": {"head": "fake", "max_frames": frames}, "cache": "/elsewhere/other.zarr",
              "fingerprint": {**fingerprint, "frames": frames}}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    return run


def test_run_on_another_cache_states_a_different_frame_count(tmp_path: Path, monkeypatch, tiny_clip) -> None:
    cache = caption_store(tmp_path, tiny_clip)  # 2 frames per video
    run = _fake_run(tmp_path, monkeypatch, FP, frames=4)
    out = tmp_path / "idx"
    result = CliRunner().invoke(app, ["index", str(run), "--cache", str(cache.path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "trained on 4 frames" in result.output and "holds 2" in result.output
    meta = json.loads((out / "gen-000001" / "index.json").read_text())
    assert meta["frames"] == {"run": 4, "cache": 2} and meta["head"] == "fake"


def test_run_of_another_clip_is_one_error(tmp_path: Path, monkeypatch, tiny_clip) -> None:
    cache = caption_store(tmp_path, tiny_clip)
    run = _fake_run(tmp_path, monkeypatch, {**FP, "weights": "openai"}, frames=2)
    out = tmp_path / "idx"
    result = CliRunner().invoke(app, ["index", str(run), "--cache", str(cache.path), "--out", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "weights" in lines[0] and "CLIP" in lines[0] and str(cache.path) in lines[0]
    assert not out.exists()
    run = _fake_run(tmp_path, monkeypatch, {**FP, "dim": TINY_D * 2}, frames=2)
    with pytest.raises(InputError, match="dim"):
        build_index(run, cache.path, out)
