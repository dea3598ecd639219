"""Moments: how a hit's time span is written, and hits grouped per source file.

A hit (`VideoIndex.hit`) is one row of the index: a moment (start, end seconds) of its source file.
- `moment_label(start, end)`: "12.5-42.5 s" (end "?" when unknown).
- `media_fragment(start, end)`: the W3C media fragment "#t=12.5,42.5" that makes a browser's player
  start (and stop) there.
- `group_by_source(hits, limit)`: hits (best first) -> at most `limit` groups, one per source file,
  in the order of each file's best hit; a group is {rank, source, path, score (its best), missing,
  moments: [its hits, best first]}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def moment_label(start: float | None, end: float | None) -> str:
    return f"{_seconds(start or 0.0)}-{_seconds(end)} s"


def media_fragment(start: float | None, end: float | None) -> str:
    start = start or 0.0
    return f"#t={start:g}" + ("" if end is None else f",{end:g}")


def group_by_source(hits: Sequence[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for hit in hits:
        source = hit.get("source", hit["id"])
        group = groups.get(source)
        if group is None:
            if limit is not None and len(groups) >= limit:
                continue
            group = groups[source] = {"rank": len(groups) + 1, "source": source, "path": hit["path"],
                                      "score": hit["score"], "missing": hit.get("missing", False), "moments": []}
        group["moments"].append(hit)
    return list(groups.values())
