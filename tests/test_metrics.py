"""Retrieval metrics against a brute-force double loop (spec section 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from muse_pipeline.metrics import (
    dual_softmax,
    retrieval_metrics,
    retrieval_metrics_dsl,
    summarize_ranks,
    t2v_ranks,
    v2t_ranks,
)


def brute_t2v(sim: np.ndarray, c2v: np.ndarray) -> np.ndarray:
    m, n = sim.shape
    ranks = []
    for i in range(m):
        true = sim[i, c2v[i]]
        others = sum(1 for j in range(n) if j != c2v[i] and sim[i, j] >= true)
        ranks.append(1 + others)
    return np.array(ranks)


def brute_v2t(sim: np.ndarray, c2v: np.ndarray) -> np.ndarray:
    m, n = sim.shape
    ranks = []
    for v in range(n):
        mine = [c for c in range(m) if c2v[c] == v]
        if not mine:
            continue
        best = None
        for c in mine:
            others = sum(1 for c2 in range(m) if c2 != c and sim[c2, v] >= sim[c, v])
            r = 1 + others
            best = r if best is None else min(best, r)
        ranks.append(best)
    return np.array(ranks)


def brute_summary(ranks: np.ndarray) -> dict[str, float]:
    n = len(ranks)
    return {
        "R1": 100.0 * sum(r <= 1 for r in ranks) / n,
        "R5": 100.0 * sum(r <= 5 for r in ranks) / n,
        "R10": 100.0 * sum(r <= 10 for r in ranks) / n,
        "MdR": float(sorted(ranks)[n // 2])
        if n % 2
        else (sorted(ranks)[n // 2 - 1] + sorted(ranks)[n // 2]) / 2,
        "MnR": sum(ranks) / n,
    }


def assert_close_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k]), k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])
def test_square_random_with_ties_matches_brute_force(seed: int, chunk_rows: int | None) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct values -> many ties, including ties with the true item.
    sim = rng.integers(0, 4, size=(23, 23)).astype(np.float32)
    c2v = np.arange(23)
    np.testing.assert_array_equal(t2v_ranks(sim, chunk_rows=chunk_rows), brute_t2v(sim, c2v))
    np.testing.assert_array_equal(v2t_ranks(sim, chunk_rows=chunk_rows), brute_v2t(sim, c2v))
    got = retrieval_metrics(sim, chunk_rows=chunk_rows)
    assert_close_dicts(got["t2v"], brute_summary(brute_t2v(sim, c2v)))
    assert_close_dicts(got["v2t"], brute_summary(brute_v2t(sim, c2v)))


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_caption_non_square_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_videos = 11
    # Every video has >= 1 caption except video 3 (left out of v2t); captions shuffled.
    c2v = np.concatenate([np.array([v for v in range(n_videos) if v != 3]), rng.integers(0, n_videos, 30)])
    c2v = c2v[c2v != 3]
    rng.shuffle(c2v)
    sim = np.round(rng.normal(size=(len(c2v), n_videos)), 1)  # rounding keeps some ties
    for chunk in (None, 3):
        np.testing.assert_array_equal(t2v_ranks(sim, c2v, chunk), brute_t2v(sim, c2v))
        v2t = v2t_ranks(sim, c2v, chunk)
        assert len(v2t) == n_videos - 1
        np.testing.assert_array_equal(v2t, brute_v2t(sim, c2v))


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(5)
    sim = rng.normal(size=(9, 6)).astype(np.float32)
    c2v = rng.integers(0, 6, 9)
    a = retrieval_metrics(sim, c2v)
    b = retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(c2v))
    c = retrieval_metrics(torch.from_numpy(sim).half(), list(c2v))
    assert a == b
    # float16 rounding may merge near values into ties, so only check it runs and is no better.
    assert c["t2v"]["MnR"] >= a["t2v"]["MnR"] - 1e-9


def test_constant_matrix_scores_chance_not_perfect() -> None:
    n = 50
    sim = np.full((n, n), 0.3, dtype=np.float32)
    m = retrieval_metrics(sim)
    for direction in ("t2v", "v2t"):
        # every true item ties with all n - 1 others -> rank n: the worst, never 100 % R@1
        assert m[direction]["R1"] == 0.0
        assert m[direction]["R10"] == 0.0
        assert m[direction]["MdR"] == n
        assert m[direction]["MnR"] == n


def test_perfect_diagonal() -> None:
    sim = np.eye(12) + 0.01 * np.arange(12)[None, :]
    m = retrieval_metrics(sim)
    assert m["t2v"] == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}
    assert m["v2t"]["R1"] == 100.0


def test_v2t_best_caption_wins() -> None:
    # video 0 has captions 0 and 1: caption 0 ranks 4th in column 0, caption 1 ranks 1st.
    sim = np.array(
        [
            [0.1, 0.9],
            [0.8, 0.0],
            [0.5, 0.2],
            [0.6, 0.3],
        ]
    )
    c2v = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(v2t_ranks(sim, c2v), [1, 2])
    np.testing.assert_array_equal(t2v_ranks(sim, c2v), [2, 1, 2, 2])


def test_summarize_known_values() -> None:
    s = summarize_ranks([1, 2, 6, 11])
    assert s == {"R1": 25.0, "R5": 50.0, "R10": 75.0, "MdR": 4.0, "MnR": 5.0}


def test_bad_inputs_have_clear_errors() -> None:
    with pytest.raises(ValueError, match="not square"):
        retrieval_metrics(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="caption rows"):
        retrieval_metrics(np.zeros((3, 4)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((3, 4)), [0, 1, 4])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(np.zeros((2, 2)), temperature=0)


def test_dual_softmax_matches_reference() -> None:
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(5, 4))
    temp = 0.5
    ref = np.empty_like(sim)
    for i in range(5):
        for j in range(4):
            col = np.exp(sim[:, j] / temp)
            ref[i, j] = sim[i, j] * col[i] / col.sum()
    np.testing.assert_allclose(dual_softmax(sim, temp, dim=0).numpy(), ref, rtol=1e-10)
    ref_rows = np.empty_like(sim)
    for i in range(5):
        row = np.exp(sim[i, :] / temp)
        ref_rows[i] = sim[i] * row / row.sum()
    np.testing.assert_allclose(dual_softmax(sim, temp, dim=1).numpy(), ref_rows, rtol=1e-10)


def test_dsl_fixes_a_hub_video() -> None:
    # Video 0 is a "hub" that scores high with every caption; DSL's prior over captions demotes it.
    sim = np.array(
        [
            [0.90, 0.10, 0.10],
            [0.85, 0.80, 0.10],
            [0.85, 0.10, 0.80],
        ]
    )
    plain = retrieval_metrics(sim)
    dsl = retrieval_metrics_dsl(sim, temperature=0.05)
    assert plain["t2v"]["R1"] == pytest.approx(100 / 3)
    assert dsl["t2v"]["R1"] == 100.0
