"""search/query.py (Searcher, QueryEncoder, the CLIP record and source), search/limits.py, `muse
search` and the demo's search step, with the tiny random-init CLIP as the query encoder.

Expected scores and rankings come from brute force (numpy argsort of E @ q), never from the index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from search_helpers import CAPTIONS, RANDOM_INIT_CLIP, TINY_D, brute_order, unit_text_embeddings
from typer.testing import CliRunner

from muse_pipeline.cli.main import app
from muse_pipeline.encoders.clip import file_sha256
from muse_pipeline.errors import InputError, UserError
from muse_pipeline.search.generations import open_index
from muse_pipeline.search.index_format import write_index
from muse_pipeline.search.limits import DEFAULT_K, MAX_QUERY_CHARS, check_k, check_query
from muse_pipeline.search.query import Searcher, clip_record


def test_search_finds_the_matching_video(caption_index, tiny_clip) -> None:
    out, _ = caption_index
    searcher = Searcher(out)
    results = searcher.search(CAPTIONS, top_k=3)
    for k, hits in enumerate(results):
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["id"] == f"clip{k}" and hits[0]["path"] == f"/videos/clip{k}.mp4"
        assert hits[0]["score"] == pytest.approx(1.0, abs=0.02)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
        assert set(hits[0]) == {"rank", "id", "source", "path", "start", "end", "score", "caption", "missing"}
        assert hits[0]["source"] == hits[0]["id"] and hits[0]["missing"] is True  # /videos/ does not exist
    emb = np.asarray(open_index(out).embeddings)
    q = unit_text_embeddings(tiny_clip, [CAPTIONS[1]])[0]
    hits = searcher.search([CAPTIONS[1]], top_k=100)[0]  # more than indexed: all of them
    assert [h["id"] for h in hits] == [f"clip{i}" for i in brute_order(emb, q)]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(emb @ q)[::-1], rtol=1e-4, atol=1e-5)
    # One query at a time gives the batch's answer.
    single = searcher.search([CAPTIONS[0]], top_k=3)[0]
    assert [h["id"] for h in single] == [h["id"] for h in results[0]]
    assert [h["score"] for h in single] == pytest.approx([h["score"] for h in results[0]], abs=1e-6)


def test_search_errors(caption_index) -> None:
    searcher = Searcher(caption_index[0])
    with pytest.raises(UserError, match="empty"):
        searcher.search(["  "])
    with pytest.raises(UserError, match="top_k"):
        searcher.search(["a"], top_k=0)
    with pytest.raises(UserError, match="at most"):
        searcher.search(["a" * (MAX_QUERY_CHARS + 1)])
    assert searcher.search([]) == []


def test_limits() -> None:
    assert check_k(1) == 1 and check_k(DEFAULT_K) == DEFAULT_K
    with pytest.raises(InputError, match=r"^--top-k must be >= 1, got 0$"):
        check_k(0, "--top-k")
    assert check_query("  a b ") == "a b" and check_query("x" * MAX_QUERY_CHARS) == "x" * MAX_QUERY_CHARS
    for bad in ("", " \n", "x" * (MAX_QUERY_CHARS + 1)):
        with pytest.raises(InputError):
            check_query(bad)


def test_clip_record_of_the_cache_weights(tmp_path: Path) -> None:
    assert clip_record({"model": "m", "weights": "random-init"}, None) == {"model": "m", "weights_id": "random-init"}
    assert clip_record({"model": "m", "weights": "openai", "pretrained": "openai"}, None)["pretrained"] == "openai"
    with pytest.raises(InputError, match="--pretrained"):
        clip_record({"model": "m", "weights": "ab" * 32, "pretrained": "/gone/w.pt"}, None)
    with pytest.raises(InputError, match="neither a file"):
        clip_record({"model": "m", "weights": "openai"}, "laion")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    rec = clip_record({"model": "m", "weights": file_sha256(weights), "pretrained": "w.bin"}, str(weights))
    assert rec["weights_file"]["path"] == str(weights.resolve()) and rec["weights_file"]["size"] == 7
    with pytest.raises(InputError, match="not the file"):
        clip_record({"model": "m", "weights": "cd" * 32}, str(weights))


def test_missing_weights_file_is_one_line_naming_it(caption_index) -> None:
    out, _ = caption_index
    meta_path = out / "gen-000001" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["clip"] = {"model": "muse-tiny", "weights_id": "ab" * 32,
                    "weights_file": {"path": "/gone/clip-weights.pt", "size": 1, "mtime_ns": 1}}
    meta_path.write_text(json.dumps(meta))
    result = CliRunner().invoke(app, ["search", "a red circle", "--index", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "/gone/clip-weights.pt" in lines[0]


def test_cli_json_queries_file_and_html(caption_index, tmp_path: Path) -> None:
    out, _ = caption_index
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
    assert set(rows[0]) == {"query", "rank", "id", "source", "path", "start", "end", "score", "caption", "missing"}
    single = Searcher(out).search([CAPTIONS[0]], top_k=2)[0]
    assert [r["score"] for r in rows[2:]] == pytest.approx([h["score"] for h in single], abs=1e-6)
    text = page.read_text()
    assert "randomly initialised CLIP" in text and "real CLIP weights" in text
    assert "randomly initialised" in result.stderr
    result = runner.invoke(app, ["search", "x", "--index", str(out), "--top-k", "0"])
    assert result.exit_code != 0 and result.output.strip() == "error: --top-k must be >= 1, got 0"
    binary = tmp_path / "queries.bin"
    binary.write_bytes(b"\xff\xfe\x00junk")
    result = runner.invoke(app, ["search", "--queries", str(binary), "--index", str(out)])
    assert result.exit_code != 0 and result.output.strip() == (
        f"error: queries file {binary} is not UTF-8 text; give one query per line")


def test_demo_search_step_reports_own_video_ranks(tmp_path: Path, synthetic_root: Path, tiny_clip) -> None:
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
    emb = unit_text_embeddings(tiny_clip, [first[j] for j in source])
    index = write_index(tmp_path / "idx", emb, ids=[v.id for v in data.videos],
                        paths=[str(v.path) for v in data.videos], captions=[first[i] for i in range(n)],
                        clip=RANDOM_INIT_CLIP, words=16)
    out = search_test_captions(index, synthetic_root, tmp_path / "search.html", n=2)
    test_rows = sorted({c.video_index for c in data.captions if c.split == "test"})
    assert out["n_indexed"] == n and out["test_captions"] == len(test_rows) and len(out["searches"]) == 2
    q = unit_text_embeddings(tiny_clip, [first[r] for r in test_rows])
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


def test_local_clip_weights_file_recorded_moved_and_overridden(tmp_path: Path, tiny_clip) -> None:
    weights = tmp_path / "clip" / "tiny.pt"
    weights.parent.mkdir()
    state = {k: v + 0.01 for k, v in tiny_clip.model.state_dict().items()}  # not the random init
    torch.save(state, weights)
    sha = file_sha256(weights)
    clip = clip_record({"model": "muse-tiny", "weights": sha, "pretrained": str(weights)}, None)
    emb = np.eye(3, TINY_D, dtype=np.float32)
    index = write_index(tmp_path / "idx", emb, ids=["a", "b", "c"], paths=["/a", "/b", "/c"], clip=clip, words=16)
    searcher = Searcher(index)
    assert searcher.encoder.encoder.weights_id == sha and not searcher.index.random_init
    want = searcher.encoder.encode(["a red circle"])
    moved = tmp_path / "elsewhere.pt"
    weights.rename(moved)
    with pytest.raises(InputError, match=re.escape(str(weights))):
        Searcher(index)
    # The file at its new place, named on the command line, gives the same query embedding.
    np.testing.assert_allclose(Searcher(index, pretrained=str(moved)).encoder.encode(["a red circle"]), want)
    torch.save({k: v + 0.02 for k, v in tiny_clip.model.state_dict().items()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="differ"):
        Searcher(index, pretrained=str(tmp_path / "other.pt"))
