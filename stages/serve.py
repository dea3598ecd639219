"""`muse serve`: a local search service over one index (FastAPI app, run by uvicorn).

The index and the CLIP text tower are loaded once, when the app is created. Routes:

- `GET /search?q=TEXT&k=K` -> {"query", "k", "hits": [{rank, id, path, start, end, score, caption,
  video_url, thumb_url}]}; `POST /search` with {"queries": [...], "k": K} -> {"k", "results":
  [{"query", "hits"}]} (one CLIP forward for the whole batch).
- `GET /` a page with a search box and a grid of hits (thumbnail strip, score, id, caption); a click
  plays the clip from its start in a `<video>` element. `/app.js`, `/app.css` are its assets.
- `GET /video?id=ID` the indexed file of that video id (HTTP range requests, for seeking) and
  `GET /thumb?id=ID` a JPEG strip of frames from its clip window. Only files the index names are
  served, looked up by id: nothing in a request is ever used as a path.
- `GET /info` what the index is (size, search kind, CLIP weights, the random-init note).

Bounds: a query has at most MAX_QUERY_CHARS characters, k is in [1, MAX_K], a batch has at most
MAX_BATCH queries. The page builds every element with textContent / attributes (never innerHTML of
data) and the responses carry a Content-Security-Policy that allows only this server's own script.
"""

from __future__ import annotations

import html
import io
import logging
import mimetypes
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from muse_pipeline.stages.search import MAX_QUERY_CHARS, RANDOM_INIT_NOTE, Searcher, thumbnail_strip

log = logging.getLogger(__name__)

