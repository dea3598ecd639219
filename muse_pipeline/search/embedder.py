"""Which embedder an index uses, and the queries an approximate index is tuned on.

An index embeds every cached video with either a trained run's head (`run_embedder`, after
`load_indexable_run`) or zero-shot CLIP (`zero_shot_embedder`: `ZeroShotMeanP`, the mean of the
real frames' unit CLS rows). Both give an `IndexEmbedder`: `model.embed_videos(tokens [B,T,L,D],
mask [B,T]) -> [B, D]` (on the device it was asked for, eval mode), the text side stored with the
index (`adapter`: None = identity, else the run's `t + W t + b` weights, then L2), the `index.json`
fields that say what embedded it (`extra`), the run's identity for updates (`run`, None for
zero-shot) and notes for the user.

`tuning_queries` picks what an approximate index is tuned on: up to `topk.TUNING_QUERIES` of the
cache's own captions through the index's text side (evenly spread), or, for a cache without
captions, every n-th video embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.errors import InputError
from muse_pipeline.search.query import adapter_state, apply_text_side, check_text_side
from muse_pipeline.search.topk import TUNING_QUERIES
from muse_pipeline.search.update import ZERO_SHOT, run_identity


@dataclass(frozen=True)
class IndexEmbedder:
    """How an index's video vectors are made (see the module docstring)."""

    model: Any  # a RetrievalModel or ZeroShotMeanP: embed_videos(tokens, mask) -> [B, D]
    adapter: dict[str, np.ndarray] | None
    extra: dict[str, Any]
    run: dict[str, Any] | None  # run_identity, None for zero-shot
    notes: list[str]


def load_indexable_run(run_dir: Path, which: str) -> tuple[Any, dict[str, Any]]:
    """(RetrievalModel on the CPU, config.json) of a run trained from a cache; an end-to-end run
    (CLIP fine-tuned, so a cache of frozen-CLIP tokens does not describe it) is an InputError."""
    from muse_pipeline.models.checkpoint import load_run

    model, config = load_run(run_dir, which=which)
    if config.get("end_to_end"):
        raise InputError(
            f"{run_dir} is an end-to-end run (CLIP fine-tuned): a cache of frozen-CLIP tokens does not "
            "describe it, so it cannot be indexed from a cache; index a run trained from the cache"
        )
    return model, config


def run_embedder(run_dir: Path, model: Any, config: dict[str, Any], cache: Any, cache_path: Path, which: str,
                 device: str) -> IndexEmbedder:
    """A run's head over `cache`: refuses (InputError) a cache of another CLIP model or weights and a
    text side that cannot be stored; notes a frame count that differs from the run's."""
    from muse_pipeline.evaluation.score import check_compatible

    fp = dict(cache.fingerprint or {})
    try:
        check_compatible(config.get("fingerprint") or {}, fp, cache_path)
    except ValueError as exc:  # another CLIP model or weights: the run's heads were trained on other features
        raise InputError(f"{exc}; index a cache extracted with the run's CLIP model and weights "
                         "(or index this cache without a run: `muse index --cache CACHE --out INDEX`)") from None
    adapter = adapter_state(model)  # load_run returns the model on the CPU
    check_text_side(model, adapter, int(fp.get("dim") or config["model"]["dim"]))
    notes = []
    run_frames = (config.get("fingerprint") or {}).get("frames") or config["model"].get("max_frames")
    if run_frames is not None and int(run_frames) != cache.frames:
        notes.append(f"the run was trained on {int(run_frames)} frames per video, this cache holds "
                     f"{cache.frames}: its head embeds {cache.frames} frames (recorded in index.json)")
    extra = {"head": config["model"]["head"], "head_config": config["model"], "which": which,
             "run_name": run_dir.name,
             "frames": {"run": None if run_frames is None else int(run_frames), "cache": cache.frames}}
    return IndexEmbedder(model.eval().to(device), adapter, extra, run_identity(run_dir, which), notes)


def zero_shot_embedder(cache: Any) -> IndexEmbedder:
    """Zero-shot CLIP (`ZeroShotMeanP`, identity text side) over `cache`."""
    from muse_pipeline.evaluation.embed import ZeroShotMeanP

    extra = {"head": ZERO_SHOT, "head_config": None, "which": None, "run_name": None,
             "frames": {"run": None, "cache": cache.frames}}
    return IndexEmbedder(ZeroShotMeanP(), None, extra, None, [])


def tuning_queries(cache: Any, adapter: dict[str, np.ndarray] | None, emb: np.ndarray) -> np.ndarray:
    """Queries an approximate index is tuned on: the cache's own captions through the text side, or
    (a cache without captions) every n-th video row; [q, D]."""
    text_done = np.flatnonzero(np.asarray(cache.read_text_done()) == 1)
    if not len(text_done):
        return emb[:: max(1, len(emb) // TUNING_QUERIES)]
    pick = text_done[np.linspace(0, len(text_done) - 1, min(TUNING_QUERIES, len(text_done))).astype(int)]
    return apply_text_side(np.asarray(cache.read_text_embeddings(pick), np.float32), adapter)
