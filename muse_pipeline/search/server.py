"""The HTTP server of `muse serve`: bind first, then answer an ASGI app with uvicorn under `HttpLimits`.

- `bind_socket(host, port, backlog)`: the listening socket, or one `InputError` line (port in use,
  address not on this machine, ...). Called before anything slow (CLIP) is loaded, so a server never
  says "serving" on a port it cannot have.
- `GuardedH11Protocol`: uvicorn's h11 protocol with what it lacks (uvicorn 0.55 has only the idle
  keep-alive timeout and a `limit_concurrency` that answers 503 only once a request head has come):
  a deadline for the request head (from accept or the head's first byte) and for the body, a cap on
  open connections (evict the oldest connection waiting for a head, else answer 503), the security
  headers on uvicorn's own 400, and a lingering close when an answer leaves a body unread (a 413),
  so the client reads the answer instead of a connection reset.
- `run_server(app, sock, limits)`: serve `guard_app(app, ...)` on `sock` until interrupted.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from muse_pipeline.errors import InputError
from muse_pipeline.search.asgi_guards import SECURITY_HEADER_PAIRS, answer, guard_app, loopback_hosts
from muse_pipeline.search.http_limits import HttpLimits

log = logging.getLogger(__name__)

LINGER_S = 2.0  # how long an unread body is drained after an early answer
LINGER_BYTES = 4 << 20  # and at most this much of it


def bind_socket(host: str, port: int, backlog: int = HttpLimits.backlog) -> socket.socket:
    """A TCP socket listening on host:port (port 0: any free port); a user error when that cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise InputError(f"--host {host} is not a name or address of this machine; pass --host 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT, as uvicorn does
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use; pass --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InputError(f"{host} is not an address of this machine; pass --host") from None
        if exc.errno == errno.EACCES:
            raise InputError(f"port {port} on {host} needs privileges; pass --port above 1023") from None
        raise InputError(f"cannot listen on {host} port {port} ({exc.strerror}); pass another --host or --port") from None
    return sock


def _raw_answer(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 JSON answer that closes the connection, for answers outside any request."""
    import json

    body = json.dumps({"detail": detail}).encode()
    lines = [f"HTTP/1.1 {status} {reason}".encode(), b"content-type: application/json",
             b"content-length: " + str(len(body)).encode(), b"connection: close",
             *(k + b": " + v for k, v in SECURITY_HEADER_PAIRS)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _over_capacity(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await answer(send, 503, "the server has too many open connections; retry in a moment", close=True,
                 extra=[(b"retry-after", b"1")])


class _LingeringTransport:
    """The connection's transport, whose `close()` half-closes and drains first when the request's
    body is still unread (closing a socket with unread input sends a reset, which can destroy the
    answer before the client reads it)."""

    def __init__(self, transport: Any, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def close(self) -> None:
        protocol = self._protocol
        if (protocol.lingering or self._transport.is_closing() or protocol.conn.their_state is not h11.SEND_BODY
                or not self._transport.can_write_eof()):
            self._transport.close()
            return
        protocol.lingering = True
        protocol.cancel_deadline()
        self._transport.write_eof()
        self._transport.resume_reading()
        protocol.deadline = protocol.loop.call_later(LINGER_S, self._transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under `limits` (set per server by `protocol_for`; see the module docstring)."""

    limits: HttpLimits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: Any = None  # the head or body deadline (asyncio.TimerHandle), or the linger's end
        self.deadline_for: str | None = None  # "head" | "body"
        self.lingering = False
        self.drained = 0
        self.opened_at = self.loop.time()

    # -- connections
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))
        if len(self.connections) > self.limits.max_connections:
            victim = self.oldest_waiting()
            if victim is not None:
                log.info("closing an idle connection: %d connections open", len(self.connections))
                victim.transport._transport.close()
            else:
                log.warning("refusing a connection: %d connections open, each with a request in flight",
                            len(self.connections))
                self.app = _over_capacity  # answers its request 503 (uvicorn takes self.app per request)
        self.track_deadlines()

    def waiting_for_head(self) -> bool:
        """No request in flight: idle keep-alive or a head still coming."""
        return (not self.lingering and self.conn.their_state is h11.IDLE
                and (self.cycle is None or self.cycle.response_complete))

    def oldest_waiting(self) -> GuardedH11Protocol | None:
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self
                   and c.waiting_for_head() and not c.transport.is_closing()]
        return min(waiting, key=lambda c: c.opened_at, default=None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        super().connection_lost(exc)

    # -- deadlines
    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.deadline_for = None

    def track_deadlines(self) -> None:
        """Arm the head deadline while a head is awaited, the body deadline while a body is; once each."""
        if self.lingering or self.transport.is_closing():
            return
        state = self.conn.their_state
        wanted = "head" if self.waiting_for_head() else "body" if state is h11.SEND_BODY else None
        if wanted == self.deadline_for:
            return
        self.cancel_deadline()
        if wanted == "head":
            self.deadline = self.loop.call_later(self.limits.header_timeout_s, self.head_timeout)
        elif wanted == "body":
            self.deadline = self.loop.call_later(self.limits.body_timeout_s, self.body_timeout)
        self.deadline_for = wanted

    def head_timeout(self) -> None:
        self.deadline = self.deadline_for = None
        if self.transport.is_closing() or not self.waiting_for_head():
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why the connection ends
            log.info("closing a connection whose request head took over %gs", self.limits.header_timeout_s)
            self.transport.write(_raw_answer(408, "Request Timeout", "the request head took longer than "
                                             f"{self.limits.header_timeout_s:g} s; send it at once"))
        self.transport._transport.close()

    def body_timeout(self) -> None:
        self.deadline = self.deadline_for = None
        log.warning("closing a connection whose request body took over %gs", self.limits.body_timeout_s)
        self.transport._transport.close()

    # -- data
    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the answer is out; discard the rest of the body, within bounds
            self.drained += len(data)
            if self.drained > LINGER_BYTES:
                self.transport._transport.close()
            return
        super().data_received(data)
        self.track_deadlines()

    def eof_received(self) -> bool | None:
        if self.lingering:
            self.transport._transport.close()
        return super().eof_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self.cancel_deadline()  # the next head's time starts now, beside the keep-alive timeout
        self.track_deadlines()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a malformed request, with the security headers."""
        self.transport.write(_raw_answer(400, "Bad Request", f"{msg.rstrip('.')}; send a valid HTTP/1.1 request"))
        self.transport._transport.close()


def protocol_for(limits: HttpLimits) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` class bound to `limits` (uvicorn builds protocols from a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def server_config(app: Any, sock: socket.socket, limits: HttpLimits) -> Any:
    """The uvicorn Config that serves `app` behind its guards on `sock` (warnings only in the log)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Config(guard_app(app, limits, loopback_hosts(host, port)), http=protocol_for(limits),
                          log_level="warning", timeout_keep_alive=limits.keep_alive_s, backlog=limits.backlog,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=limits.max_head_bytes, ws="none")  # no route is a websocket


def run_server(app: Any, sock: socket.socket, limits: HttpLimits | None = None) -> None:
    """Answer requests to `app` on the listening `sock` (from `bind_socket`) until interrupted."""
    import uvicorn

    uvicorn.Server(server_config(app, sock, limits or HttpLimits())).run(sockets=[sock])
