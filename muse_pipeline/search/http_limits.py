"""What the search server accepts over HTTP: its connection and request limits, what a query's text
may be, and the one-line 422 answer of a request that does not fit the API.

- `HttpLimits`: the server's bounds (request head and body sizes, time allowed to send them, idle
  keep-alive, connection cap, search workers and queue, listen backlog). Enforced by
  `muse_pipeline.search.asgi_guards` (body, queue, Host) and `muse_pipeline.search.server` (times,
  connections, head size).
- `query_text_problem(text)`: why `text` is not a query the server can answer (a lone surrogate,
  no visible character), or None. `QueryText`: a `str` field type that answers 422 with that reason
  (and for an empty or over-long text).
- `install_error_handlers(app)`: 422 answers `{"detail": "<one line>"}` naming the field and the
  rule, never the input (a 50 MB input must not come back, a NaN must not fail the JSON encoder).
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Any

from muse_pipeline.search.limits import MAX_QUERY_CHARS

MAX_DETAIL_CHARS = 300  # a 422 reason is one short line


def default_search_workers() -> int:
    """Searches run at once: half the cores (a CLIP forward uses several torch threads), 2 to 4 (two
    overlap one search's Python work with another's torch work)."""
    return max(2, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of the search server; every one is enforced before the request reaches a route.

    - `max_body_bytes`: a request body longer than this is answered 413 (Content-Length checked before
      any of the body is read, a chunked body counted while read). 1 MiB holds MAX_BATCH queries of
      MAX_QUERY_CHARS characters even when every character is JSON-escaped.
    - `max_head_bytes`: request line + headers; longer is a 400 (h11's incomplete-event bound).
    - `header_timeout_s`: time from a connection's accept, or from the end of its previous answer, to a
      complete request head; then the connection is closed (after a 408 when part of a head came).
    - `body_timeout_s`: time from a complete head to the end of its body; then the connection is closed.
    - `keep_alive_s`: an idle keep-alive connection is closed after this.
    - `max_connections`: open connections; a new one beyond evicts the oldest connection that is
      waiting for a request head, or is answered 503 when every connection has a request in flight.
    - `search_workers`: requests to the work routes (`WORK_PATHS`) answered at once; the others wait
      in FIFO order. `max_queued`: waiting requests beyond which a work request is answered 503.
    - `backlog`: the listen queue of the bound socket (the kernel caps it at net.core.somaxconn).
    """

    max_body_bytes: int = 1 << 20
    max_head_bytes: int = 32 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000
    search_workers: int = 0  # 0 = default_search_workers()
    max_queued: int = 256
    backlog: int = 2048

    def workers(self) -> int:
        """`search_workers`, or the default for this machine when it is 0."""
        return self.search_workers or default_search_workers()


def query_text_problem(text: str) -> str | None:
    """Why `text` cannot be searched for, or None.

    A lone surrogate (`"\\ud800"`, valid in JSON) is not Unicode text: it cannot be tokenised nor
    written back as UTF-8. A text whose every character is a control or format character (NUL, ...)
    has nothing to search for. Blank text is left to `limits.check_query` (its "empty query" answer).
    """
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return "the query contains a lone surrogate (not valid Unicode); send UTF-8 text"
    if text.strip() and all(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in text):
        return "the query has only control characters; send visible text"
    return None


def _check_query_text(text: str) -> str:
    problem = query_text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


class QueryText(str):
    """A query's text as a request field: 1 to MAX_QUERY_CHARS characters and no `query_text_problem`,
    else the request is a 422 naming the rule (validated as a plain `str`, then checked)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        text = core_schema.str_schema(min_length=1, max_length=MAX_QUERY_CHARS)
        return core_schema.no_info_after_validator_function(_check_query_text, text)


def _location(loc: Any) -> str:
    """`("body", "queries", 3)` -> `queries[3]`; the part of the request an error is about."""
    parts = [str(p)[:40] for p in loc if p not in ("body", "query")] if isinstance(loc, (list, tuple)) else []
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "request"


def validation_detail(errors: list[dict[str, Any]]) -> str:
    """One line naming each failing field and its rule, at most MAX_DETAIL_CHARS; never the input."""
    reasons = []
    for err in errors:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        reasons.append(f"{_location(err.get('loc'))}: {msg}")
    line = "; ".join(dict.fromkeys(reasons)).replace("\n", " ") or "the request does not fit the API"
    return line if len(line) <= MAX_DETAIL_CHARS else line[: MAX_DETAIL_CHARS - 3] + "..."


def install_error_handlers(app) -> None:
    """Make `app` (FastAPI) answer a request that fails validation with 422 `{"detail": one line}`."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(list(exc.errors()))}, status_code=422)
