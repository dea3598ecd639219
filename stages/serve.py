"""`muse serve`: bind the port, load an index's current generation and its CLIP text tower once, then
answer the search app's requests, switching to each new generation `muse index` publishes (no restart).

The app (routes, page, bounds) is `muse_pipeline.search.app`; keeping the index fresh is
`muse_pipeline.search.live.LiveSearcher`; this stage only wires them and runs the app. The port is
bound first (a port in use fails at once, before any loading); a missing or damaged index then fails
as one `error:` line; requests that arrive while the index loads wait in the socket's backlog.
"""

from __future__ import annotations

from collections.abc import Callable

from muse_pipeline.search.app import bind_listener, create_app, run_app
from muse_pipeline.search.live import LiveSearcher


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Callable[[LiveSearcher], None] | None = None) -> None:
    """Bind host:port, load the index and its text tower once, call `on_ready(live)`, then answer
    requests until interrupted."""
    sock = bind_listener(host, port)
    try:
        live = LiveSearcher(index_path, device=device, pretrained=pretrained)
        app = create_app(live)
        if on_ready is not None:
            on_ready(live)
        run_app(app, host=host, port=port, sock=sock)
    finally:
        sock.close()
