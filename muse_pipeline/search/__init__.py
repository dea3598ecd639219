"""Text-to-video search over an index folder: one job per module.

- `limits`: query bounds and the hit-count default (MAX_QUERY_CHARS, DEFAULT_K, MAX_K, MAX_BATCH).
- `topk`: exact top-k (fast paths beside `exact_topk_ref`), the search plan, faiss build and tuning.
- `index_format`: one index generation's on-disk format (writer, reader); its docstring is the contract.
- `generations`: the index root (CURRENT, immutable generation folders): publish, open the current one.
- `update`: what an index update copies, embeds, and does with faiss; when an update is allowed.
- `embedder`: which embedder an index uses (a run's head or zero-shot meanP) and its tuning queries.
- `cache_columns`: the per-video columns an index copies from a feature cache (windows, durations,
  sources, captions, paths).
- `moments`: a hit's moment as text and as a media fragment; hits grouped per source file.
- `clip_tokenizer`: CLIP's BPE tokenizer loaded without the open_clip package (`ClipTokenizer`).
- `text_encoder`: the CLIP text tower in plain torch, exported into the index root at build time
  (`export_text_encoder`, `TextEncoder.load`, `ensure_text_encoder`): queries need no open_clip.
- `query`: the index's text side (CLIP source, text adapter), `QueryEncoder` and `Searcher`.
- `live`: the server's `LiveSearcher` (a new generation picked up without a restart).
- `html`: the self-contained results page of `muse search --html`.
- `app`: the `muse serve` web app (FastAPI); the page is `static/`.
- `http_limits`, `asgi_guards`, `server`: the server's bounds, the middleware that enforces them before
  the app, and the runner (bind first, uvicorn's h11 protocol with head/body deadlines and a connection cap).

`muse_pipeline.stages.search` (build or update an index from a run or zero-shot CLIP) and `muse_pipeline.stages.serve` only
orchestrate these.
"""
