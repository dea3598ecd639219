"""The `muse serve` web app: a search page and a JSON API over an index that stays fresh (FastAPI).

The app answers from a `LiveSearcher` (`live.py`): each request takes the current Searcher once and
answers wholly from that generation; a new generation published by `muse index` is picked up without
a restart.

Routes:
- `GET /search?q=TEXT&k=K` -> {"query", "k", "generation", "hits": [{rank, id, source, path, start, end,
  score, caption, missing, video_url, thumb_url}], "ms"}; `POST /search` with {"queries": [...], "k": K}
  -> {"k", "generation", "results": [{"query", "hits"}], "ms"} (one CLIP forward for the whole batch).
  k defaults to DEFAULT_K. A hit whose file has gone is returned with `missing: true` (flagged, not
  filtered: the index still knows the moment; the page shows it greyed out and does not play it).
  `GET /search?...&group=true` adds "groups": [{rank, source, path, score, missing, moments: [hits]}],
  at most k files, each with its moments best first ("hits" is then those moments, file by file).
- `GET /health` -> {"status": "ok", "generation", "size" (rows), "model" (CLIP model)}.
- `GET /` the page (`static/index.html` with the index's facts, the random-init note and the limits
  filled in); `/app.js`, `/app.css` its assets (`static/`, served as they are). The page builds every
  element with textContent / attributes, never innerHTML of data.
- `GET /video?id=ID` the indexed file of that video id (HTTP range requests, for seeking) and
  `GET /thumb?id=ID` a JPEG strip (`strip_jpeg`, THUMB_FRAMES frames, THUMB_HEIGHT high) of its clip
  window. Only files the index names are served, looked up by id: nothing in a request is a path.
- `GET /info` what the index is (size, search kind, CLIP weights, the random-init note, the limits).

Bounds (`limits`): a query has at most MAX_QUERY_CHARS characters, k is in [1, MAX_K], a batch has
at most MAX_BATCH queries; a request outside them, or a query that is not text (`http_limits.QueryText`),
is a 422 with a one-line detail that never echoes the input; a query the searcher refuses is a 400.
Every response carries SECURITY_HEADERS (a Content-Security-Policy allowing only this server's
own script, style, images and media). The server's limits, the answers made outside the routes
(413, 421, 503, HEAD) and the runner are `server` and `asgi_guards`.
"""

from __future__ import annotations

import html
import logging
import mimetypes
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from importlib.resources import files
from typing import Any
from urllib.parse import quote

from muse_pipeline.search.http_limits import QueryText, install_error_handlers
from muse_pipeline.search.limits import DEFAULT_K, MAX_BATCH, MAX_K, MAX_QUERY_CHARS
from muse_pipeline.search.live import LiveSearcher
from muse_pipeline.search.query import RANDOM_INIT_NOTE, Searcher
from muse_pipeline.video.thumbnails import strip_jpeg

log = logging.getLogger(__name__)

THUMB_FRAMES = 4
THUMB_HEIGHT = 96
THUMB_CACHE = 512  # strips kept in memory (~10 KB each)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def static_text(name: str) -> str:
    """A file of the page shipped in `muse_pipeline/search/static/` (index.html, app.js, app.css)."""
    return files("muse_pipeline.search").joinpath("static", name).read_text(encoding="utf-8")


