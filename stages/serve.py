"""`muse serve`: load an index and its CLIP text tower once, then answer the search app's requests.

The app (routes, page, bounds) is `muse_pipeline.search.app`; this stage only wires a `Searcher`
into it and runs it.
"""

from __future__ import annotations

from collections.abc import Callable

from muse_pipeline.search.app import create_app, run_app
from muse_pipeline.search.query import Searcher


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Callable[[Searcher], None] | None = None) -> None:
    """Load the index and CLIP once, call `on_ready(searcher)`, then answer requests until interrupted."""
    searcher = Searcher(index_path, device=device, pretrained=pretrained)
    app = create_app(searcher)
    if on_ready is not None:
        on_ready(searcher)
    run_app(app, host=host, port=port)
