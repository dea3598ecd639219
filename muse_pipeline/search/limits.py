"""Bounds of a search request and the hit-count default, shared by the CLI, the server and its page.

- `DEFAULT_K`: hits per query when none is asked for (`muse search`, `GET/POST /search`, the page).
- `MAX_K`: the most hits one server request may ask for; `MAX_BATCH`: queries in one `POST /search`.
- `MAX_QUERY_CHARS`: the longest query text, anywhere.
- `check_k(k, name)` / `check_query(text)`: the one check of each; a violation is an `InputError`.
"""

from __future__ import annotations

from muse_pipeline.errors import InputError

DEFAULT_K = 10
MAX_K = 100
MAX_BATCH = 64
MAX_QUERY_CHARS = 1000


def check_k(k: int, name: str = "top_k") -> int:
    """`k` itself if it is a valid hit count (>= 1); `name` is how the caller's user knows it."""
    if k < 1:
        raise InputError(f"{name} must be >= 1, got {k}")
    return k


def check_query(text: str) -> str:
    """The query without surrounding blanks; an empty or over-long query is an InputError."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("the query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise InputError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS} are allowed")
    return text.strip()
