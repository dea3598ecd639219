"""Index / search / HTML, with the tiny random-init CLIP (`muse-tiny`, D = 64) as the query encoder.

The run is a fake (meanP videos, identity text side) so that the expected ranking is known: video k's
CLS tokens are set to the CLIP text embedding of caption k, so query k must retrieve video k.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import _real_meanp_run, make_store

import muse_pipeline.models.checkpoint as checkpoint
from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.stages import evaluate as ev
from muse_pipeline.stages import search as se

CAPTIONS = [
    "a red circle moves left",
    "a blue square grows",
    "a green triangle spins",
    "a yellow star falls down",
    "a white line turns",
]
TINY_D, TINY_L, TINY_T = 64, 5, 2  # L = 1 + 2 * 2: grid 2


class FakeRun:
    """meanP over CLS rows and identity text side: the score is CLIP's own cosine."""

    def to(self, device: str) -> FakeRun:
        return self

    def eval(self) -> FakeRun:
        return self

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ev.ZeroShotMeanP().embed_videos(tokens, mask)

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(text_emb.float(), dim=-1)


@pytest.fixture(scope="module")
def encoder():
    from muse_pipeline.encoders.clip import ClipEncoder

    return ClipEncoder("muse-tiny", pretrained=None)


@pytest.fixture()
def indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoder) -> tuple[Path, FeatureCache]:
    text = encoder.encode_texts(encoder.tokenize(CAPTIONS, 16)).numpy()
    n = len(CAPTIONS) + 1  # the last video failed extraction: it must not be indexed
    tokens = np.zeros((n, TINY_T, TINY_L, TINY_D), np.float32)
    tokens[: len(CAPTIONS), :, 0, :] = text[:, None, :]
    tokens += 0.01 * np.random.default_rng(0).normal(size=tokens.shape)
    done = np.ones(n, np.uint8)
    done[-1] = 2
    fingerprint = {"model": "muse-tiny", "weights": "random-init", "dim": TINY_D, "words": 16}
    cache = make_store(
        tmp_path / "folder.zarr",
        tokens,
        np.ones((n, TINY_T), np.uint8),
        done,
        ["test"] * n,
        text[:1],
        np.zeros(1, np.int64),
        ids=[f"clip{i}" for i in range(n)],
        paths=[f"/videos/clip{i}.mp4" for i in range(n)],
        fingerprint=fingerprint,
    )
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"head": "fake"}, "cache": str(cache.path), "fingerprint": fingerprint}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    se._load_searcher.cache_clear()
    out = se.build_index(run, cache.path, tmp_path / "index.zarr")
    return out, cache


def test_index_holds_cached_videos_only(indexed) -> None:
    import zarr

    out, cache = indexed
    g = zarr.open_group(str(out), mode="r")
    emb = np.asarray(g["embeddings"][...])
    assert emb.dtype == np.float32 and emb.shape == (len(CAPTIONS), TINY_D)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert list(np.asarray(g["ids"][...])) == [f"clip{i}" for i in range(len(CAPTIONS))]
    assert str(np.asarray(g["paths"][...])[2]) == "/videos/clip2.mp4"
    attrs = dict(g.attrs)
    assert attrs["format"] == "muse-index" and attrs["n_videos"] == len(CAPTIONS)
    assert attrs["fingerprint"] == {
        "model": "muse-tiny",
        "pretrained": None,
        "weights": "random-init",
        "words": 16,
        "dim": TINY_D,
    }
    assert attrs["cache_path"] == str(Path(cache.path).resolve())