class _ThumbCache:
    """A small thread-safe LRU of JPEG strips by (path, start, end) (rows move between generations)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: Hashable) -> bytes | None:
        with self._lock:
            if row in self._items:
                self._items.move_to_end(row)
                return self._items[row]
            return None

    def put(self, row: Hashable, value: bytes) -> None:
        with self._lock:
            self._items[row] = value
            self._items.move_to_end(row)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def create_app(searcher: Searcher | LiveSearcher):
    """The FastAPI app over a LiveSearcher (a plain Searcher is made live over the folder it read)."""
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    from muse_pipeline.errors import UserError

    live = searcher if isinstance(searcher, LiveSearcher) else LiveSearcher(searcher.root, searcher=searcher)
    thumbs = _ThumbCache(THUMB_CACHE)
    page_template, app_js, app_css = static_text("index.html"), static_text("app.js"), static_text("app.css")
    app = FastAPI(title="muse search", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def with_urls(hit: dict[str, Any]) -> dict[str, Any]:
        ref = quote(hit["id"], safe="")
        return {**hit, "video_url": f"/video?id={ref}", "thumb_url": f"/thumb?id={ref}"}

    # A query the searcher refuses (UserError) is a 400 through `user_error` below.
    def run(current: Searcher, queries: list[str], k: int) -> list[list[dict[str, Any]]]:
        return [[with_urls(h) for h in hits] for hits in current.search(queries, k)]

    @app.get("/search")
    def search_get(
        q: QueryText = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="query text"),
        k: int = Query(DEFAULT_K, ge=1, le=MAX_K, description="number of hits (files with group)"),
        group: bool = Query(False, description="one entry per file with its moments, best first"),
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        current = live.current()
        answer: dict[str, Any] = {"query": q, "k": k, "generation": current.index.generation}
        if group:
            groups = current.search_grouped([q], k)[0]
            for g in groups:
                g["moments"] = [with_urls(m) for m in g["moments"]]
            answer["groups"] = groups
            answer["hits"] = [m for g in groups for m in g["moments"]]
        else:
            answer["hits"] = run(current, [q], k)[0]
        return {**answer, "ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.post("/search")
    def search_post(
        queries: list[QueryText] = Body(..., embed=True, min_length=1, max_length=MAX_BATCH),
        k: int = Body(DEFAULT_K, embed=True, ge=1, le=MAX_K),
    ) -> dict[str, Any]:
        for q in queries:
            if len(q) > MAX_QUERY_CHARS:
                raise HTTPException(status_code=422, detail=f"a query has {len(q)} characters; "
                                    f"at most {MAX_QUERY_CHARS} are allowed")
        t0 = time.perf_counter()
        current = live.current()
        results = run(current, queries, k)
        return {"k": k, "generation": current.index.generation,
                "results": [{"query": q, "hits": h} for q, h in zip(queries, results, strict=True)],
                "ms": round(1000 * (time.perf_counter() - t0), 2)}

    def row_of(index, video_id: str) -> int:
        row = index.row_of(video_id)
        if row is None:
            raise HTTPException(status_code=404, detail="no such video in the index")
        return row

    @app.get("/health")
    def health() -> dict[str, Any]:
        index = live.current().index
        return {"status": "ok", "generation": index.generation, "size": len(index),
                "model": index.meta["clip"]["model"]}

    @app.get("/video")
    def video(id: str = Query(..., max_length=4096)) -> Response:  # noqa: A002 - the API's name
        index = live.current().index
        path = index.media_path(row_of(index, id))
        if not path.is_file():
            raise HTTPException(status_code=404, detail="the indexed file of this video is missing")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type)  # answers Range requests (206)

    @app.get("/thumb")
    def thumb(id: str = Query(..., max_length=4096)) -> Response:  # noqa: A002
        index = live.current().index
        row = row_of(index, id)
        start, end = index.moment(row)
        media = str(index.media_path(row))
        key = (media, start, end)
        data = thumbs.get(key)
        if data is None:
            try:
                data = strip_jpeg(media, THUMB_FRAMES, THUMB_HEIGHT, start or None, end)
            except Exception as exc:  # an undecodable file has no thumbnail, the page shows the reason
                log.warning("no thumbnail for %s: %s", id, exc)
                raise HTTPException(status_code=404, detail="no thumbnail: the video cannot be decoded") from None
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/info")
    def info() -> dict[str, Any]:
        index = live.current().index
        meta = index.meta
        note = RANDOM_INIT_NOTE if index.random_init else ""
        return {
            "n_videos": len(index), "generation": index.generation, "dim": meta["dim"], "search": meta["search"],
            "clip": {"model": meta["clip"]["model"], "weights_id": meta["clip"]["weights_id"]},
            "head": meta.get("head"), "random_init": index.random_init, "note": note or None,
            "max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K, "max_batch": MAX_BATCH,
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        index = live.current().index
        meta = index.meta
        note = RANDOM_INIT_NOTE if index.random_init else ""
        facts = (f"{len(index)} moments · {meta.get('head') or 'head'} · CLIP {meta['clip']['model']} "
                 f"({meta['clip']['weights_id'][:16]}) · search {meta['search']['kind']} · {index.generation}")
        body = (page_template.replace("{{FACTS}}", html.escape(facts))
                .replace("{{NOTE}}", f'<p class="note" id="note">{html.escape(note)}</p>' if note else "")
                .replace("{{MAXLEN}}", str(MAX_QUERY_CHARS)).replace("{{MAXK}}", str(MAX_K))
                .replace("{{DEFAULTK}}", str(DEFAULT_K)))
        return HTMLResponse(body)

    @app.get("/app.js")
    def app_js_route() -> Response:
        return Response(app_js, media_type="text/javascript")

    @app.get("/app.css")
    def app_css_route() -> Response:
        return Response(app_css, media_type="text/css")

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app

