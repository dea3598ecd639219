"""The searcher a server answers with: the current generation of an index root, kept fresh.

`LiveSearcher.current()` returns the Searcher to answer one request with. At most once every
CHECK_SECONDS (on a request, no timer thread) it reads the root's CURRENT (`current_generation`,
one small file); when that names another generation it loads it in a background thread (reading all
its arrays into memory, reusing the loaded CLIP text tower when the weights are the same) and then
swaps one reference. A request holds the Searcher it started with until it finishes, so a request in
flight during a swap answers wholly from the old generation, and no request waits for a load.

A generation that fails to load (damaged, removed before it was read) is logged and skipped; the
server keeps answering from the generation it has, and tries again when CURRENT names another one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from muse_pipeline.errors import UserError
from muse_pipeline.search.generations import current_generation
from muse_pipeline.search.query import Searcher

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0


class LiveSearcher:
    """The current Searcher of the index at `root` (see the module docstring).

    searcher: an already loaded Searcher of `root` (default: load it now, errors raised here);
    clock: seconds, monotonic (tests pass their own)."""

    def __init__(self, root: Path | str, device: str = "cpu", pretrained: str | None = None,
                 searcher: Searcher | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self.device, self.pretrained = device, pretrained
        self._searcher = searcher if searcher is not None else Searcher(self.root, device=device, pretrained=pretrained)
        self._clock = clock
        self._checked = clock()
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._failed: str | None = None  # the generation whose load failed (not retried)

    @property
    def generation(self) -> str:
        return self._searcher.index.generation

    def current(self) -> Searcher:
        """The Searcher to answer one request with (starts a background load when CURRENT changed)."""
        now = self._clock()
        if now - self._checked >= CHECK_SECONDS:
            with self._lock:
                if now - self._checked >= CHECK_SECONDS and self._loader is None:
                    self._checked = now
                    self._maybe_load()
        return self._searcher

    def _maybe_load(self) -> None:
        try:
            name = current_generation(self.root)
        except UserError as exc:  # the root is being replaced or was damaged: keep what we have
            log.warning("index %s: %s; still answering from %s", self.root, exc, self.generation)
            return
        if name in (self.generation, self._failed):
            return
        self._loader = threading.Thread(target=self._load, args=(name,), name="muse-index-loader", daemon=True)
        self._loader.start()

    def _load(self, name: str) -> None:
        try:
            fresh = Searcher(self.root, device=self.device, pretrained=self.pretrained, reuse=self._searcher)
            self._searcher = fresh  # one reference assignment: requests see the old or the new, whole
            log.info("index %s: now answering from %s (%d videos)", self.root, fresh.index.generation,
                     len(fresh.index))
        except Exception as exc:  # any failure keeps the old generation serving; said once in the log
            self._failed = name
            log.warning("index %s: cannot load %s (%s); still answering from %s", self.root, name, exc,
                        self.generation)
        finally:
            with self._lock:
                self._loader = None

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no load is running (tests, benchmarks); True if none is."""
        loader = self._loader
        if loader is not None:
            loader.join(timeout)
        return self._loader is None
