"""`muse serve`: bind the port, load an index and its CLIP text tower once, answer the search app's requests.

The app (routes, page, bounds) is `muse_pipeline.search.app`; this stage only wires a `Searcher`
into it and runs it. The port is bound first (a port in use fails at once, before any loading) and
requests that arrive while the index loads wait in the socket's backlog.
"""

from __future__ import annotations

from collections.abc import Callable

from muse_pipeline.search.app import bind_listener, create_app, run_app
from muse_pipeline.search.query import Searcher


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Callable[[Searcher], None] | None = None) -> None:
    """Bind host:port, load the index and its text tower once, call `on_ready(searcher)`, then answer
    requests until interrupted."""
    sock = bind_listener(host, port)
    try:
        searcher = Searcher(index_path, device=device, pretrained=pretrained)
        app = create_app(searcher)
        if on_ready is not None:
            on_ready(searcher)
        run_app(app, host=host, port=port, sock=sock)
    finally:
        sock.close()
