"""Shared pieces of the search and serve tests: the five captions, a fake run whose expected ranking
is known, a tiny feature cache built from them, and short test videos.

Video k's CLS tokens are the tiny random-init CLIP's (`muse-tiny`, D = 64) text embedding of caption
k, and the fake run scores with CLIP's own cosine, so query k must retrieve video k. `LoopbackServer(app)`: a real uvicorn on a free 127.0.0.1 port, in a thread.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

CAPTIONS = [
    "a red circle moves left",
    "a blue square grows",
    "a green triangle spins",
    "a yellow star falls down",
    "a white line turns",
]
TINY_D, TINY_L, TINY_T = 64, 5, 2  # L = 1 + 2 * 2: grid 2
FP = {"model": "muse-tiny", "weights": "random-init", "dim": TINY_D, "words": 16}
RANDOM_INIT_CLIP = {"model": "muse-tiny", "weights_id": "random-init"}


class FakeRun:
    """meanP over CLS rows and identity text side: the score is CLIP's own cosine."""

    def to(self, device: str) -> FakeRun:
        return self

    def eval(self) -> FakeRun:
        return self

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from muse_pipeline.evaluation.embed import ZeroShotMeanP

        return ZeroShotMeanP().embed_videos(tokens, mask)

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(text_emb.float(), dim=-1)


def caption_store(tmp_path: Path, encoder, ids: list[str] | None = None, paths: list[str] | None = None):
    """A 6-video cache: videos 0-4 show CAPTIONS[0-4], video 5 failed extraction (done = 2); captions
    "caption 0" of video 0 and "caption 1" of video 2 (make_store's)."""
    from test_evaluate import make_store

    text = encoder.encode_texts(encoder.tokenize(CAPTIONS, 16)).numpy()
    n = len(CAPTIONS) + 1
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


def brute_order(emb: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rows by descending score E @ q, ties to the lower row."""
    return np.argsort(-(emb @ q), kind="stable")


def unit_text_embeddings(encoder, texts: list[str]) -> np.ndarray:
    """The tiny CLIP's text embeddings of `texts`, L2-normalised [M, D] float32."""
    emb = encoder.encode_texts(encoder.tokenize(texts, 16)).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def write_moving_bar_video(path: Path, colour: tuple[int, int, int] = (0, 0, 0), *, seconds: int = 3,
                           fps: int = 4, codec: str = "mpeg4", size: tuple[int, int] = (64, 48)) -> Path:
    """A video of `colour` with a white bar that moves, so frames differ (codec mpeg4 or libvpx for webm)."""
    import av

    width, height = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            img = np.empty((height, width, 3), np.uint8)
            img[:] = colour
            x = (3 * i) % (width - 6)
            img[:, x : x + 6] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class LoopbackServer:
    """uvicorn on a socket bound to a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def headless_chromium():
    """A selenium driver of Debian's chromium, headless, autoplay allowed. Fails (not skips) under
    CI=true when chromium, chromedriver or selenium is missing; skips elsewhere."""
    import os
    import shutil

    import pytest

    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        binary = None
    if not (binary and driver_path):
        reason = "needs chromium + chromedriver (apt-get install chromium chromium-driver) and selenium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason=reason)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
