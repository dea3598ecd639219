"""A server that stays fresh (search/live.py, search/app.py): a real uvicorn on 127.0.0.1 answers from
each new index generation without a restart, requests racing the swap see one whole generation,
files changed under it never crash it, and a hit whose file has gone is flagged."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from search_helpers import CAPTIONS, FP, TINY_D, TINY_L, LoopbackServer, unit_text_embeddings

from muse_pipeline.search.app import create_app
from muse_pipeline.search.generations import CURRENT, open_index
from muse_pipeline.search.live import LiveSearcher
from muse_pipeline.stages.search import build_index

T = 2
WAIT = 20.0  # seconds any wait in this file may take at most


def _library(tmp_path: Path, tiny_clip):
    """A cache of 8 files: row k < 5 shows CAPTIONS[k] (so caption k finds row k), rows 5-7 noise.
    Rows 0-3 and 5 are extracted; every file exists."""
    from test_evaluate import make_store

    files = tmp_path / "lib"
    files.mkdir()
    paths = []
    for i in range(8):
        paths.append(str(files / f"clip{i}.mp4"))
        Path(paths[-1]).write_bytes(b"not played here")
    tokens = np.random.default_rng(0).normal(size=(8, T, TINY_L, TINY_D)).astype(np.float32)
    tokens[:5, :, 0, :] = 20 * unit_text_embeddings(tiny_clip, CAPTIONS)[:, None, :]
    done = np.array([1, 1, 1, 1, 0, 1, 0, 0], np.uint8)
    return make_store(tmp_path / "lib.zarr", tokens, np.ones((8, T), np.uint8), done, ["test"] * 8,
                      np.zeros((0, TINY_D), np.float32), np.zeros(0, np.int64),
                      ids=[f"clip{i}" for i in range(8)], paths=paths, fingerprint=FP)


def _set_done(cache, rows: list[int], value: int) -> None:
    done = zarr.open_array(str(cache.path / "videos" / "done"), mode="r+")
    for r in rows:
        done[r] = value


def _get(url: str, **params) -> tuple[int, dict]:
    full = url + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(full, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:  # no answer at all (counted as a failure by the callers)
        return 0, {}


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_running_server_follows_new_generations(tmp_path: Path, tiny_clip) -> None:
    cache = _library(tmp_path, tiny_clip)
    root = tmp_path / "index"
    build_index(None, cache.path, root)
    gen1_ids = {"clip0", "clip1", "clip2", "clip3", "clip5"}
    live = LiveSearcher(root)
    with LoopbackServer(create_app(live)) as server:
        status, health = _get(server.url + "/health")
        assert status == 200 and health == {"status": "ok", "generation": "gen-000001", "size": 5,
                                            "model": "muse-tiny"}
        status, before = _get(server.url + "/search", q=CAPTIONS[2], k=10)
        assert status == 200 and before["hits"][0]["id"] == "clip2" and before["generation"] == "gen-000001"
        # Replace the serving generation's embeddings under the running server (what killed it with a
        # bus error when the file was memory-mapped): it keeps answering, from what it read.
        serving = root / "gen-000001" / "embeddings.npy"
        original = serving.read_bytes()
        shutil.copy(tmp_path / "lib" / "clip0.mp4", serving)
        status, again = _get(server.url + "/search", q=CAPTIONS[2], k=10)
        assert status == 200 and again["hits"] == before["hits"]
        serving.write_bytes(original)  # the update below copies its vectors from this generation

        # Requests race the swap: each answer must be one whole generation (k > size: every row).
        answers: list[tuple[int, dict]] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                answers.append(_get(server.url + "/search", q=CAPTIONS[0], k=10))

        racer = threading.Thread(target=hammer, daemon=True)
        racer.start()
        # The library changes: clip4 extracted, clip0 retired; `muse index` publishes gen 2.
        _set_done(cache, [4], 1)
        _set_done(cache, [0], 3)
        assert build_index(None, cache.path, root).generation == "gen-000002"
        _wait_for(lambda: _get(server.url + "/health")[1].get("generation") == "gen-000002", "gen-000002")
        _wait_for(lambda: any(b.get("generation") == "gen-000002" for _, b in list(answers)), "a racing answer")
        stop.set()
        racer.join(WAIT)
        gen2_ids = {"clip1", "clip2", "clip3", "clip4", "clip5"}
        assert _get(server.url + "/health")[1]["size"] == 5
        status, fresh = _get(server.url + "/search", q=CAPTIONS[4], k=3)
        assert status == 200 and fresh["hits"][0]["id"] == "clip4" and fresh["generation"] == "gen-000002"
        assert answers and all(code == 200 for code, _ in answers)
        seen = {body["generation"] for _, body in answers}
        assert seen == {"gen-000001", "gen-000002"}
        for _, body in answers:
            want = gen1_ids if body["generation"] == "gen-000001" else gen2_ids
            assert {h["id"] for h in body["hits"]} == want
        # Overwriting files of the old generation now does nothing to the server either.
        shutil.copy(tmp_path / "lib" / "clip0.mp4", root / "gen-000001" / "ids.bin")
        # A file deleted from the library: its hit is flagged, not hidden.
        Path(cache.video_paths[3]).unlink()
        status, flagged = _get(server.url + "/search", q=CAPTIONS[3], k=2)
        assert status == 200 and flagged["hits"][0]["id"] == "clip3" and flagged["hits"][0]["missing"] is True
        assert flagged["hits"][1]["missing"] is False


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_in_flight_searcher_keeps_its_generation_and_a_damaged_one_is_skipped(tmp_path: Path, tiny_clip,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    cache = _library(tmp_path, tiny_clip)
    root = tmp_path / "index"
    build_index(None, cache.path, root)
    clock = _Clock()
    live = LiveSearcher(root, clock=clock)
    in_flight = live.current()
    _set_done(cache, [4], 1)
    build_index(None, cache.path, root)
    assert live.current() is in_flight  # checked at most once a second
    clock.now = 1.0
    assert live.current() is in_flight  # the load runs in the background; this request answers now
    assert live.wait_idle(WAIT)
    fresh = live.current()
    assert fresh is not in_flight and fresh.index.generation == "gen-000002" and len(fresh.index) == 6
    assert fresh.encoder.encoder is in_flight.encoder.encoder  # the CLIP text tower is reused
    # The old searcher still answers wholly from its generation.
    old_ids = {h["id"] for h in in_flight.search([CAPTIONS[4]], 10)[0]}
    assert old_ids == {"clip0", "clip1", "clip2", "clip3", "clip5"}
    # A damaged generation is logged and skipped: the server keeps the one it has.
    broken = root / "gen-000003"
    shutil.copytree(root / "gen-000002", broken)
    (broken / "embeddings.npy").write_bytes((broken / "embeddings.npy").read_bytes()[:100])
    (root / CURRENT).write_text("gen-000003\n")
    clock.now = 2.0
    live.current()
    assert live.wait_idle(WAIT)
    assert live.current() is fresh and "cannot load gen-000003" in caplog.text
    assert "embeddings.npy" in caplog.text
    clock.now = 3.0
    live.current()
    assert live.wait_idle(WAIT) and live.current() is fresh  # not retried every second
    assert open_index(root / "gen-000002").generation == "0"  # a generation folder opens on its own too