MAX_K = 100
MAX_BATCH = 64
THUMB_FRAMES = 4
THUMB_HEIGHT = 96
THUMB_CACHE = 512  # strips kept in memory (~10 KB each)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _ThumbCache:
    """A small thread-safe LRU of JPEG strips by row."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: int) -> bytes | None:
        with self._lock:
            if row in self._items:
                self._items.move_to_end(row)
                return self._items[row]
            return None

    def put(self, row: int, value: bytes) -> None:
        with self._lock:
            self._items[row] = value
            self._items.move_to_end(row)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _strip_jpeg(path: str, start: float | None, end: float | None) -> bytes:
    """One JPEG: THUMB_FRAMES frames of [start, end) side by side."""
    from PIL import Image

    tiles = [Image.open(io.BytesIO(j)) for j in thumbnail_strip(path, THUMB_FRAMES, THUMB_HEIGHT, start, end)]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), THUMB_HEIGHT), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 4
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def create_app(searcher: Searcher):
    """The FastAPI app of one loaded Searcher (index + query encoder)."""
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    from muse_pipeline.errors import UserError

    index = searcher.index
    thumbs = _ThumbCache(THUMB_CACHE)
    note = RANDOM_INIT_NOTE if index.random_init else ""
    app = FastAPI(title="muse search", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def with_urls(hit: dict[str, Any]) -> dict[str, Any]:
        ref = quote(hit["id"], safe="")
        return {**hit, "video_url": f"/video?id={ref}", "thumb_url": f"/thumb?id={ref}"}

    def run(queries: list[str], k: int) -> list[list[dict[str, Any]]]:
        try:
            results = searcher.search(queries, k)
        except UserError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return [[with_urls(h) for h in hits] for hits in results]

    @app.get("/search")
    def search_get(
        q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="query text"),
        k: int = Query(10, ge=1, le=MAX_K, description="number of hits"),
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        hits = run([q], k)[0]
        return {"query": q, "k": k, "hits": hits, "ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.post("/search")
    def search_post(
        queries: list[str] = Body(..., embed=True, min_length=1, max_length=MAX_BATCH),
        k: int = Body(10, embed=True, ge=1, le=MAX_K),
    ) -> dict[str, Any]:
        for q in queries:
            if len(q) > MAX_QUERY_CHARS:
                raise HTTPException(status_code=422, detail=f"a query has {len(q)} characters; "
                                    f"at most {MAX_QUERY_CHARS} are allowed")
        t0 = time.perf_counter()
        results = run(queries, k)
        return {"k": k, "results": [{"query": q, "hits": h} for q, h in zip(queries, results, strict=True)],
                "ms": round(1000 * (time.perf_counter() - t0), 2)}

    def row_of(video_id: str) -> int:
        row = index.row_of(video_id)
        if row is None:
            raise HTTPException(status_code=404, detail="no such video in the index")
        return row

    @app.get("/video")
    def video(id: str = Query(..., max_length=4096)) -> Response:  # noqa: A002 - the API's name
        path = index.media_path(row_of(id))
        if not path.is_file():
            raise HTTPException(status_code=404, detail="the indexed file of this video is missing")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type)  # answers Range requests (206)

    @app.get("/thumb")
    def thumb(id: str = Query(..., max_length=4096)) -> Response:  # noqa: A002
        row = row_of(id)
        data = thumbs.get(row)
        if data is None:
            hit = index.hit(row, 0.0, 0)
            try:
                data = _strip_jpeg(str(index.media_path(row)), hit["start"] or None, hit["end"])
            except Exception as exc:  # an undecodable file has no thumbnail, the page shows the reason
                log.warning("no thumbnail for %s: %s", id, exc)
                raise HTTPException(status_code=404, detail="no thumbnail: the video cannot be decoded") from None
            thumbs.put(row, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/info")
    def info() -> dict[str, Any]:
        meta = index.meta
        return {
            "n_videos": len(index), "dim": meta["dim"], "search": meta["search"],
            "clip": {"model": meta["clip"]["model"], "weights_id": meta["clip"]["weights_id"]},
            "head": meta.get("head"), "random_init": index.random_init, "note": note or None,
            "max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K, "max_batch": MAX_BATCH,
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        meta = index.meta
        facts = (f"{len(index)} videos · {meta.get('head') or 'head'} · CLIP {meta['clip']['model']} "
                 f"({meta['clip']['weights_id'][:16]}) · search {meta['search']['kind']}")
        body = (_PAGE.replace("{{FACTS}}", html.escape(facts))
                .replace("{{NOTE}}", f'<p class="note" id="note">{html.escape(note)}</p>' if note else "")
                .replace("{{MAXLEN}}", str(MAX_QUERY_CHARS)).replace("{{MAXK}}", str(MAX_K)))
        return HTMLResponse(body)

    @app.get("/app.js")
    def app_js() -> Response:
        return Response(_JS, media_type="text/javascript")

    @app.get("/app.css")
    def app_css() -> Response:
        return Response(_CSS, media_type="text/css")

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8080, device: str = "cpu",
          pretrained: str | None = None, on_ready: Any = None) -> None:
    """Load the index and CLIP once, then answer requests until interrupted."""
    import uvicorn

    searcher = Searcher(index_path, device=device, pretrained=pretrained)
    app = create_app(searcher)
    if on_ready is not None:
        on_ready(searcher)
    uvicorn.run(app, host=host, port=port, log_level="warning")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>muse search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/app.css"></head>
<body>
<header><h1>muse search</h1><p class="facts">{{FACTS}}</p></header>
{{NOTE}}
<form id="search-form" role="search">
  <input id="q" name="q" type="search" maxlength="{{MAXLEN}}" required autofocus
         placeholder="describe a video, e.g. a red circle moves from left to right">
  <label>hits <input id="k" name="k" type="number" min="1" max="{{MAXK}}" value="12"></label>
  <button type="submit">Search</button>
</form>
<p id="status" aria-live="polite"></p>
<section id="player" hidden>
  <video id="video" controls muted playsinline preload="metadata"></video>
  <p id="now-playing"></p>
</section>
<main id="grid"></main>
<script src="/app.js"></script>
</body></html>
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; background: #f6f6f6; color: #222; }
header h1 { margin: 0; } .facts { color: #666; margin-top: 0.2em; }
.note { background: #fff4d6; border: 1px solid #e0c060; padding: 0.6em; border-radius: 6px; }
form { display: flex; gap: 0.6em; align-items: center; margin: 1em 0; }
#q { flex: 1; font-size: 1.1em; padding: 0.4em; } #k { width: 4em; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 0.8em; }
.hit { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; cursor: pointer; }
.hit:hover, .hit:focus { border-color: #3b7ddd; outline: none; }
.hit img { max-width: 100%; height: auto; display: block; border-radius: 3px; background: #eee; min-height: 40px; }
.meta { margin-top: 0.3em; } .score { font-weight: bold; } .id { font-family: monospace; }
.caption { color: #444; font-style: italic; } .err { color: #a00; }
#player { margin-bottom: 1em; } #video { max-width: 480px; max-height: 320px; width: 100%; background: black; }
"""

