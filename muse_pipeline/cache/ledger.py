"""The extraction ledger kept in a cache's root attributes (client process only writes it).

- `failures`: [{id, reason, ...extra JSON keys}], the latest failure record per video id.
- `failure_history`: older records of ids that failed again or were retried (oldest first).
- `warnings`: [{id, warning}], cached videos the decoder had to patch up; latest per id.

Each function takes the zarr group's `attrs` mapping; writes replace whole attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from muse_pipeline.cache.compat import normalise


def failures(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(f) for f in attrs.get("failures", [])]


def failure_history(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(f) for f in attrs.get("failure_history", [])]


def add_failures(attrs: MutableMapping[str, Any], records: Iterable[Mapping[str, Any]]) -> None:
    """Append {id, reason, ...} records; a newer record for an id replaces the older one, which moves to
    `failure_history`. Extra JSON-serialisable keys (e.g. the file's size and mtime) are kept."""
    new = [{**normalise(dict(f)), "id": str(f["id"]), "reason": str(f["reason"])} for f in records]
    if not new:
        return
    replaced = {f["id"] for f in new}
    old = failures(attrs)
    kept = [f for f in old if f["id"] not in replaced]
    history = failure_history(attrs) + [f for f in old if f["id"] in replaced]
    attrs.update({"failures": kept + new, "failure_history": history})


def retire_failures(attrs: MutableMapping[str, Any], ids: Iterable[str]) -> None:
    """Move the records of `ids` to `failure_history` (they are being retried)."""
    ids = {str(i) for i in ids}
    old = failures(attrs)
    moved = [f for f in old if f["id"] in ids]
    if moved:
        attrs.update({
            "failures": [f for f in old if f["id"] not in ids],
            "failure_history": failure_history(attrs) + moved,
        })


def warnings(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(w) for w in attrs.get("warnings", [])]


def add_warnings(attrs: MutableMapping[str, Any], records: Iterable[Mapping[str, Any]]) -> None:
    """Record {id, warning} entries; a newer entry for an id replaces it."""
    new = [{"id": str(w["id"]), "warning": str(w["warning"])} for w in records]
    if not new:
        return
    replaced = {w["id"] for w in new}
    attrs.update({"warnings": [w for w in warnings(attrs) if w["id"] not in replaced] + new})
