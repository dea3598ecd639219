"""`muse serve`: bind the port, load an index and its CLIP text tower once, then answer the search
app's requests.

The app (routes, page, bounds) is `muse_pipeline.search.app`; the HTTP server and its limits are
`muse_pipeline.search.server`. This stage binds first (a port in use is one error line before CLIP
loads), wires a `Searcher` into the app and runs it on the bound socket.
"""

from __future__ import annotations

from collections.abc import Callable

from muse_pipeline.search.app import create_app
from muse_pipeline.search.http_limits import HttpLimits
from muse_pipeline.search.query import Searcher
from muse_pipeline.search.server import bind_socket, run_server


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Callable[[Searcher], None] | None = None,
          limits: HttpLimits | None = None) -> None:
    """Bind host:port, load the index and CLIP once, call `on_ready(searcher)`, then answer requests
    until interrupted. A port that cannot be bound is an `InputError` before anything loads."""
    limits = limits or HttpLimits()
    sock = bind_socket(host, port, limits.backlog)
    try:
        searcher = Searcher(index_path, device=device, pretrained=pretrained)
        app = create_app(searcher)
        if on_ready is not None:
            on_ready(searcher)
        run_server(app, sock, limits)
    finally:
        sock.close()
