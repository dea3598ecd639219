"""`muse serve`: the JSON API through FastAPI's TestClient, and the page in a real headless chromium.

The index: five short VP8 webm videos (a codec every chromium build plays), one solid colour each,
whose embeddings are the tiny random-init CLIP's own text embeddings of five captions, with an
identity text side, so caption k must retrieve video k. Expected hits come from brute force.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
from search_helpers import (
    CAPTIONS,
    RANDOM_INIT_CLIP,
    LoopbackServer,
    headless_chromium,
    unit_text_embeddings,
    write_moving_bar_video,
)

from muse_pipeline.search.app import create_app
from muse_pipeline.search.index_format import write_index
from muse_pipeline.search.limits import DEFAULT_K, MAX_K, MAX_QUERY_CHARS
from muse_pipeline.search.query import Searcher

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 40), (240, 240, 240)]
IDS = ["v0", "v1", "v2", "v3 <b>&amp;</b>", "v4"]
HOSTILE_CAPTION = '<img src=x onerror="document.title=\'pwned\'">a white line'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_clip):
    """(app, searcher, embeddings [5, D], video paths): five 4 s VP8 webm videos (96x64, 10 fps, a
    codec every chromium build plays), one solid colour each."""
    root = tmp_path_factory.mktemp("serve")
    videos = root / "videos"
    videos.mkdir()
    paths = []
    for i, colour in enumerate(COLOURS):
        paths.append(str(videos / f"clip{i}.webm"))
        write_moving_bar_video(Path(paths[-1]), colour, seconds=4, fps=10, codec="libvpx", size=(96, 64))
    emb = unit_text_embeddings(tiny_clip, CAPTIONS)
    windows = np.full((5, 2), np.nan)
    windows[2] = (1.0, 3.5)  # video 2 is a clip from 1 s to 3.5 s
    captions = [*CAPTIONS[:4], HOSTILE_CAPTION]
    index = write_index(root / "index", emb, ids=IDS, paths=paths, captions=captions, windows=windows,
                        clip=RANDOM_INIT_CLIP, words=16)
    searcher = Searcher(index)
    return create_app(searcher), searcher, emb, paths


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    return TestClient(served[0])


def test_get_search_matches_brute_force(client, served) -> None:
    _, _, emb, paths = served
    q = served[1].encoder.encode([CAPTIONS[2]])[0]
    order = np.argsort(-(emb @ q), kind="stable")
    response = client.get("/search", params={"q": CAPTIONS[2], "k": 3})
    assert response.status_code == 200
    data = response.json()
    assert data["query"] == CAPTIONS[2] and data["k"] == 3
    assert [h["id"] for h in data["hits"]] == [IDS[i] for i in order[:3]]
    np.testing.assert_allclose([h["score"] for h in data["hits"]], (emb @ q)[order[:3]], atol=1e-5)
    top = data["hits"][0]
    assert (top["id"], top["path"], top["start"], top["end"], top["caption"]) == ("v2", paths[2], 1.0, 3.5, CAPTIONS[2])
    assert top["video_url"] == "/video?id=v2" and top["thumb_url"] == "/thumb?id=v2"


def test_post_search_batch_equals_single_queries(client) -> None:
    response = client.post("/search", json={"queries": [CAPTIONS[0], CAPTIONS[3]], "k": 2})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["query"] for r in results] == [CAPTIONS[0], CAPTIONS[3]]
    for r in results:
        single = client.get("/search", params={"q": r["query"], "k": 2}).json()["hits"]
        assert [h["id"] for h in r["hits"]] == [h["id"] for h in single]
        assert [h["score"] for h in r["hits"]] == pytest.approx([h["score"] for h in single], abs=1e-6)
    assert results[1]["hits"][0]["id"] == IDS[3]
    # An id with markup comes back as data, URL-encoded in its links.
    assert results[1]["hits"][0]["video_url"] == "/video?id=v3%20%3Cb%3E%26amp%3B%3C%2Fb%3E"


@pytest.mark.parametrize("params", [{"q": "x", "k": 0}, {"q": "x", "k": 101}, {"q": ""},
                                    {"q": "x" * (MAX_QUERY_CHARS + 1)}, {"k": 3}])
def test_get_search_bounds(client, params) -> None:
    assert client.get("/search", params=params).status_code == 422


def test_post_search_bounds(client) -> None:
    assert client.post("/search", json={"queries": ["a"] * 65}).status_code == 422
    assert client.post("/search", json={"queries": []}).status_code == 422
    assert client.post("/search", json={"queries": ["a"], "k": 1000}).status_code == 422
    assert client.post("/search", json={"queries": ["x" * (MAX_QUERY_CHARS + 1)]}).status_code == 422
    response = client.post("/search", json={"queries": ["   "]})
    assert response.status_code == 400 and "empty" in response.json()["detail"]
    assert "Content-Security-Policy" in response.headers  # the UserError handler's answer is guarded too


def test_video_served_by_id_with_ranges(client, served) -> None:
    paths = served[3]
    data = Path(paths[1]).read_bytes()
    full = client.get("/video", params={"id": "v1"})
    assert full.status_code == 200 and full.content == data
    assert full.headers["content-type"] == "video/webm" and full.headers["accept-ranges"] == "bytes"
    part = client.get("/video", params={"id": "v1"}, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    odd = client.get("/video", params={"id": IDS[3]})
    assert odd.status_code == 200 and odd.content == Path(paths[3]).read_bytes()


@pytest.mark.parametrize("params", [{"id": "../../etc/passwd"}, {"id": "/etc/passwd"}, {"id": "clip1.webm"},
                                    {"path": "/etc/passwd"}])
def test_only_indexed_files_are_served(client, params) -> None:
    assert client.get("/video", params=params).status_code in (404, 422)
    assert client.get("/thumb", params=params).status_code in (404, 422)


def test_thumbnail_strip_shows_the_clip(client) -> None:
    from PIL import Image

    response = client.get("/thumb", params={"id": "v0"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    img = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)
    # 4 frames of 96x64 scaled to height 96 (144 wide) with 4-pixel gaps.
    assert img.shape == (96, 4 * 144 + 3 * 4, 3)
    red = img[:, :, 0] > 150
    assert red.mean() > 0.5  # mostly the video's red (the white bar is the rest)


def test_page_and_headers(client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    page = response.text
    assert 'id="q"' in page and '<video id="video"' in page and 'src="/app.js"' in page
    assert "randomly initialised CLIP" in page and "real CLIP weights" in page
    assert "<script>" not in page  # only the external script, which the CSP allows
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    js = client.get("/app.js").text
    assert "innerHTML" not in js and "textContent" in js
    info = client.get("/info").json()
    assert info["n_videos"] == 5 and info["random_init"] is True and info["max_k"] == MAX_K
    assert f'max="{MAX_K}" value="{DEFAULT_K}"' in page and "{{" not in page
    assert client.get("/search", params={"q": CAPTIONS[0]}).json()["k"] == DEFAULT_K


# --------------------------------------------------------------------------------------------------
# The page in a real browser.


def test_page_in_headless_chromium(served, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium()
    with LoopbackServer(served[0]) as server:
        try:
            wait = WebDriverWait(driver, 15)
            driver.get(server.url + "/")
            assert "real CLIP weights" in driver.find_element(By.ID, "note").text
            box = driver.find_element(By.ID, "q")
            box.send_keys(CAPTIONS[2], Keys.ENTER)
            cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .hit"))
            assert len(cards) == 5  # k is DEFAULT_K by default, the index has 5 videos
            assert cards[0].get_attribute("data-id") == "v2"
            assert cards[0].find_element(By.CSS_SELECTOR, ".caption").text == CAPTIONS[2]
            # Every thumbnail strip loaded (decoded by the browser, non-zero size).
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
            # Hostile markup in a caption is shown as text, never parsed.
            hostile = [c for c in cards if c.get_attribute("data-id") == "v4"][0]
            assert hostile.find_element(By.CSS_SELECTOR, ".caption").text == HOSTILE_CAPTION
            assert not driver.find_elements(By.CSS_SELECTOR, "#grid img[src='x']")
            assert driver.title == "muse search"
            # The card labels its moment; a click plays from the moment's start and stops at its end.
            assert cards[0].find_element(By.CSS_SELECTOR, ".moment").text == "1.0-3.5 s"
            video = driver.find_element(By.ID, "video")
            driver.execute_script("arguments[0].addEventListener('playing', (e) => "
                                  "{ window.playedFrom = e.target.currentTime; }, { once: true });", video)
            cards[0].click()
            wait.until(lambda d: d.execute_script("return window.playedFrom !== undefined;"))
            assert abs(driver.execute_script("return window.playedFrom;") - 1.0) < 0.3
            wait.until(lambda d: d.execute_script("const v = arguments[0]; return !v.paused && v.currentTime > 1.0;", video))
            first = driver.execute_script("return arguments[0].currentTime;", video)
            wait.until(lambda d: d.execute_script("return arguments[0].currentTime;", video) > first + 0.2)
            assert driver.execute_script("return arguments[0].dataset.id;", video) == "v2"
            assert driver.execute_script("return arguments[0].error;", video) is None
            wait.until(lambda d: d.execute_script("return arguments[0].paused;", video))
            assert 3.5 <= driver.execute_script("return arguments[0].currentTime;", video) < 3.9
            assert "end of the moment" in driver.find_element(By.ID, "now-playing").text
            assert driver.find_element(By.ID, "moment-span").is_displayed()
            # Per video: one card per file (here every file has one moment).
            driver.find_element(By.ID, "group").click()
            driver.find_element(By.ID, "q").send_keys(Keys.ENTER)
            groups = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .hit.group"))
            assert [g.get_attribute("data-source") for g in groups][0] == "v2" and len(groups) == 5
            assert "5 videos (5 moments)" in driver.find_element(By.ID, "status").text
            shot = tmp_path / "page.png"
            assert driver.save_screenshot(str(shot))
        finally:
            driver.quit()
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not a blank page
    # The green of the playing video (or its thumbnails) is on screen.
    green = (img[:, :, 1] > 150) & (img[:, :, 0] < 100) & (img[:, :, 2] < 100)
    assert green.sum() > 500


def test_serve_command_binds_loopback_by_default(served, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import muse_pipeline.stages.serve as serve_stage
    from muse_pipeline.cli.main import app

    binds, runs = [], []

    def bind(host: str, port: int, backlog: int) -> socket.socket:  # records; 8080 may be taken here
        binds.append((host, port))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        return sock

    monkeypatch.setattr(serve_stage, "bind_socket", bind)
    monkeypatch.setattr(serve_stage, "run_server", lambda app_, sock, limits: runs.append(sock))
    index = served[1].index.path
    result = CliRunner().invoke(app, ["serve", "--index", str(index)])
    assert result.exit_code == 0, result.output
    assert binds == [("127.0.0.1", 8080)] and len(runs) == 1
    assert "http://127.0.0.1:8080/" in result.output and "real CLIP weights" in result.output
    result = CliRunner().invoke(app, ["serve", "--index", str(index), "--port", "0"])
    assert result.exit_code != 0 and "--port" in result.output and len(binds) == 1
