"""Scoring embeddings (spec section 8): one similarity matrix, ranks both ways, metrics, per-query ranks.

`score_similarity` turns (video_emb [N, D], text_emb [M, D], caption_to_video [M]) into the metric part
of eval.json; `evaluate_cached` embeds a cache split with a model and scores it (the eval.json body
without the run fields); `zero_shot_result` is that for parameter-free CLIP (meanP).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse_pipeline.cache.compat import CLIP_KEYS, describe_differences, differing_keys
from muse_pipeline.evaluation.embed import (
    Embedder,
    ZeroShotMeanP,
    embed_texts,
    embed_videos,
    open_cache,
    similarity_chunked,
    split_members,
)
from muse_pipeline.metrics import retrieval_metrics_dsl, rsum, summarize_ranks, t2v_ranks, v2t_ranks

DSL_TEMPERATURE = 0.01


def check_compatible(train_fp: dict, cache_fp: dict, cache_path: Path) -> None:
    """ValueError unless the cache was made with the run's CLIP (compat.CLIP_KEYS agree)."""
    diff = differing_keys(train_fp, cache_fp, CLIP_KEYS)
    if diff:
        raise ValueError(
            f"cache {cache_path} was not made with the run's CLIP model ({describe_differences(train_fp, cache_fp, diff)})"
        )


T2V_RULE = ("text -> video: each caption ranks all test videos by similarity; the rank of its own video "
            "counts (ties count against the query)")
V2T_RULE = ("video -> text: each video ranks all test captions by similarity; its rank is the best "
            "(smallest) rank among its own captions, so a video with 20 captions needs only one near the "
            "top (ties count against the query)")


def score_similarity(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_to_video: np.ndarray,
    dsl: bool,
    chunk: int,
    names: tuple[list[str], list[str]] | None = None,
) -> dict[str, Any]:
    """Metrics (and DSL metrics if asked) of one similarity matrix, with per-query ranks and timings.

    names: (video ids [N], caption texts [M]) for the per-query ranks kept in eval.json.
    """
    t0 = time.perf_counter()
    sim = similarity_chunked(text_emb, video_emb, chunk)
    t1 = time.perf_counter()
    c2v = np.asarray(caption_to_video, dtype=np.int64)
    t2v = t2v_ranks(sim, c2v)
    v2t = v2t_ranks(sim, c2v)
    metrics = {"t2v": summarize_ranks(t2v), "v2t": summarize_ranks(v2t)}
    out: dict[str, Any] = {"metrics": metrics, "rsum": round(rsum(metrics), 4), "post_processing": None}
    if dsl:
        out["post_processing"] = f"dual softmax (DSL), temperature {DSL_TEMPERATURE}"
        out["metrics_dsl"] = retrieval_metrics_dsl(sim, caption_to_video, DSL_TEMPERATURE)
        out["rsum_dsl"] = round(rsum(out["metrics_dsl"]), 4)
    video_ids, captions = names if names is not None else (None, None)
    with_caption = np.unique(c2v)  # v2t ranks come in this (column) order
    out["rules"] = {"t2v": T2V_RULE, "v2t": V2T_RULE}
    out["per_query"] = {
        "t2v": {
            "rank": t2v.tolist(),
            "video": [video_ids[i] for i in c2v] if video_ids is not None else c2v.tolist(),
            **({"caption": list(captions)} if captions is not None else {}),
        },
        "v2t": {
            "rank": v2t.tolist(),
            "video": [video_ids[i] for i in with_caption] if video_ids is not None else with_caption.tolist(),
        },
    }
    out["seconds"] = {"similarity": round(t1 - t0, 4), "metrics": round(time.perf_counter() - t1, 4)}
    return out


def evaluate_cached(
    model: Embedder,
    cache: Any,
    split: str,
    dsl: bool,
    device: str,
    batch_size: int,
    chunk: int,
) -> dict[str, Any]:
    members = split_members(cache, split)
    t0 = time.perf_counter()
    video_emb = embed_videos(model, cache, members.video_idx, batch_size, device)
    text_emb = embed_texts(model, cache, members.text_idx, batch_size, device)
    embed_s = time.perf_counter() - t0
    all_ids, all_captions = cache.video_ids, cache.captions
    names = ([str(all_ids[i]) for i in members.video_idx], [str(all_captions[i]) for i in members.text_idx])
    scored = score_similarity(video_emb, text_emb, members.caption_to_video, dsl, chunk, names)
    scored["seconds"] = {"embed": round(embed_s, 4), **scored["seconds"]}
    return {
        "split": split,
        "cache": str(cache.path),
        "counts": {
            "videos": int(len(members.video_idx)),
            "texts": int(len(members.text_idx)),
            "failed_videos": members.failed_videos,
            "dropped_texts": members.dropped_texts,
        },
        **scored,
    }


def zero_shot_result(cache_path: Path | str, split: str = "test", *, dsl: bool = False, batch_size: int = 64,
                     chunk: int = 4096) -> dict[str, Any]:
    """The eval.json dict of zero-shot CLIP (meanP of cached CLS tokens vs cached text embeddings) on
    `split` of the cache at `cache_path`; writes nothing."""
    cache = open_cache(cache_path)
    return {
        "run_dir": None,
        "head": "zero-shot meanP",
        "weights": "CLIP (no training)",
        **evaluate_cached(ZeroShotMeanP(), cache, split, dsl, "cpu", batch_size, chunk),
    }
