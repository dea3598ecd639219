"""Top-k by inner product over unit rows: exact (a reference and two fast paths) and approximate (faiss).

Shapes: emb [N, D] float32 (may be memory-mapped), queries [Q, D]; every function returns
(scores [Q, k'], rows [Q, k'] int64) with k' = min(k, N), best first.

- `exact_topk_ref`: the reference, every score then a full sort; ties go to the lower row.
- `exact_topk_single` (one query: E @ q + partition) returns the reference's rows, ties included;
  `exact_topk_fast` (faiss's brute-force kNN, for batches) returns the same scores, exactly tied rows
  possibly in another order. tests/test_search_topk.py checks both against the reference.
- `plan_search(n)`: which structure an index of n rows gets (exact below APPROX_THRESHOLD; HNSW, then
  IVF-Flat from IVF_THRESHOLD); `build_ann` builds it, `tune_ann` picks its search-time parameter
  (efSearch / nprobe, doubling) as the smallest reaching TARGET_RECALL recall@k against exact, and
  records it as {param: value, f"recall_at_{k}": recall, "tuning_queries": Q}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from muse_pipeline.errors import UserError

# Exact search scores N x D multiply-adds per query, cheap enough below this many rows; above it an
# approximate faiss index is built (BENCHMARKS.md, benchmarks/search.py).
APPROX_THRESHOLD = 100_000
# HNSW needs no training and has the best recall per query time, but its build cost grows fastest;
# IVF-Flat builds in a fraction of the time at millions of rows.
IVF_THRESHOLD = 400_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
TARGET_RECALL = 0.95
TUNING_QUERIES = 256
TUNING_K = 10  # the k of the recall that tuning reaches (recorded as "recall_at_10")


@dataclass(frozen=True)
class SearchPlan:
    """Which search structure an index of n rows gets. kind: exact | hnsw | ivf-flat; params: its build
    parameters (HNSW: M, efConstruction; IVF-Flat: nlist)."""

    kind: str
    params: dict[str, int]


def plan_search(n: int, *, exact: bool = False, approx_threshold: int = APPROX_THRESHOLD,
                ivf_threshold: int = IVF_THRESHOLD) -> SearchPlan:
    if exact or n < approx_threshold:
        return SearchPlan("exact", {})
    if n < ivf_threshold:
        return SearchPlan("hnsw", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
    # faiss's guideline: nlist ~ 4 sqrt(N) .. 16 sqrt(N) lists; 4 sqrt(N) keeps training cheap.
    return SearchPlan("ivf-flat", {"nlist": int(4 * round(math.sqrt(n)))})


def import_faiss():
    """The faiss module; its absence is a one-line UserError (faiss-cpu is a dependency)."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise UserError(f"faiss is not installed ({exc}); pip install faiss-cpu") from None
    return faiss


def build_ann(emb: np.ndarray, plan: SearchPlan, seed: int = 0):
    """A faiss inner-product index over emb [N, D] float32 (ids = row numbers)."""
    faiss = import_faiss()
    d = emb.shape[1]
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, plan.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["efConstruction"]
    elif plan.kind == "ivf-flat":
        nlist = min(plan.params["nlist"], len(emb))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample: faiss uses at most 256 points per list anyway.
        rng = np.random.default_rng(seed)
        sample = emb[np.sort(rng.choice(len(emb), size=min(len(emb), 64 * nlist), replace=False))]
        index.train(np.ascontiguousarray(sample))
    else:
        raise ValueError(f"no approximate index for kind {plan.kind!r}")
    index.add(np.ascontiguousarray(emb))
    return index


def set_search_param(index, kind: str, value: int) -> None:
    """Set the search-time parameter of a faiss index of `kind` (hnsw: efSearch, ivf-flat: nprobe)."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(value)
    elif kind == "ivf-flat":
        index.nprobe = int(value)


def exact_topk_ref(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every score (float32 Q @ E.T, a [Q, N] temporary), then a full sort of each
    query's row by (-score, row), so that ties go to the lower row. Slow; for tests."""
    n = emb.shape[0]
    k = min(k, n)
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    scores = q @ np.asarray(emb, dtype=np.float32).T
    rows = np.stack([np.lexsort((np.arange(n), -s))[:k] for s in scores]).astype(np.int64)
    return np.take_along_axis(scores, rows, 1), rows


def exact_topk_single(emb: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`exact_topk_ref` for one query [D] or [1, D], in one pass: E @ q, the k-th largest score by
    partition, then the (few) rows at or above it sorted by (-score, row). Returns ([1, k'], [1, k'])."""
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    scores = np.asarray(emb, dtype=np.float32) @ q
    n = len(scores)
    k = min(k, n)
    kth = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero(scores >= kth)
    rows = cand[np.lexsort((cand, -scores[cand]))][:k]
    return scores[rows][None, :], rows.astype(np.int64)[None, :]


def exact_topk_fast(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`exact_topk_ref`'s answer (exactly tied rows possibly in another order) from faiss's brute-force
    kNN: BLAS blocks and a heap per query, the fast path for batches."""
    faiss = import_faiss()
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    e = emb if emb.dtype == np.float32 and emb.flags["C_CONTIGUOUS"] else np.ascontiguousarray(emb, np.float32)
    scores, rows = faiss.knn(q, e, min(k, len(e)), metric=faiss.METRIC_INNER_PRODUCT)
    return scores, rows.astype(np.int64)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k also returned."""
    k = exact_rows.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows, strict=True)]
    return float(np.mean(hits) / k)


def tune_ann(index, kind: str, emb: np.ndarray, queries: np.ndarray, k: int = TUNING_K,
             target: float = TARGET_RECALL) -> dict[str, Any]:
    """Smallest search parameter (efSearch or nprobe, doubling) whose recall@k against exact >= target;
    returns {param: value, f"recall_at_{k}": recall (4 decimals), "tuning_queries": len(queries)}."""
    _, truth = exact_topk_fast(emb, queries, k)
    name = "efSearch" if kind == "hnsw" else "nprobe"
    limit = 4096 if kind == "hnsw" else int(index.nlist)
    value = 16 if kind == "hnsw" else 1
    while True:
        set_search_param(index, kind, value)
        _, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        recall = recall_at_k(rows, truth)
        if recall >= target or value >= limit:
            return {name: int(value), f"recall_at_{k}": round(recall, 4), "tuning_queries": int(len(queries))}
        value = min(2 * value, limit)