def test_search_finds_the_matching_video(indexed, encoder) -> None:
    out, _ = indexed
    for k, caption in enumerate(CAPTIONS):
        hits = se.search(caption, out, top_k=3)
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["id"] == f"clip{k}" and hits[0]["path"] == f"/videos/clip{k}.mp4"
        assert hits[0]["score"] == pytest.approx(1.0, abs=0.02)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # Scores are the cosine of the query against every indexed embedding (brute force).
    import zarr

    emb = np.asarray(zarr.open_group(str(out), mode="r")["embeddings"][...])
    q = encoder.encode_texts(encoder.tokenize([CAPTIONS[1]], 16))[0].numpy()
    brute = emb @ (q / np.linalg.norm(q))
    hits = se.search(CAPTIONS[1], out, top_k=100)  # more than indexed: all of them
    assert len(hits) == len(CAPTIONS)
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(brute)[::-1], rtol=1e-4, atol=1e-5)


def test_search_errors(indexed, tmp_path: Path) -> None:
    out, _ = indexed
    with pytest.raises(ValueError, match="empty"):
        se.search("  ", out)
    with pytest.raises(ValueError, match="top_k"):
        se.search("a", out, top_k=0)
    with pytest.raises(FileNotFoundError, match="muse index"):
        se.search("a", tmp_path / "nope.zarr")


def test_local_weights_need_pretrained() -> None:
    with pytest.raises(ValueError, match="--pretrained"):
        se._cache_pretrained("ab" * 32, None)
    assert se._cache_pretrained("random-init", None) is None
    assert se._cache_pretrained("openai", None) == "openai"
    assert se._cache_pretrained("ab" * 32, "/w.pt") == "/w.pt"


def _write_video(path: Path, seconds: int = 3, fps: int = 4) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * fps):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, : 4 * (i + 1) % 64] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_write_html_is_self_contained(tmp_path: Path) -> None:
    video = tmp_path / "my <clip>.mp4"
    _write_video(video)
    hits = [
        {"rank": 1, "id": "my <clip>", "score": 0.9, "path": str(video)},
        {"rank": 2, "id": "gone", "score": 0.5, "path": str(tmp_path / "gone.mp4")},
    ]
    page = se.write_html(hits, tmp_path / "out" / "hits.html", query="red & blue", n_frames=4)
    text = page.read_text()
    # 3 s at 1 fps -> 3 sampled frames (<= 4), embedded inline, nothing linked from outside.
    assert len(re.findall(r'src="data:image/jpeg;base64,', text)) == 3
    assert not re.search(r'src="(?!data:)', text)
    assert "red &amp; blue" in text and "my &lt;clip&gt;" in text
    assert "no preview" in text and "gone" in text
    assert "0.9000" in text


def test_integration_real_run_index_and_search(tmp_path: Path, encoder) -> None:
    text = encoder.encode_texts(encoder.tokenize(CAPTIONS, 16)).numpy()
    n = len(CAPTIONS)
    tokens = np.zeros((n, TINY_T, TINY_L, TINY_D), np.float32)
    tokens[:, :, 0, :] = text[:, None, :]
    tokens[:, :, 1:, :] = np.random.default_rng(1).normal(size=(n, TINY_T, TINY_L - 1, TINY_D))
    fingerprint = {"model": "muse-tiny", "weights": "random-init", "dim": TINY_D, "words": 16}
    cache = make_store(
        tmp_path / "c.zarr",
        tokens,
        np.ones((n, TINY_T), np.uint8),
        np.ones(n, np.uint8),
        ["test"] * n,
        text,
        np.arange(n),
        fingerprint=fingerprint,
    )
    run = _real_meanp_run(tmp_path, cache.path, fingerprint, TINY_D, 2, TINY_T)
    se._load_searcher.cache_clear()
    index = se.build_index(run, None, None)  # the run's own cache, index inside the run
    assert index == run.resolve() / "index.zarr"
    for k in (0, 3):
        hits = se.search(CAPTIONS[k], index, top_k=2)
        assert hits[0]["id"] == f"v{k}" and hits[0]["score"] == pytest.approx(1.0, abs=1e-2)


def test_end_to_end_run_is_not_indexed_from_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"model": {"head": "muse"}, "cache": None, "end_to_end": True}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    with pytest.raises(ValueError, match="end-to-end run"):
        se.build_index(tmp_path, tmp_path / "c.zarr", tmp_path / "i.zarr")
