"""Search cost and approximate-search recall at 100k and 1M videos, against plain numpy `E @ q`.

Embeddings come from the project's own trained head, not random Gaussians: the run's video
embeddings of every cached video (the demo: 192 synthetic videos, muse head, D = 64) are expanded to
N rows, row i = normalise(w1 e_a + w2 e_b + w3 e_c + s g) with a, b, c three distinct source videos
drawn uniformly, (w1, w2, w3) ~ Dirichlet(1, 1, 1), g ~ N(0, I_D) and s = 0.25 / sqrt(D) (noise of
norm ~0.25 against unit sources), seed 0. Queries are the same run's text embeddings of the cache's
captions (CLIP text embedding -> the trained text adapter -> L2), i.e. the real query distribution.

For each N and each search kind (exact = faiss's brute-force kNN over the memory-mapped matrix; the approximate kind
`plan_search` picks at that N, built and tuned exactly as `muse index` does) it measures:
build (s), load (open the index folder + read the faiss file, s), one query (median of 20 single
queries, ms), 100 queries in one batch (ms), and recall@10 against exact top-10 on 200 held-out
caption queries that the tuning did not see. The baseline is plain numpy in the same process:
`E @ q` then `argpartition` for the top 10 over the in-memory [N, D] float32 matrix.

    .venv/bin/python benchmarks/search.py --run demo/runs/synthetic-muse --cache demo/cache/<store>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def source_embeddings(run: Path, cache_path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(video embeddings [V, D], caption query embeddings [M, D]) of a trained run over its cache."""
    import torch

    from muse_pipeline.evaluation.embed import embed_videos, open_cache
    from muse_pipeline.models.checkpoint import load_run
    from muse_pipeline.search.query import adapter_state, apply_text_side

    model, config = load_run(run)
    cache = open_cache(cache_path)
    rows = np.flatnonzero(np.asarray(cache.read_done()) == 1)
    videos = torch.nn.functional.normalize(embed_videos(model, cache, rows, 64, "cpu"), dim=-1).numpy()
    texts = np.flatnonzero(np.asarray(cache.read_text_done()) == 1)
    queries = apply_text_side(np.asarray(cache.read_text_embeddings(texts), np.float32), adapter_state(model))
    return videos.astype(np.float32), queries.astype(np.float32), config


def expand(src: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit rows spread over the span of the source embeddings (see the module docstring)."""
    rng = np.random.default_rng(seed)
    v, d = src.shape
    out = np.empty((n, d), np.float32)
    step = 200_000
    for lo in range(0, n, step):
        m = min(step, n - lo)
        pick = np.stack([rng.choice(v, size=3, replace=False) for _ in range(m)]) if v < 64 else \
            rng.integers(0, v, size=(m, 3))
        w = rng.dirichlet((1.0, 1.0, 1.0), size=m).astype(np.float32)
        x = np.einsum("mk,mkd->md", w, src[pick]) + (0.25 / np.sqrt(d)) * rng.standard_normal((m, d), np.float32)
        out[lo : lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_baseline(emb: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    """Plain numpy: scores = E @ q (a batch as q @ E.T, [Q, N] row-major) and argpartition for the top k."""
    if q.ndim == 1:
        scores = emb @ q
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]
    scores = q @ emb.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def baseline_times(emb: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """(median seconds of one query over 20, seconds of 100 queries batched) of the numpy baseline."""
    one = statistics.median(timed(lambda i=i: numpy_baseline(emb, queries[i]))[0] for i in range(1, 21))
    batch, _ = timed(lambda: numpy_baseline(emb, queries[:100]), repeat=3)
    return one, batch


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(emb: np.ndarray, queries: np.ndarray, kind: str, workdir: Path, tuning: np.ndarray,
            held_out: np.ndarray) -> dict:
    from muse_pipeline.search.index_format import VideoIndex, write_index
    from muse_pipeline.search.topk import exact_topk_fast, plan_search, recall_at_k

    n = len(emb)
    plan = plan_search(n, exact=kind == "exact")
    folder = workdir / f"idx-{n}-{plan.kind}"
    t0 = time.perf_counter()
    write_index(folder, emb, ids=[f"v{i}" for i in range(n)], paths=[f"/v/{i}.mp4" for i in range(n)],
                clip={"model": "muse-tiny", "weights_id": "random-init"}, words=32, plan=plan,
                tuning_queries=tuning, overwrite=True)
    build = time.perf_counter() - t0
    load, index = timed(lambda: VideoIndex(folder).load())
    # The first exact query pages the memory-mapped matrix in; count it in load, like faiss's read.
    first, _ = timed(lambda: index.search_vectors(queries[:1], 10))
    single = [timed(lambda i=i: index.search_vectors(queries[i : i + 1], 10))[0] for i in range(1, 21)]
    batch, _ = timed(lambda: index.search_vectors(queries[:100], 10), repeat=3)
    _, (_, rows) = timed(lambda: index.search_vectors(held_out, 10))
    _, truth = exact_topk_fast(emb, held_out, 10)
    meta = index.meta["search"]
    params = ", ".join(f"{k} {v}" for k, v in meta["params"].items() if k != "tuning_queries" and not k.startswith("recall_at_"))
    return {"kind": plan.kind + (f" ({params})" if params else ""), "build_s": build, "load_s": load + first,
            "one_ms": 1000 * statistics.median(single), "batch_ms": 1000 * batch,
            "recall": recall_at_k(rows, truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("demo/runs/synthetic-muse"))
    parser.add_argument("--cache", type=Path, default=None, help="default: the run's cache")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=None, help="where the index folders go (default: a tmp dir)")
    args = parser.parse_args()

    videos, captions, config = source_embeddings(args.run, args.cache or Path(config_cache(args.run)))
    rng = np.random.default_rng(1)
    order = rng.permutation(len(captions))
    tuning, held_out = captions[order[:128]], captions[order[128:]]
    queries = captions[order[rng.integers(0, len(order), 100)]]
    print(f"source: {len(videos)} video embeddings (D = {videos.shape[1]}) and {len(captions)} caption "
          f"queries of {args.run} ({config['model']['head']} head); tuning {len(tuning)}, held out {len(held_out)}\n")
    print("| N | search | build (s) | load (s) | 1 query (ms) | 100 queries batched (ms) | recall@10 vs exact |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for n in args.sizes:
            emb = expand(videos, n)
            one, batch = baseline_times(emb, queries)
            print(f"| {n:,} | numpy `E @ q` + argpartition (in RAM) | - | - | {1000 * one:.2f} | {1000 * batch:.1f} | 1.000 |",
                  flush=True)
            for kind in ("exact", "approx"):
                r = measure(emb, queries, kind, workdir, tuning, held_out)
                print(f"| {n:,} | {r['kind']} | {r['build_s']:.1f} | {r['load_s']:.3f} | {r['one_ms']:.2f} | "
                      f"{r['batch_ms']:.1f} | {r['recall']:.3f} |", flush=True)
            del emb


def config_cache(run: Path) -> str:
    import json

    return json.loads((run / "config.json").read_text())["cache"]


if __name__ == "__main__":
    main()