# Every value from the server goes in through textContent or a URL attribute built by the server
# from an id (encodeURIComponent-equivalent): no innerHTML anywhere.
_JS = """
'use strict';
const form = document.getElementById('search-form');
const grid = document.getElementById('grid');
const statusLine = document.getElementById('status');
const player = document.getElementById('player');
const video = document.getElementById('video');
const nowPlaying = document.getElementById('now-playing');
let clipEnd = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function seconds(v) { return v === null || v === undefined ? '?' : Number(v).toFixed(1) + ' s'; }

function play(hit) {
  player.hidden = false;
  clipEnd = hit.end;
  nowPlaying.textContent = hit.id + ' from ' + seconds(hit.start) + (hit.caption ? ': ' + hit.caption : '');
  video.dataset.id = hit.id;
  video.addEventListener('loadedmetadata', () => {
    video.currentTime = hit.start || 0;
    video.play().catch((err) => { statusLine.textContent = 'cannot play: ' + err.message; });
  }, { once: true });
  video.src = hit.video_url;
  video.load();
  player.scrollIntoView({ block: 'nearest' });
}

video.addEventListener('timeupdate', () => {
  if (clipEnd !== null && video.currentTime >= clipEnd) video.pause();
});
video.addEventListener('error', () => { statusLine.textContent = 'this video cannot be played by the browser'; });

function render(data) {
  grid.replaceChildren();
  statusLine.textContent = data.hits.length + ' hits for "' + data.query + '" in ' + data.ms + ' ms';
  for (const hit of data.hits) {
    const card = el('article', 'hit');
    card.tabIndex = 0;
    card.dataset.id = hit.id;
    const img = el('img');
    img.src = hit.thumb_url;
    img.alt = 'frames of ' + hit.id;
    img.loading = 'lazy';
    img.addEventListener('error', () => img.replaceWith(el('p', 'err', 'no preview')));
    const meta = el('div', 'meta');
    meta.append(el('span', 'rank', hit.rank + '. '), el('span', 'score', hit.score.toFixed(4)), ' ',
                el('span', 'id', hit.id), ' ', el('span', 'window', '[' + seconds(hit.start) + ' - ' + seconds(hit.end) + ']'));
    card.append(img, meta);
    if (hit.caption) card.append(el('div', 'caption', hit.caption));
    card.addEventListener('click', () => play(hit));
    card.addEventListener('keydown', (e) => { if (e.key === 'Enter') play(hit); });
    grid.append(card);
  }
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const q = document.getElementById('q').value;
  const k = document.getElementById('k').value || '12';
  statusLine.textContent = 'searching...';
  try {
    const response = await fetch('/search?' + new URLSearchParams({ q: q, k: k }));
    const data = await response.json();
    if (!response.ok) {
      const detail = typeof data.detail === 'string' ? data.detail : JSON.stringify(data.detail);
      statusLine.textContent = 'error: ' + detail;
      return;
    }
    render(data);
  } catch (err) {
    statusLine.textContent = 'error: ' + err.message;
  }
});
"""
