"""The search server's limits, checked with real sockets against a real server on 127.0.0.1.

Every server runs in a thread on a free loopback port (`bind_socket(..., 0)`) and stops at the end of
its test; every client socket has a timeout, and every loop a bound in count and time. The limits of
a test are small (timeouts of a second, a few connections) so that each test takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from search_helpers import CAPTIONS, RANDOM_INIT_CLIP, unit_text_embeddings, write_moving_bar_video

from muse_pipeline.search.app import SECURITY_HEADERS, create_app
from muse_pipeline.search.asgi_guards import loopback_hosts
from muse_pipeline.search.http_limits import HttpLimits
from muse_pipeline.search.index_format import write_index
from muse_pipeline.search.query import Searcher
from muse_pipeline.search.server import bind_socket, server_config

CSP = SECURITY_HEADERS["Content-Security-Policy"]


@pytest.fixture(scope="module")
def search_app(tmp_path_factory: pytest.TempPathFactory, tiny_clip):
    """(app, path of video v0): the search app over five videos whose embeddings are the captions'."""
    root = tmp_path_factory.mktemp("hardening")
    video = write_moving_bar_video(root / "clip0.mp4", (200, 30, 30), seconds=2, fps=4)
    emb = unit_text_embeddings(tiny_clip, CAPTIONS)
    index = write_index(root / "index", emb, ids=[f"v{i}" for i in range(5)], paths=[str(video)] * 5,
                        captions=CAPTIONS, windows=np.full((5, 2), np.nan), clip=RANDOM_INIT_CLIP, words=16)
    return create_app(Searcher(index)), video


@contextlib.contextmanager
def running(app, limits: HttpLimits = HttpLimits()):
    """Serve `app` behind the project's guards on a free loopback port; yields the port."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, sock, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self):
        return json.loads(self.body)


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answer(sock: socket.socket, method: str = "GET") -> Answer | None:
    """One HTTP/1.1 answer from `sock` (Content-Length bodies), or None when the connection closed
    (or was reset) before a whole head came."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return None
    return Answer(int(lines[0].split()[1]), headers, body)


