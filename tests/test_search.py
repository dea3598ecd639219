"""Index / search / HTML, with the tiny random-init CLIP (`muse-tiny`, D = 64) as the query encoder.

The run is a fake (meanP videos, identity text side) so that the expected ranking is known: video k's
CLS tokens are set to the CLIP text embedding of caption k, so query k must retrieve video k.
Expected scores and rankings come from brute force (numpy argsort of E @ q), never from the index.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import _real_meanp_run, make_store
from typer.testing import CliRunner

import muse_pipeline.models.checkpoint as checkpoint
from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.cli.main import app
from muse_pipeline.errors import InputError, UserError
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
FP = {"model": "muse-tiny", "weights": "random-init", "dim": TINY_D, "words": 16}


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


def _store(tmp_path: Path, encoder, ids: list[str] | None = None, paths: list[str] | None = None) -> FeatureCache:
    text = encoder.encode_texts(encoder.tokenize(CAPTIONS, 16)).numpy()
    n = len(CAPTIONS) + 1  # the last video failed extraction: it must not be indexed
    tokens = np.zeros((n, TINY_T, TINY_L, TINY_D), np.float32)
    tokens[: len(CAPTIONS), :, 0, :] = text[:, None, :]
    tokens += 0.01 * np.random.default_rng(0).normal(size=tokens.shape)
    done = np.ones(n, np.uint8)
    done[-1] = 2
    return make_store(
        tmp_path / "folder.zarr", tokens, np.ones((n, TINY_T), np.uint8), done, ["test"] * n,
        text[:2], np.array([0, 2]),
        ids=ids or [f"clip{i}" for i in range(n)],
        paths=paths or [f"/videos/clip{i}.mp4" for i in range(n)],
        fingerprint=FP,
    )


@pytest.fixture()
def indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoder) -> tuple[Path, FeatureCache]:
    cache = _store(tmp_path, encoder)
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"head": "fake"}, "cache": str(cache.path), "fingerprint": FP}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    se.clear_searchers()
    out = se.build_index(run, cache.path, tmp_path / "index")
    return out, cache


def _brute(emb: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.argsort(-(emb @ q), kind="stable")


def test_index_is_self_contained(indexed) -> None:
    out, cache = indexed
    index = se.VideoIndex(out)
    emb = np.asarray(index.embeddings)
    assert emb.dtype == np.float32 and emb.shape == (len(CAPTIONS), TINY_D)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert index.ids.all() == [f"clip{i}" for i in range(len(CAPTIONS))]
    assert index.paths[2] == "/videos/clip2.mp4"
    # Captions of the dataset: video 0 and 2 have one, the others none.
    assert [index.captions[i] for i in range(3)] == ["caption 0", "", "caption 1"]
    meta = json.loads((out / "index.json").read_text())
    assert meta["format"] == "muse-index" and meta["n_videos"] == len(CAPTIONS)
    assert meta["clip"] == {"model": "muse-tiny", "weights_id": "random-init"}
    assert meta["search"] == {"kind": "exact", "params": {}} and meta["words"] == 16
    assert "run_dir" not in meta and str(cache.path) not in json.dumps(meta)  # nothing points back


def test_search_finds_the_matching_video(indexed, encoder) -> None:
    out, _ = indexed
    for k, caption in enumerate(CAPTIONS):
        hits = se.search(caption, out, top_k=3)
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["id"] == f"clip{k}" and hits[0]["path"] == f"/videos/clip{k}.mp4"
        assert hits[0]["score"] == pytest.approx(1.0, abs=0.02)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
        assert set(hits[0]) == {"rank", "id", "path", "start", "end", "score", "caption"}
    emb = np.asarray(se.VideoIndex(out).embeddings)
    q = encoder.encode_texts(encoder.tokenize([CAPTIONS[1]], 16))[0].numpy()
    q = q / np.linalg.norm(q)
    hits = se.search(CAPTIONS[1], out, top_k=100)  # more than indexed: all of them
    assert [h["id"] for h in hits] == [f"clip{i}" for i in _brute(emb, q)]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(emb @ q)[::-1], rtol=1e-4, atol=1e-5)


def test_refuses_to_overwrite(indexed, tmp_path: Path) -> None:
    out, cache = indexed
    with pytest.raises(InputError, match="--overwrite"):
        se.build_index(tmp_path / "run", cache.path, out)
    assert se.build_index(tmp_path / "run", cache.path, out, overwrite=True) == out


def test_search_errors(indexed, tmp_path: Path) -> None:
    out, _ = indexed
    with pytest.raises(UserError, match="empty"):
        se.search("  ", out)
    with pytest.raises(UserError, match="top_k"):
        se.search("a", out, top_k=0)
    with pytest.raises(UserError, match="at most"):
        se.search("a" * (se.MAX_QUERY_CHARS + 1), out)
    with pytest.raises(UserError, match="muse index"):
        se.VideoIndex(tmp_path / "nope")


def test_clip_record_of_the_cache_weights(tmp_path: Path) -> None:
    assert se._clip_record({"model": "m", "weights": "random-init"}, None) == {"model": "m", "weights_id": "random-init"}
    assert se._clip_record({"model": "m", "weights": "openai", "pretrained": "openai"}, None)["pretrained"] == "openai"
    with pytest.raises(InputError, match="--pretrained"):
        se._clip_record({"model": "m", "weights": "ab" * 32, "pretrained": "/gone/w.pt"}, None)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    from muse_pipeline.encoders.clip import file_sha256

    rec = se._clip_record({"model": "m", "weights": file_sha256(weights), "pretrained": "w.bin"}, str(weights))
    assert rec["weights_file"]["path"] == str(weights.resolve()) and rec["weights_file"]["size"] == 7
    with pytest.raises(InputError, match="not the file"):
        se._clip_record({"model": "m", "weights": "cd" * 32}, str(weights))


def test_missing_weights_file_is_one_line_naming_it(indexed) -> None:
    out, _ = indexed
    meta = json.loads((out / "index.json").read_text())
    meta["clip"] = {"model": "muse-tiny", "weights_id": "ab" * 32,
                    "weights_file": {"path": "/gone/clip-weights.pt", "size": 1, "mtime_ns": 1}}
    (out / "index.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["search", "a red circle", "--index", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "/gone/clip-weights.pt" in lines[0]


def test_exact_topk_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(1000, 16)).astype(np.float32)
    emb[10] = emb[20]  # a tie: the lower row comes first
    q = rng.normal(size=(7, 16)).astype(np.float32)
    q[0] = emb[10]
    old = se._EXACT_BLOCK_ROWS
    try:
        for block in (64, 1000, 4096):
            se._EXACT_BLOCK_ROWS = block
            scores, rows = se.exact_topk(emb, q, 12)
            for i in range(len(q)):
                s = emb @ q[i]
                want = np.lexsort((np.arange(len(s)), -s))[:12]
                assert rows[i].tolist() == want.tolist()
                np.testing.assert_allclose(scores[i], s[want], rtol=1e-5)
    finally:
        se._EXACT_BLOCK_ROWS = old
    assert rows[0][:2].tolist() == [10, 20]
    # The fast path (faiss brute force) gives the same rows and scores; a tie may come in either order.
    fast_s, fast_r = se.exact_topk_fast(emb, q, 12)
    ref_s, ref_r = se.exact_topk(emb, q, 12)
    np.testing.assert_allclose(fast_s, ref_s, rtol=1e-5)
    assert fast_r[1:].tolist() == ref_r[1:].tolist() and set(fast_r[0][:2]) == {10, 20}
    assert fast_r[0][2:].tolist() == ref_r[0][2:].tolist()
    for i in range(len(q)):  # the one-query path: the same rows, ties included
        one_s, one_r = se.exact_topk_single(emb, q[i], 12)
        assert one_r[0].tolist() == ref_r[i].tolist()
        np.testing.assert_allclose(one_s[0], ref_s[i], rtol=1e-5)
    assert se.exact_topk_single(emb[:5], q[0], 12)[1].shape == (1, 5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat"])
def test_approximate_index_recorded_and_close_to_exact(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    emb = centers[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    queries = emb[rng.choice(4000, 64, replace=False)] + 0.1 * rng.normal(size=(64, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    plan = se.plan_search(4000, approx_threshold=1000, ivf_threshold=3000 if kind == "ivf-flat" else 10_000)
    assert plan.kind == kind
    out = se.write_index(tmp_path / "ann", emb, ids=[f"v{i}" for i in range(4000)],
                         paths=[f"/x/{i}.mp4" for i in range(4000)], clip={"model": "m", "weights_id": "w"},
                         words=8, plan=plan, tuning_queries=queries[:32])
    meta = json.loads((out / "index.json").read_text())
    assert meta["search"]["kind"] == kind and (out / "ann.faiss").is_file()
    param = "efSearch" if kind == "hnsw" else "nprobe"
    assert meta["search"]["params"][param] >= 1 and meta["search"]["params"]["recall_at_10"] >= se.TARGET_RECALL
    index = se.VideoIndex(out)
    _, rows = index.search_vectors(queries, 10)
    truth = np.stack([np.argsort(-(emb @ q), kind="stable")[:10] for q in queries])
    assert se.recall_at_k(rows, truth) >= 0.9
    _, exact_rows = index.search_vectors(queries, 10, exact=True)
    assert se.recall_at_k(exact_rows, truth) == 1.0
    assert se.plan_search(4000, exact=True, approx_threshold=1000).kind == "exact"


def test_cli_json_queries_file_and_html(indexed, tmp_path: Path, encoder) -> None:
    out, _ = indexed
    qfile = tmp_path / "queries.txt"
    qfile.write_text(f"{CAPTIONS[3]}\n\n{CAPTIONS[0]}\n")
    page = tmp_path / "page.html"
    runner = CliRunner()
    result = runner.invoke(app, ["search", "--queries", str(qfile), "--index", str(out), "--top-k", "2",
                                 "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    assert [(r["query"], r["rank"]) for r in rows] == [(CAPTIONS[3], 1), (CAPTIONS[3], 2), (CAPTIONS[0], 1), (CAPTIONS[0], 2)]
    assert rows[0]["id"] == "clip3" and rows[2]["id"] == "clip0" and rows[2]["caption"] == "caption 0"
    assert set(rows[0]) == {"query", "rank", "id", "path", "start", "end", "score", "caption"}
    # Batched scores equal one-query-at-a-time scores.
    single = se.search(CAPTIONS[0], out, top_k=2)
    assert [r["score"] for r in rows[2:]] == pytest.approx([h["score"] for h in single], abs=1e-6)
    text = page.read_text()
    assert "randomly initialised CLIP" in text and "real CLIP weights" in text
    assert "randomly initialised" in result.stderr


def test_moved_index_keeps_working_and_uses_the_stored_text_adapter(tmp_path: Path, encoder) -> None:
    cache = _store(tmp_path, encoder)
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
        clip_q = encoder.encode_texts(encoder.tokenize(CAPTIONS, 16))
        want_q = model.embed_texts(clip_q).numpy()
        want_v = np.asarray(ev.embed_videos(model, cache, np.arange(5), 8, "cpu"))
    want_v /= np.linalg.norm(want_v, axis=1, keepdims=True)
    se.clear_searchers()
    built = se.build_index(run, None, None)  # the run's own cache, index inside the run
    assert built == run.resolve() / "index"
    moved = tmp_path / "elsewhere" / "my-index"
    moved.parent.mkdir()
    shutil.copytree(built, moved)
    shutil.rmtree(run)
    shutil.rmtree(cache.path)
    searcher = se.Searcher(moved)
    np.testing.assert_allclose(searcher.encoder.encode(CAPTIONS), want_q, atol=1e-5)
    for k in (0, 3):
        hits = searcher.search([CAPTIONS[k]], top_k=5)[0]
        order = _brute(want_v, want_q[k])
        assert [h["id"] for h in hits] == [f"clip{i}" for i in order]


def test_windows_from_clip_ids_and_media_path_fallback(tmp_path: Path, encoder) -> None:
    videos = tmp_path / "data"
    videos.mkdir()
    for i in range(6):
        (videos / f"clip{i}.webm").write_bytes(b"x")
    ids = ["a@1.5-4", "b@-3", "c", "d@2-", "e", "f"]
    cache = _store(tmp_path, encoder, ids=ids, paths=[str(videos / f"clip{i}.webm") for i in range(6)])
    rows = np.arange(5)
    w = se._windows(cache, rows)
    np.testing.assert_array_equal(w[0], [1.5, 4.0])
    assert np.isnan(w[1, 0]) and w[1, 1] == 3.0 and np.isnan(w[2]).all() and w[3, 0] == 2.0
    # An index moved together with its videos finds them through the relative paths.
    out = se.write_index(tmp_path / "idx", np.eye(5, TINY_D, dtype=np.float32), ids=ids[:5],
                         paths=[str(videos / f"clip{i}.webm") for i in range(5)], windows=w,
                         clip={"model": "muse-tiny", "weights_id": "random-init"}, words=16)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.move(str(out), bundle / "idx")
    shutil.move(str(videos), bundle / "data")
    index = se.VideoIndex(bundle / "idx")
    assert index.media_path(1) == bundle / "idx" / ".." / "data" / "clip1.webm"
    assert index.media_path(1).is_file()
    hit = index.hit(0, 0.5, 1)
    assert (hit["start"], hit["end"], hit["caption"]) == (1.5, 4.0, None)
    assert index.hit(2, 0.5, 1)["start"] == 0.0 and index.hit(2, 0.5, 1)["end"] is None


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
        {"rank": 1, "id": "my <clip>", "score": 0.9, "path": str(video), "start": 0.0, "end": None,
         "caption": "a <b>bold</b> claim"},
        {"rank": 2, "id": "gone", "score": 0.5, "path": str(tmp_path / "gone.mp4")},
    ]
    page = se.write_html(hits, tmp_path / "out" / "hits.html", query="red & blue", n_frames=4, note="<note>")
    text = page.read_text()
    # 3 s at 1 fps -> 3 sampled frames (<= 4), embedded inline, nothing linked from outside.
    assert len(re.findall(r'src="data:image/jpeg;base64,', text)) == 3
    assert not re.search(r'src="(?!data:)', text)
    assert "red &amp; blue" in text and "my &lt;clip&gt;" in text and "&lt;note&gt;" in text
    assert "a &lt;b&gt;bold&lt;/b&gt; claim" in text and "<b>" not in text
    assert "no preview" in text and "gone" in text
    assert "0.9000" in text


def test_end_to_end_run_is_not_indexed_from_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"model": {"head": "muse"}, "cache": None, "end_to_end": True}
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (FakeRun(), config))
    with pytest.raises(UserError, match="end-to-end run"):
        se.build_index(tmp_path, tmp_path / "c.zarr", tmp_path / "i")


def test_demo_search_step_reports_own_video_ranks(tmp_path: Path, synthetic_root: Path, encoder) -> None:
    from rich.console import Console

    from muse_pipeline.data import load_dataset
    from muse_pipeline.stages.demo import print_searches, search_test_captions

    data = load_dataset("synthetic", synthetic_root)
    first: dict[int, str] = {}
    for c in data.captions:
        first.setdefault(c.video_index, c.text)
    # Video embeddings: CLIP's text embedding of a caption of ANOTHER video (a known, imperfect index).
    n = len(data.videos)
    source = [(i + 1) % n if i % 3 == 0 else i for i in range(n)]
    emb = encoder.encode_texts(encoder.tokenize([first[j] for j in source], 16)).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = se.write_index(tmp_path / "idx", emb, ids=[v.id for v in data.videos],
                           paths=[str(v.path) for v in data.videos], captions=[first[i] for i in range(n)],
                           clip={"model": "muse-tiny", "weights_id": "random-init"}, words=16)
    out = search_test_captions(index, synthetic_root, tmp_path / "search.html", n=2)
    test_rows = sorted({c.video_index for c in data.captions if c.split == "test"})
    assert out["n_indexed"] == n and out["test_captions"] == len(test_rows) and len(out["searches"]) == 2
    q = encoder.encode_texts(encoder.tokenize([first[r] for r in test_rows], 16)).numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    brute = [int(((emb @ q[k]) >= (emb @ q[k])[r]).sum()) for k, r in enumerate(test_rows)]
    assert out["median_rank"] == float(np.median(brute))
    assert out["searches"][0]["rank"] == brute[0] and out["searches"][-1]["rank"] == brute[-1]
    assert out["searches"][0]["video"] == data.videos[test_rows[0]].id
    page = (tmp_path / "search.html").read_text()
    assert "real CLIP weights" in page and f"ranks {brute[0]} of {n}" in page
    console = Console(record=True, width=200)
    print_searches(out, console)
    text = console.export_text()
    assert f"{brute[0]} of {n}" in text and "real CLIP weights" in text and "median rank" in text


def test_local_clip_weights_file_recorded_moved_and_overridden(tmp_path: Path, encoder) -> None:
    from muse_pipeline.encoders.clip import file_sha256

    weights = tmp_path / "clip" / "tiny.pt"
    weights.parent.mkdir()
    state = {k: v + 0.01 for k, v in encoder.model.state_dict().items()}  # not the random init
    torch.save(state, weights)
    sha = file_sha256(weights)
    clip = se._clip_record({"model": "muse-tiny", "weights": sha, "pretrained": str(weights)}, None)
    emb = np.eye(3, TINY_D, dtype=np.float32)
    index = se.write_index(tmp_path / "idx", emb, ids=["a", "b", "c"], paths=["/a", "/b", "/c"], clip=clip, words=16)
    searcher = se.Searcher(index)
    assert searcher.encoder.encoder.weights_id == sha and not searcher.index.random_init
    want = searcher.encoder.encode(["a red circle"])
    moved = tmp_path / "elsewhere.pt"
    weights.rename(moved)
    with pytest.raises(InputError, match=re.escape(str(weights))):
        se.Searcher(index)
    # The file at its new place, named on the command line, gives the same query embedding.
    np.testing.assert_allclose(se.Searcher(index, pretrained=str(moved)).encoder.encode(["a red circle"]), want)
    torch.save({k: v + 0.02 for k, v in encoder.model.state_dict().items()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="differ"):
        se.Searcher(index, pretrained=str(tmp_path / "other.pt"))
