"""The "Your own videos" story end to end, as a user runs it (issue 16, item 8).

A folder with short clips and one long video (subfolders, spaces and unicode in names), no captions:
extract -> a zero-shot index without any run -> a hit inside the long video carries its moment ->
`muse serve` running -> files added and removed -> the same `muse extract` encodes only the new files
-> `muse index` publishes a new generation -> the running server answers from it without a restart ->
in a real browser a click on a moment of the long video plays it from the moment's start.

Ground truth is independent of the code under test: durations from how the files were written,
frames to encode from the sampling protocol (1 frame per second of a short clip), the removed and
added ids from the test's own file operations.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from search_helpers import headless_chromium, write_moving_bar_video
from typer.testing import CliRunner

from muse_pipeline.cli.main import app

MODEL = "muse-tiny"
LONG_SECONDS = 60  # > one default window (2 s per frame x 12 frames = 24 s): several moments
SHORT_SECONDS = 3  # one window, sampled at 1 frame per second: 3 frames each


def _write(path: Path, seconds: int, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # VP8 webm: every chromium build plays it (the browser step)
    return write_moving_bar_video(path, colour, seconds=seconds, fps=5, codec="libvpx", size=(64, 48))


def _muse(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _search_json(index: Path, k: int) -> list[dict]:
    out = _muse("search", "a bar moves across", "--index", str(index), "--top-k", str(k), "--json")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the default cache/ lands here
    root = tmp_path / "my videos ü"
    _write(root / "trips" / "beach day.webm", SHORT_SECONDS, (200, 40, 40))
    _write(root / "trips" / "café.webm", SHORT_SECONDS, (40, 200, 40))
    _write(root / "kitchen.webm", SHORT_SECONDS, (40, 40, 200))
    _write(root / "talks" / "long talk.webm", LONG_SECONDS, (200, 200, 40))
    return root


def test_own_library_story(library: Path, tmp_path: Path) -> None:
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.stages.extract import run_extract

    # 1. Extract the folder (defaults: store named after the folder, windows for the long video).
    out = _muse("extract", "--dataset", "folder", "--data-root", str(library), "--model", MODEL, "--quiet")
    stores = list((tmp_path / "cache" / "folder").glob("*/*.zarr"))
    assert len(stores) == 1 and stores[0].parent.name.startswith("my_videos"), (stores, out)
    store = stores[0]
    ids_before = [str(i) for i in zarr.open_group(str(store), mode="r")["videos/ids"][:]]
    tokens_before = np.asarray(zarr.open_group(str(store), mode="r")["videos/tokens"][:])

    # 2. An index without any run: zero-shot CLIP.
    index = tmp_path / "index"
    _muse("index", "--cache", str(store), "--out", str(index))
    hits = _search_json(index, k=50)
    long_hits = [h for h in hits if h["source"] == "talks/long talk"]
    assert len(long_hits) >= 3, hits  # one per moment, not one vector for the whole minute
    for h in long_hits:
        assert 0.0 <= h["start"] < h["end"] <= LONG_SECONDS + 0.5 and h["end"] - h["start"] <= 24.0 + 1e-6
    assert len({h["start"] for h in long_hits}) == len(long_hits)
    short = next(h for h in hits if h["source"] == "kitchen")
    assert short["start"] == 0.0 and short["end"] == pytest.approx(SHORT_SECONDS, abs=0.3)
    assert not any(h["missing"] for h in hits)

    # 3. The service runs (the real server, on loopback).
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "muse_pipeline.cli.main", "serve", "--index", str(index),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        health = _wait_for(lambda: _get(base + "/health"), 60, "the server to answer")
        first_generation, first_size = health["generation"], health["size"]
        assert first_size == len(hits)

        # 4. The library grows: two new clips, one removed.
        _write(library / "trips" / "new one.webm", SHORT_SECONDS, (40, 200, 200))
        _write(library / "new two.webm", SHORT_SECONDS, (200, 40, 200))
        (library / "kitchen.webm").unlink()
        summary = run_extract(ExtractConfig(dataset="folder", data_root=library, model=MODEL, quiet=True))
        assert summary.library == "2 new, 0 changed, 1 removed, 3 unchanged"
        assert summary.frames_encoded == 2 * SHORT_SECONDS  # only the new files were encoded
        group = zarr.open_group(str(store), mode="r")
        ids_after = [str(i) for i in group["videos/ids"][:]]
        done_after = np.asarray(group["videos/done"][:])
        tokens_after = np.asarray(group["videos/tokens"][: len(ids_before)])
        for row, vid in enumerate(ids_before):  # unchanged rows: the same bits
            if vid != "kitchen":
                assert done_after[row] == 1 and tokens_after[row].tobytes() == tokens_before[row].tobytes(), vid
        assert done_after[ids_before.index("kitchen")] == 3  # retired
        assert {"trips/new one", "new two"} <= {v for v, d in zip(ids_after, done_after, strict=True) if d == 1}

        # 5. The index is updated in place: a new generation.
        said = _muse("index", "--cache", str(store), "--out", str(index))
        assert "2" in said and (index / "CURRENT").read_text().strip() != first_generation

        # 6. The running server answers from the new generation, no restart.
        health = _wait_for(lambda: (h := _get(base + "/health"))["generation"] != first_generation and h,
                           30, "the server to load the new generation")
        assert health["size"] == first_size + 1  # +2 clips -1 clip
        answer = _get(base + "/search?q=a+bar+moves+across&k=50")
        sources = {h["source"] for h in answer["hits"]}
        assert answer["generation"] == health["generation"]
        assert {"trips/new one", "new two", "talks/long talk"} <= sources and "kitchen" not in sources

        # 7. In a browser: a click on a moment of the long video plays it from that moment's start.
        later = max((h for h in answer["hits"] if h["source"] == "talks/long talk"), key=lambda h: h["start"])
        assert later["start"] > 0
        _play_moment_in_browser(base, later)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _play_moment_in_browser(base: str, hit: dict) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium()
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(base + "/")
        hits_box = driver.find_element(By.ID, "k")
        hits_box.clear()
        hits_box.send_keys("50")
        driver.find_element(By.ID, "q").send_keys("a bar moves across", Keys.ENTER)
        cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .hit"))
        card = next(c for c in cards if c.get_attribute("data-id") == hit["id"])
        video = driver.find_element(By.ID, "video")
        driver.execute_script("arguments[0].addEventListener('playing', (e) => "
                              "{ window.playedFrom = e.target.currentTime; }, { once: true });", video)
        card.click()
        wait.until(lambda d: d.execute_script("return window.playedFrom !== undefined;"))
        assert abs(driver.execute_script("return window.playedFrom;") - hit["start"]) < 0.5
        assert driver.execute_script("return arguments[0].error;", video) is None
    finally:
        driver.quit()
