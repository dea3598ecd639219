"""Embedding a cache split once: which rows a split evaluates, the model's video and text sides over
them, and the text x video similarity.

Shapes: video embeddings [N, D] and text embeddings [M, D] float32 on the CPU; `caption_to_video` [M]
int64 positions into the N videos; similarity [M, N] float32. Videos whose extraction failed (done == 2)
are left out with their captions; a split with pending videos or texts is refused (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class Embedder(Protocol):
    """What evaluation needs of a model (RetrievalModel satisfies it)."""

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SplitMembers:
    """Which cache rows a split evaluates, and what was left out.

    video_idx: [N] cache rows of the cached (done == 1) videos of the split, ascending.
    text_idx: [M] cache rows of the texts whose video is in video_idx.
    caption_to_video: [M] position in video_idx of each text's video.
    """

    video_idx: np.ndarray
    text_idx: np.ndarray
    caption_to_video: np.ndarray
    failed_videos: int
    dropped_texts: int


def _cache_splits(cache: Any) -> list[str]:
    return sorted({str(s) for s in cache.video_splits})


def split_members(cache: Any, split: str) -> SplitMembers:
    """Rows of `split` to evaluate; raises ValueError if the split is absent or not fully extracted."""
    video_idx, text_idx = cache.split_indices(split)
    video_idx = np.asarray(video_idx, dtype=np.int64)
    text_idx = np.asarray(text_idx, dtype=np.int64)
    if video_idx.size == 0:
        known = _cache_splits(cache)
        raise ValueError(
            f"split {split!r} has no videos in cache {cache.path}"
            + (f"; splits in this cache: {', '.join(known)}" if known else "")
        )
    if text_idx.size == 0:
        raise ValueError(f"split {split!r} has no captions in cache {cache.path}: nothing to retrieve")
    done = np.asarray(cache.read_done())[video_idx]
    pending = int((done == 0).sum())
    if pending:
        raise ValueError(
            f"{pending} of {len(video_idx)} {split!r} videos in {cache.path} are not extracted yet; "
            "finish `muse extract` (it resumes) before evaluating"
        )
    text_done = np.asarray(cache.read_text_done())[text_idx]
    if not text_done.all():
        raise ValueError(
            f"{int((text_done == 0).sum())} {split!r} texts in {cache.path} have no embedding yet; "
            "finish `muse extract` before evaluating"
        )
    ok = video_idx[done == 1]
    if ok.size == 0:
        raise ValueError(f"every {split!r} video in {cache.path} failed extraction: nothing to evaluate")
    text_video = np.asarray(cache.text_video_index)[text_idx].astype(np.int64)
    position = {int(v): i for i, v in enumerate(ok)}
    keep = np.array([int(v) in position for v in text_video], dtype=bool)
    if not keep.any():
        raise ValueError(f"no {split!r} caption belongs to a cached video in {cache.path}")
    return SplitMembers(
        video_idx=ok,
        text_idx=text_idx[keep],
        caption_to_video=np.array([position[int(v)] for v in text_video[keep]], dtype=np.int64),
        failed_videos=int((done == 2).sum()),
        dropped_texts=int((~keep).sum()),
    )


@torch.inference_mode()
def embed_videos(
    model: Embedder, cache: Any, video_idx: np.ndarray, batch_size: int, device: str
) -> torch.Tensor:
    """[N, D] float32 CPU: each video read once (batched cache reads) and embedded once."""
    out = []
    for lo in range(0, len(video_idx), batch_size):
        tokens, mask = cache.read_videos(video_idx[lo : lo + batch_size])
        # Kept float16 on the way to the device (half the transfer); the model casts to its dtype.
        tokens_t = torch.as_tensor(np.asarray(tokens)).to(device=device)
        mask_t = torch.as_tensor(np.asarray(mask)).to(device=device)
        out.append(model.embed_videos(tokens_t, mask_t).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(
    model: Embedder, cache: Any, text_idx: np.ndarray, batch_size: int, device: str
) -> torch.Tensor:
    """[M, D] float32 CPU: the cached CLIP text embeddings through the model's text side, once each."""
    cached = np.asarray(cache.read_text_embeddings(text_idx))
    out = []
    for lo in range(0, len(text_idx), batch_size):
        emb = torch.as_tensor(cached[lo : lo + batch_size]).to(device=device, dtype=torch.float32)
        out.append(model.embed_texts(emb).float().cpu())
    return torch.cat(out)


def embed_split(
    model: Embedder, cache: Any, split: str, batch_size: int = 64, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(video_emb [N, D], text_emb [M, D], caption_to_video [M]) of the cached videos of `split`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    members = split_members(cache, split)
    video_emb = embed_videos(model, cache, members.video_idx, batch_size, device)
    text_emb = embed_texts(model, cache, members.text_idx, batch_size, device)
    return video_emb, text_emb, members.caption_to_video


def similarity_chunked(text_emb: torch.Tensor, video_emb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[M, N] float32 = text_emb [M, D] @ video_emb [N, D]^T, computed `chunk` text rows at a time."""
    if text_emb.ndim != 2 or video_emb.ndim != 2 or text_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(
            f"need text_emb [M, D] and video_emb [N, D] with equal D, got {tuple(text_emb.shape)} "
            f"and {tuple(video_emb.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    t = text_emb.float()
    v_t = video_emb.float().t().contiguous()
    sim = torch.empty(t.shape[0], v_t.shape[1], dtype=torch.float32, device=t.device)
    for lo in range(0, t.shape[0], chunk):
        sim[lo : lo + chunk] = t[lo : lo + chunk] @ v_t
    return sim.cpu()


class ZeroShotMeanP:
    """Parameter-free CLIP baseline (spec section 6, meanP): masked mean of L2-normalised CLS rows.

    embed_videos: tokens [B, T, L, D], mask [B, T] -> [B, D]; embed_texts: [M, D] -> [M, D] (L2 norm).
    """

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cls = torch.nn.functional.normalize(tokens[:, :, 0, :].float(), dim=-1)
        w = mask.to(cls.dtype).unsqueeze(-1)
        pooled = (cls * w).sum(1) / w.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(text_emb.float(), dim=-1)


def open_cache(cache_path: Path | str) -> Any:
    """The FeatureCache at `cache_path` opened read-only; FileNotFoundError when it does not exist."""
    path = Path(cache_path)
    if not path.exists():
        raise FileNotFoundError(f"cache {path} does not exist (run `muse extract` first)")
    from muse_pipeline.cache.store import FeatureCache

    return FeatureCache.open(path, mode="r")
