"""Retrieval metrics of spec section 8, and the optional dual-softmax post-processing.

Ranks: the rank of the true item is 1 + the number of OTHER candidates that score >= it, so ties
count against the query. A model that scores everything the same therefore ranks every true item
last (never first): a constant similarity matrix cannot look perfect.

Layout: `sim` is [M captions, N videos]; `caption_to_video[m]` is the column of caption m's video.
- text -> video: each caption ranks its video among all N videos (one rank per caption).
- video -> text: each video ranks each of its captions among all M captions of its column and keeps
  the best (smallest) rank. Videos without any caption are left out of v2t.

All work is done on row blocks of `sim`, so temporaries stay ~`chunk_rows * N` whatever M is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

RECALL_KS = (1, 5, 10)
# Rows per block: keeps each boolean temporary around 16 M elements for N = 5k..100k columns.
_DEFAULT_BLOCK_ELEMENTS = 1 << 24


def _as_tensor(sim: ArrayLike) -> torch.Tensor:
    """[M, N] float tensor on CPU; float16/bfloat16 widen to float32 exactly (ties are preserved)."""
    t = torch.as_tensor(sim)
    if t.ndim != 2:
        raise ValueError(f"sim must be 2-D [captions, videos], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"sim is empty: shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    t = t.detach().cpu()
    if torch.isnan(t).any():
        raise ValueError("sim contains NaN: ranks would be undefined")
    return t


def _as_index(caption_to_video: ArrayLike | Sequence[int] | None, m: int, n: int) -> torch.Tensor:
    """[M] int64 column index of every caption's video (default: the diagonal of a square matrix)."""
    if caption_to_video is None:
        if m != n:
            raise ValueError(
                f"sim is {m} x {n} (not square): pass caption_to_video to say which video each caption belongs to"
            )
        return torch.arange(m)
    idx = torch.as_tensor(np.asarray(caption_to_video)).to(torch.int64).reshape(-1)
    if idx.numel() != m:
        raise ValueError(f"caption_to_video has {idx.numel()} entries but sim has {m} caption rows")
    if (idx < 0).any() or (idx >= n).any():
        bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
        raise ValueError(f"caption_to_video has indices outside [0, {n}): e.g. {bad}")
    return idx


def _block_rows(n_cols: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    return max(1, _DEFAULT_BLOCK_ELEMENTS // max(n_cols, 1))


def t2v_ranks(
    sim: ArrayLike, caption_to_video: ArrayLike | Sequence[int] | None = None, chunk_rows: int | None = None
) -> np.ndarray:
    """Rank (1-based) of each caption's video among all videos: [M] int64.

    sim: [M, N]; caption_to_video: [M] (default diagonal).
    """
    s = _as_tensor(sim)
    m, n = s.shape
    c2v = _as_index(caption_to_video, m, n)
    ranks = torch.empty(m, dtype=torch.int64)
    step = _block_rows(n, chunk_rows)
    for lo in range(0, m, step):
        block = s[lo : lo + step]
        true = block.gather(1, c2v[lo : lo + step, None])  # [b, 1]
        # The true column itself is always >= itself, so the count is already 1 + #others >= true.
        ranks[lo : lo + step] = (block >= true).sum(dim=1)
    return ranks.numpy()


def v2t_ranks(
    sim: ArrayLike, caption_to_video: ArrayLike | Sequence[int] | None = None, chunk_rows: int | None = None
) -> np.ndarray:
    """Best rank (1-based) among each video's captions, ranking all M captions: [V] int64.

    sim: [M, N]; only the V videos that own at least one caption get a rank (in column order).
    The best rank of a video is the rank of its highest-scoring caption, because a caption's rank
    only grows as its score falls; so we rank that one score per column in a single row pass.
    """
    s = _as_tensor(sim)
    m, n = s.shape
    c2v = _as_index(caption_to_video, m, n)
    own = s.gather(1, c2v[:, None]).squeeze(1)  # [M] score of each caption with its own video
    best = torch.full((n,), float("-inf"), dtype=s.dtype)
    best.scatter_reduce_(0, c2v, own, reduce="amax")
    has_caption = torch.zeros(n, dtype=torch.bool)
    has_caption[c2v] = True
    counts = torch.zeros(n, dtype=torch.int64)
    step = _block_rows(n, chunk_rows)
    for lo in range(0, m, step):
        counts += (s[lo : lo + step] >= best[None, :]).sum(dim=0)
    return counts[has_caption].numpy()


def summarize_ranks(ranks: ArrayLike) -> dict[str, float]:
    """R@1/5/10 in percent, median rank MdR and mean rank MnR of 1-based ranks."""
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("no ranks to summarize (no queries)")
    if (r < 1).any():
        raise ValueError("ranks are 1-based: got a rank < 1")
    out = {f"R{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def retrieval_metrics(
    sim: ArrayLike, caption_to_video: ArrayLike | Sequence[int] | None = None, chunk_rows: int | None = None
) -> dict[str, dict[str, float]]:
    """{"t2v": {R1, R5, R10, MdR, MnR}, "v2t": {...}} of a [captions, videos] similarity matrix.

    sim: [M, N] numpy or torch; caption_to_video: [M] video column of every caption, default the
    diagonal (square sim, one caption per video).
    """
    return {
        "t2v": summarize_ranks(t2v_ranks(sim, caption_to_video, chunk_rows)),
        "v2t": summarize_ranks(v2t_ranks(sim, caption_to_video, chunk_rows)),
    }


def dual_softmax(sim: ArrayLike, temperature: float = 0.01, dim: int = 0) -> torch.Tensor:
    """Dual-softmax (DSL) re-weighting: sim * softmax(sim / temperature, dim). [M, N] -> [M, N].

    A post-processing that uses the whole test set at once (it is not a property of the model), so
    results with it are always labelled as post-processed. For text -> video ranking (along rows)
    the prior is taken over captions (dim=0); for video -> text over videos (dim=1).
    temperature 0.01 equals CLIP's logit scale of 100 on cosine similarities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = _as_tensor(sim)
    if s.dtype != torch.float64:
        s = s.to(torch.float32)
    return s * torch.softmax(s / temperature, dim=dim)


def retrieval_metrics_dsl(
    sim: ArrayLike,
    caption_to_video: ArrayLike | Sequence[int] | None = None,
    temperature: float = 0.01,
    chunk_rows: int | None = None,
) -> dict[str, dict[str, float]]:
    """`retrieval_metrics` after dual softmax, each direction with its own prior (see dual_softmax)."""
    return {
        "t2v": summarize_ranks(
            t2v_ranks(dual_softmax(sim, temperature, dim=0), caption_to_video, chunk_rows)
        ),
        "v2t": summarize_ranks(
            v2t_ranks(dual_softmax(sim, temperature, dim=1), caption_to_video, chunk_rows)
        ),
    }


def rsum(metrics: dict[str, dict[str, float]]) -> float:
    """RSum: R@1 + R@5 + R@10 of text -> video plus the same of video -> text (percent points, max 600)."""
    return float(sum(metrics[d][f"R{k}"] for d in ("t2v", "v2t") for k in RECALL_KS))
