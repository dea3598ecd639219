"""Text-to-video search over an index folder: one job per module.

- `limits`: query bounds and the hit-count default (MAX_QUERY_CHARS, DEFAULT_K, MAX_K, MAX_BATCH).
- `topk`: exact top-k (fast paths beside `exact_topk_ref`), the search plan, faiss build and tuning.
- `index_format`: the index folder's on-disk format (writer, reader); its docstring is the contract.
- `cache_columns`: the per-video columns an index copies from a feature cache (windows, captions, paths).
- `query`: the index's text side (CLIP source, text adapter), `QueryEncoder` and `Searcher`.
- `html`: the self-contained results page of `muse search --html`.
- `app`: the `muse serve` web app (FastAPI); the page is `static/`.
- `http_limits`, `asgi_guards`, `server`: the server's bounds, the middleware that enforces them before
  the app, and the runner (bind first, uvicorn's h11 protocol with head/body deadlines and a connection cap).

`muse_pipeline.stages.search` (build an index from a run) and `muse_pipeline.stages.serve` only
orchestrate these.
"""
