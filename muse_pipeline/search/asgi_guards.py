"""ASGI middleware that stands between the HTTP server and the search app (any ASGI app).

`guard_app(app, limits, allowed_hosts)` wraps, outermost first:
- `SecureAnswers`: every answer carries SECURITY_HEADERS (set where missing), also the 500 of an
  exception the app did not handle (logged here with its traceback; the client gets one line).
- `HostGuard`: when the server is bound to loopback, a Host header naming another server is a 421
  (DNS rebinding: a page of another site whose name resolves to 127.0.0.1).
- `BodyLimit`: a body over `limits.max_body_bytes` is a 413: by its Content-Length before any of it
  is read, or counted while read (chunked), cut off there; nothing beyond the limit is buffered.
- `HeadAsGet`: HEAD is answered like GET (same status and headers, no body) on every GET route.
- `WorkQueue`: at most `limits.workers()` requests to `WORK_PATHS` run at once, the others wait in
  FIFO order; with `limits.max_queued` waiting, a new one is a 503 with Retry-After.

Every refusal is a JSON `{"detail": "<what happened; what to do>"}` with the security headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from muse_pipeline.search.app import SECURITY_HEADERS
from muse_pipeline.search.http_limits import HttpLimits

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WORK_PATHS = frozenset({"/search", "/thumb"})  # the CPU-bound routes (CLIP forward, video decode)
SECURITY_HEADER_PAIRS = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header `name` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


async def answer(send: Send, status: int, detail: str, *, close: bool = False,
                 extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON `{"detail": detail}` response (with the security headers)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *SECURITY_HEADER_PAIRS, *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class SecureAnswers:
    """Add missing SECURITY_HEADERS to every response; answer an unhandled exception with a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def secured_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {k.lower() for k, _ in message.get("headers", ())}
                missing = [(k, v) for k, v in SECURITY_HEADER_PAIRS if k not in present]
                if missing:
                    message = {**message, "headers": [*message.get("headers", ()), *missing]}
            await send(message)

        try:
            await self.app(scope, receive, secured_send)
        except Exception:
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await answer(send, 500, "internal error of the search server; its log has the details",
                             close=True)


def loopback_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host header values a server bound to `host`:`port` accepts, or None (any) when it is not
    bound to loopback (then its names are not known here). Compared in lower case."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    bare = host.strip("[]").lower()
    names = {"localhost", "127.0.0.1", "[::1]", f"[{bare}]" if ":" in bare else bare}
    return frozenset(names | {f"{name}:{port}" for name in names})


class HostGuard:
    """421 for a Host header outside `allowed` (None: accept any). A request without Host (HTTP/1.0)
    passes: a browser always sends one, and rebinding needs a browser."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = header(scope, b"host")
            if host is not None and host.decode("latin-1").lower() not in self.allowed:
                await answer(send, 421, "this server answers only for localhost; open it as "
                             "http://localhost or http://127.0.0.1 with its port", close=True)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised into the app from `receive` when the body passes the limit."""


class BodyLimit:
    """413 for a request body over `max_bytes` (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def detail(self, size: str) -> str:
        return f"the request body has {size} bytes; at most {self.max_bytes} are allowed (send fewer queries)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await answer(send, 413, self.detail(declared.decode().strip()), close=True)
            return
        received = 0
        too_large = started = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:  # whatever the app answers to the cut-off body, the answer is the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await answer(send, 413, self.detail(f"more than {self.max_bytes}"), close=True)


class _HeadAnswered(Exception):
    """Raised into the app from `send` once a HEAD answer is complete, to stop producing its body."""


class HeadAsGet:
    """Answer HEAD as the app answers GET, without the body (Content-Length stays the GET's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def bodiless_send(message: Message) -> None:
            nonlocal done
            if done:
                raise _HeadAnswered
            if message["type"] == "http.response.body":
                done = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if message.get("more_body", False):  # e.g. a video file: do not read the rest
                    raise _HeadAnswered
                return
            await send(message)

        try:
            await self.app({**scope, "method": "GET"}, receive, bodiless_send)
        except _HeadAnswered:
            pass
        except Exception:
            if not done:
                raise


class WorkQueue:
    """At most `workers` requests to `paths` at once, FIFO; 503 with `max_queued` already waiting."""

    def __init__(self, app: ASGIApp, workers: int, max_queued: int, paths: frozenset[str] = WORK_PATHS) -> None:
        self.app = app
        self.paths = paths
        self.max_queued = max_queued
        self.slots = asyncio.Semaphore(workers)
        self.waiting = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.slots.locked() and self.waiting >= self.max_queued:
            await answer(send, 503, f"the server is busy ({self.waiting} requests waiting); retry in a moment",
                         extra=[(b"retry-after", b"1")])
            return
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()


def guard_app(app: ASGIApp, limits: HttpLimits, allowed_hosts: frozenset[str] | None) -> ASGIApp:
    """`app` behind every guard of this module, in the order of the module docstring."""
    inner = WorkQueue(app, limits.workers(), limits.max_queued)
    return SecureAnswers(HostGuard(BodyLimit(HeadAsGet(inner), limits.max_body_bytes), allowed_hosts))