def request(port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> Answer | None:
    """Send one request on a fresh connection and read its answer."""
    head = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body:
        head.setdefault("Content-Length", str(len(body)))
        head.setdefault("Content-Type", "application/json")
    raw = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with connect(port, timeout) as sock:
        sock.sendall(raw.encode("latin-1") + body)
        return read_answer(sock, method)


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the peer closed `sock` within `seconds`, what it sent before)."""
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def assert_secure(answer: Answer) -> None:
    assert answer.headers.get("content-security-policy") == CSP
    assert answer.headers.get("x-content-type-options") == "nosniff"


# --------------------------------------------------------------------------------------------------
# 1. Request size


def test_declared_body_over_the_limit_is_413_before_any_body(search_app) -> None:
    limits = HttpLimits(max_body_bytes=64 << 10)
    with running(search_app[0], limits) as port, connect(port) as sock:
        sock.sendall(f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {50 << 20}\r\n\r\n".encode())
        answer = read_answer(sock)  # no byte of the 50 MB body is ever sent: any answer came before it
        assert answer is not None and answer.status == 413, answer
        assert "at most 65536" in answer.json()["detail"] and len(answer.body) < 300
        assert_secure(answer)
        assert closed_within(sock, 5)[0]


def test_chunked_body_is_cut_off_at_the_limit() -> None:
    """The app behind the guard is never handed a byte beyond the limit, however long the body; the
    client gets a 413 (a lingering close drains the rest, so it is not a reset)."""
    seen = []

    async def counting_app(scope, receive, send):
        if scope["type"] != "http":
            return
        total, more = 0, True
        while more:
            message = await receive()
            total += len(message.get("body", b""))
            seen.append(total)
            more = message.get("more_body", False)
        body = str(total).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    limit = 64 << 10
    with running(counting_app, HttpLimits(max_body_bytes=limit)) as port, connect(port) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n" % 4096 + b"a" * 4096 + b"\r\n"
        for _ in range(2 * limit // 4096):  # twice the limit, then the end of the body
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
        answer = read_answer(sock)
    assert answer is not None and answer.status == 413 and "at most 65536" in answer.json()["detail"]
    assert_secure(answer)
    assert max(seen, default=0) <= limit  # the app is never handed a byte beyond the limit
    with running(counting_app, HttpLimits(max_body_bytes=limit)) as port:  # at the limit it passes
        answer = request(port, "POST", "/echo", b"b" * limit)
    assert answer is not None and answer.status == 200 and answer.body == str(limit).encode()


def test_search_request_over_the_limit_and_422_without_echo(search_app) -> None:
    with running(search_app[0]) as port:
        big = json.dumps({"queries": ["a cat " * 100] * 4000}).encode()  # 2.4 MB
        answer = request(port, "POST", "/search", big)
        assert answer is not None and answer.status == 413
        assert len(answer.body) < 300
        with connect(port) as sock:  # the same body chunked: counted while read
            sock.sendall(f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                         f"Transfer-Encoding: chunked\r\n\r\n".encode())
            for start in range(0, len(big), 1 << 16):
                piece = big[start : start + (1 << 16)]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            answer = read_answer(sock)
        assert answer is not None and answer.status == 413 and "at most 1048576" in answer.json()["detail"]
        # Within the size limit but outside the API: one short line, no input in it.
        long_queries = json.dumps({"queries": ["x" * 1001] * 64}).encode()
        for body in (long_queries, b'{"queries": 5}', b"{" + b"z" * 500_000, b'{"queries": ["a"], "k": "' + b"9" * 5000 + b'"}'):
            answer = request(port, "POST", "/search", body)
            assert answer is not None and answer.status == 422, body[:40]
            detail = answer.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and len(answer.body) < 400, detail
            assert "xxxxxxxxxx" not in detail and "zzzzzzzzzz" not in detail and "9999999999" not in detail
            assert_secure(answer)


# --------------------------------------------------------------------------------------------------
# 2. Slow and idle connections


def test_slow_request_head_is_cut_at_the_timeout(search_app) -> None:
    limits = HttpLimits(header_timeout_s=1.0)
    head = b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 60
    with running(search_app[0], limits) as port, connect(port) as sock:
        received = b""
        closed = False
        sent = 0
        for byte in head:  # one byte every 0.1 s at least: 8 s for the whole head, were it allowed
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 1
            closed, got = closed_within(sock, 0.1)
            received += got
            if closed:
                break
    assert closed and sent < len(head), sent  # cut off while still sending
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b"content-security-policy" in received.lower()


def test_idle_and_keep_alive_connections_are_closed(search_app) -> None:
    """Each by its own limit (the other one set to 60 s); the wait is bounded at 10 s."""
    with running(search_app[0], HttpLimits(header_timeout_s=1.0, keep_alive_s=60)) as port:
        with connect(port) as idle:  # never sends a byte
            t0 = time.monotonic()
            assert closed_within(idle, 10)[0]
            assert time.monotonic() - t0 > 0.5  # by the deadline, not at once
    with running(search_app[0], HttpLimits(header_timeout_s=60, keep_alive_s=0.5)) as port:
        with connect(port) as kept:  # one request, then silence
            kept.sendall(f"GET /info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            answer = read_answer(kept)
            assert answer is not None and answer.status == 200
            assert closed_within(kept, 10)[0]


def test_slow_request_body_is_cut_at_the_timeout(search_app) -> None:
    with running(search_app[0], HttpLimits(body_timeout_s=1.0, header_timeout_s=60, search_workers=2)) as port:
        with connect(port) as sock:
            sock.sendall(f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode())
            interim = read_answer(sock)  # the head is read and the app waits for the body
            assert interim is not None and interim.status == 100
            sock.sendall(b'{"queries": [')  # then nothing: 987 bytes never come
            assert closed_within(sock, 10)[0]
        answer = request(port, "GET", "/search?q=a%20red%20circle&k=1")  # the server goes on
        assert answer is not None and answer.status == 200


def test_200_idle_sockets_do_not_stop_a_client(search_app) -> None:
    with running(search_app[0]) as port:
        idle = [connect(port) for _ in range(200)]
        try:
            for i, sock in enumerate(idle[::2]):  # half of them sent part of a head
                sock.sendall(b"GET /search?q=a HTTP/1.1\r\nHo" if i % 2 else b"G")
            answer = request(port, "GET", "/search?q=a%20red%20circle&k=2", timeout=30)
            assert answer is not None and answer.status == 200 and len(answer.json()["hits"]) == 2
        finally:
            for sock in idle:
                sock.close()


def test_connection_cap_evicts_idle_then_refuses_with_503(search_app) -> None:
    limits = HttpLimits(max_connections=4, header_timeout_s=60, search_workers=4)
    with running(search_app[0], limits) as port:
        idle = [connect(port) for _ in range(4)]
        try:
            answer = request(port, "GET", "/info")  # the oldest idle connection makes room
            assert answer is not None and answer.status == 200
            assert closed_within(idle[0], 10)[0]
            assert not closed_within(idle[1], 0.2)[0]
        finally:
            for sock in idle:
                sock.close()
        # Four requests in flight (heads read, bodies pending): nothing to evict, a fifth is refused.
        busy = [connect(port) for _ in range(4)]
        try:
            for sock in busy:
                sock.sendall(f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                             f"\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode())
            for sock in busy:  # the app asked for the body: the request is in flight
                interim = read_answer(sock)
                assert interim is not None and interim.status == 100
            answer = request(port, "GET", "/info")
            assert answer is not None and answer.status == 503, answer
            assert answer.headers.get("retry-after") == "1" and "connections" in answer.json()["detail"]
            assert_secure(answer)
        finally:
            for sock in busy:
                sock.close()


# --------------------------------------------------------------------------------------------------
# 3. Overload: queue or refuse, never drop


def test_work_queue_answers_every_request() -> None:
    import asyncio

    async def slow_search(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(2.0)  # long enough for all six to arrive while the first runs
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"done"})

    limits = HttpLimits(search_workers=1, max_queued=2)
    with running(slow_search, limits) as port:
        socks = [connect(port) for _ in range(6)]
        try:
            for sock in socks:
                sock.sendall(f"GET /search?q=x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            answers = [read_answer(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
    assert all(a is not None for a in answers)
    assert sorted(a.status for a in answers) == [200, 200, 200, 503, 503, 503]  # 1 running + 2 waiting
    refused = [a for a in answers if a.status == 503]
    assert all(a.headers.get("retry-after") == "1" and "busy" in a.json()["detail"] for a in refused)


# --------------------------------------------------------------------------------------------------
# 4. Odd requests


def test_text_that_is_not_a_query_is_422(search_app) -> None:
    with running(search_app[0]) as port:
        for body in (b'{"queries": ["\\ud800"]}', b'{"queries": ["a", "b\\udfffc"]}', b'{"queries": ["a"], "k": NaN}',
                     b'{"queries": ["\\u0000\\u0000"]}', b'{"queries": ["\\u0001 \\u007f"]}'):
            answer = request(port, "POST", "/search", body)
            assert answer is not None and answer.status == 422, (body, answer)
            detail = answer.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail
            assert_secure(answer)
        assert "unicode" in request(port, "POST", "/search", b'{"queries": ["\\ud800"]}').json()["detail"].lower()
        assert "k" in request(port, "POST", "/search", b'{"queries": ["a"], "k": NaN}').json()["detail"]
        for target in ("/search?q=%00%00", "/search?q=%01", "/search?q=a&k=NaN"):
            answer = request(port, "GET", target)
            assert answer is not None and answer.status == 422, target
        # Control characters inside visible text are fine.
        answer = request(port, "POST", "/search", b'{"queries": ["a red\\u0000 circle"], "k": 1}')
        assert answer is not None and answer.status == 200


def test_500_and_400_carry_the_security_headers() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/boom")
    def boom() -> dict:
        raise RuntimeError("a bug")

    with running(app) as port:
        answer = request(port, "GET", "/boom")
        assert answer is not None and answer.status == 500
        assert_secure(answer)
        assert "a bug" not in answer.body.decode()
        with connect(port) as sock:  # not HTTP: uvicorn's own 400
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = read_answer(sock)
        assert answer is not None and answer.status == 400
        assert_secure(answer)


def test_head_is_answered_like_get(search_app) -> None:
    video = search_app[1]
    with running(search_app[0]) as port:
        for target in ("/", "/info", "/app.js", "/video?id=v0", "/search?q=a%20cat&k=1"):
            get = request(port, "GET", target)
            with connect(port) as sock:
                sock.sendall(f"HEAD {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                head = read_answer(sock, "HEAD")
                assert head is not None and get is not None
                assert (head.status, head.headers.get("content-type")) == (get.status, get.headers.get("content-type"))
                assert head.status == 200 and head.body == b""
                if target != "/search?q=a%20cat&k=1":  # its "ms" changes between answers
                    assert head.headers["content-length"] == get.headers["content-length"]
                assert_secure(head)
                # The connection goes on: no stray body bytes before the next answer.
                sock.sendall(f"GET /info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                after = read_answer(sock)
                assert after is not None and after.status == 200 and after.json()["n_videos"] == 5
        assert head is not None
        assert request(port, "HEAD", "/video?id=v0").headers["content-length"] == str(video.stat().st_size)


def test_foreign_host_headers_are_refused_on_loopback(search_app) -> None:
    with running(search_app[0]) as port:
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}", f"localhost.evil:{port}"):
            answer = request(port, "GET", "/info", headers={"Host": host})
            assert answer is not None and answer.status == 421, host
            assert_secure(answer)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "localhost"):
            answer = request(port, "GET", "/info", headers={"Host": host})
            assert answer is not None and answer.status == 200, host
    assert loopback_hosts("0.0.0.0", 8080) is None and loopback_hosts("192.168.1.4", 8080) is None
    assert "[::1]:8080" in loopback_hosts("::1", 8080)


# --------------------------------------------------------------------------------------------------
# 5. A port in use


def test_port_in_use_is_one_line_before_clip_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import muse_pipeline.stages.serve as serve_stage
    from muse_pipeline.cli.main import app

    loaded = []
    monkeypatch.setattr(serve_stage, "LiveSearcher", lambda *a, **k: loaded.append(a))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = CliRunner().invoke(app, ["serve", "--index", "/nonexistent-index", "--port", str(port)])
    finally:
        taken.close()
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: port {port} on 127.0.0.1 is in use; pass --port"], result.output
    assert not loaded and "serving" not in result.output
