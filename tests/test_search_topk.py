"""muse_pipeline.search.topk: the exact reference against brute force, the fast paths against the
reference (ties included), and approximate indexes against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from muse_pipeline.search.index_format import VideoIndex, write_index
from muse_pipeline.search.topk import (
    TARGET_RECALL,
    exact_topk_fast,
    exact_topk_ref,
    exact_topk_single,
    plan_search,
    recall_at_k,
)


def _brute_topk(emb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = emb.astype(np.float64) @ q.astype(np.float64)
    return np.lexsort((np.arange(len(s)), -s))[:k]


def test_exact_topk_ref_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(1000, 16)).astype(np.float32)
    emb[10] = emb[20]  # a tie: the lower row comes first
    q = rng.normal(size=(7, 16)).astype(np.float32)
    q[0] = emb[10]
    scores, rows = exact_topk_ref(emb, q, 12)
    for i in range(len(q)):
        want = _brute_topk(emb, q[i], 12)
        assert rows[i].tolist() == want.tolist()
        np.testing.assert_allclose(scores[i], emb[want] @ q[i], rtol=1e-5)
    assert rows[0][:2].tolist() == [10, 20]
    assert exact_topk_ref(emb[:5], q, 12)[1].shape == (7, 5)


def test_fast_paths_agree_with_the_reference_ties_included() -> None:
    # Small integers: every inner product is exact in float32 whatever the BLAS summation order, so
    # equal rows tie exactly (with real-valued rows, BLAS may round two equal rows differently).
    rng = np.random.default_rng(4)
    emb = rng.integers(-4, 5, size=(600, 16)).astype(np.float32)
    emb[100:130] = emb[99]  # 31 equal rows: the k-th place (k = 12) falls inside a tie
    q = rng.integers(-4, 5, size=(6, 16)).astype(np.float32)
    q[1] = 4 * emb[99]  # rows 99..129 score highest
    ref_s, ref_r = exact_topk_ref(emb, q, 12)
    assert ref_r[1].tolist() == [99, *range(100, 111)]  # the lowest rows of the tie
    for i in range(len(q)):
        assert ref_r[i].tolist() == _brute_topk(emb, q[i], 12).tolist()
        one_s, one_r = exact_topk_single(emb, q[i], 12)  # the one-query path: the same rows, ties included
        assert one_r[0].tolist() == ref_r[i].tolist()
        np.testing.assert_array_equal(one_s[0], ref_s[i])
    assert exact_topk_single(emb[:5], q[0], 12)[1].shape == (1, 5)
    # faiss's brute force: the same scores; among exactly tied rows it may pick others.
    fast_s, fast_r = exact_topk_fast(emb, q, 12)
    np.testing.assert_array_equal(fast_s, ref_s)
    for i in range(len(q)):
        s = emb @ q[i]
        np.testing.assert_array_equal(s[fast_r[i]], fast_s[i])  # each row has the score it claims
        assert len(set(fast_r[i].tolist())) == 12


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat"])
def test_approximate_index_recorded_and_close_to_exact(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    emb = centers[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    queries = emb[rng.choice(4000, 64, replace=False)] + 0.1 * rng.normal(size=(64, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    plan = plan_search(4000, approx_threshold=1000, ivf_threshold=3000 if kind == "ivf-flat" else 10_000)
    assert plan.kind == kind
    out = write_index(tmp_path / "ann", emb, ids=[f"v{i}" for i in range(4000)],
                      paths=[f"/x/{i}.mp4" for i in range(4000)], clip={"model": "m", "weights_id": "w"},
                      words=8, plan=plan, tuning_queries=queries[:32])
    meta = json.loads((out / "index.json").read_text())
    assert meta["search"]["kind"] == kind and (out / "ann.faiss").is_file()
    param = "efSearch" if kind == "hnsw" else "nprobe"
    params = meta["search"]["params"]
    assert params[param] >= 1 and params["recall_at_10"] >= TARGET_RECALL and params["tuning_queries"] == 32
    index = VideoIndex(out)
    _, rows = index.search_vectors(queries, 10)
    truth = np.stack([_brute_topk(emb, q, 10) for q in queries])
    assert recall_at_k(rows, truth) >= 0.9
    _, exact_rows = index.search_vectors(queries, 10, exact=True)
    assert recall_at_k(exact_rows, truth) == 1.0
    assert plan_search(4000, exact=True, approx_threshold=1000).kind == "exact"


def test_recall_at_k_counts_shared_rows() -> None:
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]])) == pytest.approx(2 / 6)
