"""The per-video columns an index copies from a feature cache that the cache does not read itself:
clip windows of old stores, first captions, absolute paths. (File durations and source ids are
`FeatureCache.read_durations` / `read_sources`, which read old stores too.)

`cache` is an opened feature cache (`FeatureCache`: video_ids, captions, text_video_index,
fingerprint, root); `rows` [n] int are the cache rows being indexed. `clip_windows` and
`first_captions` return one value per row, in the order of `rows`; `absolute_paths` one per path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def clip_windows(cache: Any, rows: np.ndarray) -> np.ndarray:
    """[n, 2] (start, end) seconds of each indexed video; NaN where the clip is the whole video.

    Extraction records each clip's window in the store (`FeatureCache.read_windows`). Stores made
    before it did are read by the rules those windows came from: folder clips carry their window in
    the id (`<video>@<start>-<end>`), DiDeMo clips are the first 30 s.
    """
    if cache.has_windows:
        return cache.read_windows(rows)
    return _legacy_windows(cache, rows)


def _legacy_windows(cache: Any, rows: np.ndarray) -> np.ndarray:
    out = np.full((len(rows), 2), np.nan)
    dataset = (cache.fingerprint or {}).get("dataset")
    ids = cache.video_ids
    for j, i in enumerate(rows):
        vid = str(ids[i])
        if dataset == "didemo":
            out[j] = (0.0, 30.0)
        elif "@" in vid:
            window = vid.rsplit("@", 1)[1]
            lo, sep, hi = window.partition("-")
            try:
                out[j] = (float(lo) if lo else np.nan, float(hi) if hi else np.nan) if sep else out[j]
            except ValueError:
                pass
    return out


def first_captions(cache: Any, rows: np.ndarray) -> list[str]:
    """The first cached caption of each video ("" for a video without captions)."""
    captions = cache.captions
    owner = np.asarray(cache.text_video_index)
    first: dict[int, str] = {}
    for text, video in zip(captions, owner.tolist(), strict=True):
        first.setdefault(int(video), str(text))
    return [first.get(int(i), "") for i in rows]


def absolute_paths(paths: Sequence[str], cache_path: Path) -> list[str]:
    """Cached paths made absolute (normalised): a relative one against the working directory where
    it exists there or not beside the cache, else against the cache's folder."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_absolute():
            here = Path.cwd() / path
            path = here if here.exists() or not (cache_path.parent / path).exists() else cache_path.parent / path
        out.append(os.path.normpath(str(path)))
    return out
