"""`muse serve`: load an index's current generation and its CLIP text tower once, then answer the
search app's requests, switching to each new generation `muse index` publishes (no restart).

The app (routes, page, bounds) is `muse_pipeline.search.app`; keeping the index fresh is
`muse_pipeline.search.live.LiveSearcher`; this stage only wires them and runs the app. A missing or
damaged index fails here, before anything is bound, as one `error:` line.
"""

from __future__ import annotations

from collections.abc import Callable

from muse_pipeline.search.app import create_app, run_app
from muse_pipeline.search.live import LiveSearcher


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Callable[[LiveSearcher], None] | None = None) -> None:
    """Load the index and CLIP once, call `on_ready(live)`, then answer requests until interrupted."""
    live = LiveSearcher(index_path, device=device, pretrained=pretrained)
    app = create_app(live)
    if on_ready is not None:
        on_ready(live)
    run_app(app, host=host, port=port)
