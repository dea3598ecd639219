"""Updating an index from its cache: which vectors are copied, which embedded, and what faiss gets.

An index generation records the cache row of each of its rows (`cache_rows.npy`). Cache rows are
never rewritten once cached (extraction appends a changed file's new rows and retires the old ones,
done == 3), so a row of the old generation whose cache row is still cached (done == 1) under the same
id holds the same vector: it is copied, not recomputed. The new generation lists the kept rows in
their old order, then the new rows by cache row, so an approximate index over the old rows stays
valid for them and only needs the new ones added.

An update is allowed only from the same source (`index_identity`: the run and its weights, or
zero-shot; the cache folder's path and the fingerprint keys that decide its features, FEATURE_KEYS;
the CLIP model and weights). Anything else is a full build under --overwrite. A cache re-extracted
from scratch at the same path with the same settings is the same source: a row with the same id at
the same cache row is the same file embedded the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.search.topk import SearchPlan, import_faiss

ZERO_SHOT = "zero-shot-meanP"
# An approximate index is updated by adding rows when nothing was removed (neither HNSW nor the
# stored IVF ids can drop rows without renumbering) and the new rows are at most this fraction of
# the kept ones (IVF centroids trained on the old rows stay representative); otherwise rebuilt.
MAX_ANN_GROWTH = 0.5


# The cache fingerprint keys that decide what a row's tokens are (not the annotation checksum, which
# changes whenever a library gains or loses a file).
FEATURE_KEYS = ("dataset", "model", "weights", "image_size", "num_tokens", "dim", "frames", "sampling")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_identity(cache_path: Path, fingerprint: dict[str, Any]) -> dict[str, str]:
    """The cache's identity for updates: its folder (hashed, so index.json points nowhere) and its
    feature settings (FEATURE_KEYS of its fingerprint, hashed)."""
    return {"folder": _digest(str(Path(cache_path).resolve())),
            "features": _digest({k: fingerprint.get(k) for k in FEATURE_KEYS})}


def run_identity(run_dir: Path, which: str) -> dict[str, Any]:
    """A run's identity: its folder (hashed, so index.json points nowhere) and its weights' sha256."""
    weights = run_dir / f"{which}.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"folder": _digest(str(run_dir.resolve())), "which": which, "weights_sha256": digest}


def index_identity(run: dict[str, Any] | None, cache: dict[str, str], clip: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for `muse index` to update an index rather than rebuild it (cache:
    `cache_identity`)."""
    return {"run": run if run is not None else ZERO_SHOT, "cache": cache,
            "clip": {"model": clip["model"], "weights_id": clip["weights_id"]}}


def identity_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Names of the identity parts that differ ("run", "cache", "clip"); all of them for no record."""
    if not old:
        return list(new)
    return [key for key in new if old.get(key) != new[key]]


@dataclass(frozen=True)
class RowPlan:
    """keep [K]: rows of the old generation whose vectors are copied, in old order; keep_cache_rows [K]
    their cache rows; new_cache_rows [A]: cache rows to embed, ascending; removed: old rows dropped."""

    keep: np.ndarray
    keep_cache_rows: np.ndarray
    new_cache_rows: np.ndarray
    removed: int

    @property
    def cache_rows(self) -> np.ndarray:
        """[K + A] the cache row of each row of the new generation."""
        return np.concatenate([self.keep_cache_rows, self.new_cache_rows]).astype(np.int64)


def plan_rows(old_cache_rows: np.ndarray | None, old_ids: list[str], cached_rows: np.ndarray,
              cache_ids: list[str]) -> RowPlan:
    """Split the cache's cached rows (`cached_rows`, done == 1, with `cache_ids` = every cache row's id)
    into rows copied from the old generation and rows to embed. `old_cache_rows` None (an index made
    before generations recorded them): nothing is kept."""
    cached = np.asarray(cached_rows, dtype=np.int64)
    if old_cache_rows is None:
        return RowPlan(np.zeros(0, np.int64), np.zeros(0, np.int64), np.sort(cached), len(old_ids))
    alive = set(cached.tolist())
    keep = [r for r, (c, vid) in enumerate(zip(old_cache_rows.tolist(), old_ids, strict=True))
            if c in alive and str(cache_ids[c]) == vid]
    keep_arr = np.asarray(keep, dtype=np.int64)
    keep_cache = np.asarray(old_cache_rows, dtype=np.int64)[keep_arr] if keep else np.zeros(0, np.int64)
    new = np.setdiff1d(cached, keep_cache)
    return RowPlan(keep_arr, keep_cache, new, len(old_ids) - len(keep))


def ann_choice(old_kind: str | None, has_old_ann: bool, plan: SearchPlan, rows: RowPlan) -> str:
    """What the new generation's approximate index is: "none" (exact search), "updated" (the old one
    plus the new rows) or "rebuilt", whichever is cheaper under MAX_ANN_GROWTH (module docstring)."""
    if plan.kind == "exact":
        return "none"
    kept = len(rows.keep)
    if (old_kind == plan.kind and has_old_ann and rows.removed == 0 and kept
            and len(rows.new_cache_rows) <= MAX_ANN_GROWTH * kept):
        return "updated"
    return "rebuilt"


def extend_ann(old_ann: Any, new_rows: np.ndarray) -> Any:
    """A copy of the faiss index `old_ann` with `new_rows` [A, D] float32 added after its rows
    (the old index is left as it was: it belongs to an immutable generation)."""
    faiss = import_faiss()
    copy = faiss.deserialize_index(faiss.serialize_index(old_ann))
    if len(new_rows):
        copy.add(np.ascontiguousarray(new_rows, dtype=np.float32))
    return copy


def kept_tuning(search_params: dict[str, Any]) -> dict[str, Any]:
    """The tuned search parameters an updated approximate index keeps from the old generation's
    `index.json` search params: efSearch / nprobe, the recall_at_* it measured, its tuning_queries."""
    return {k: v for k, v in search_params.items() if k in ("efSearch", "nprobe") or k.startswith("recall_at_")
            or k == "tuning_queries"}
