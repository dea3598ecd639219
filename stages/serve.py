"""`muse serve`: bind the port, load an index's current generation and its CLIP text tower once, then
answer the search app's requests, switching to each new generation `muse index` publishes (no restart).

The app (routes, page) is `muse_pipeline.search.app`; the HTTP server and its limits are
`muse_pipeline.search.server`; keeping the index fresh is `muse_pipeline.search.live.LiveSearcher`.
This stage binds first (a port in use is one error line before anything loads; requests that arrive
while the index loads wait in the socket's backlog), wires them and runs the app on the bound socket.
A missing or damaged index fails as one `error:` line.
"""

from __future__ import annotations

from collections.abc import Callable

from muse_pipeline.search.app import create_app
from muse_pipeline.search.http_limits import HttpLimits
from muse_pipeline.search.live import LiveSearcher
from muse_pipeline.search.server import bind_socket, run_server


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Callable[[LiveSearcher], None] | None = None,
          limits: HttpLimits | None = None) -> None:
    """Bind host:port, load the index and its text tower once, call `on_ready(live)`, then answer
    requests until interrupted."""
    limits = limits or HttpLimits()
    sock = bind_socket(host, port, limits.backlog)
    try:
        live = LiveSearcher(index_path, device=device, pretrained=pretrained)
        app = create_app(live)
        if on_ready is not None:
            on_ready(live)
        run_server(app, sock, limits)
    finally:
        sock.close()
