"""Summaries of a feature cache, and its export to HDF5 for tools that do not read Zarr."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from muse_pipeline.cache.store import CACHED, FAILED, FORMAT, FORMAT_VERSION, PENDING, RETIRED, FeatureCache
from muse_pipeline.data.base import SPLITS

TEXT_ROWS_PER_STEP = 65536


def bytes_on_disk(path: Path | str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def cache_info(path: Path | str) -> dict[str, Any]:
    """Counts per split (videos cached / failed / pending, texts with embeddings), layout, bytes on
    disk, fingerprint and failures of the cache at `path` (JSON-serialisable)."""
    cache = FeatureCache.open(path, mode="r")
    done = cache.read_done()
    text_done = cache.read_text_done()
    v_split = np.array(cache.video_splits, dtype=object)
    t_split = np.array(cache.text_splits, dtype=object)
    splits: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        vs, ts = (v_split == split) & (done != RETIRED), t_split == split  # retired rows are no videos
        if not vs.any() and not ts.any():
            continue
        splits[split] = {
            "videos": int(vs.sum()),
            "cached": int((done[vs] == CACHED).sum()),
            "failed": int((done[vs] == FAILED).sum()),
            "pending": int((done[vs] == PENDING).sum()),
            "texts": int(ts.sum()),
            "texts_done": int((text_done[ts] != 0).sum()),
        }
    return {
        "path": str(cache.path),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "frames": cache.frames,
        "num_tokens": cache.num_tokens,
        "dim": cache.dim,
        "words": cache.words,
        "videos_per_shard": cache.videos_per_shard,
        "n_shards": cache.n_shards,
        **cache.progress(),
        "splits": splits,
        "bytes_on_disk": bytes_on_disk(cache.path),
        "fingerprint": cache.fingerprint,
        "failures": cache.failures,
        "warnings": cache.warnings,
        "failure_history": cache.failure_history,
        "generations": cache.generations,  # a growing library's updates (cache/growth.py)
    }


def export_hdf5(cache_path: Path | str, out_path: Path | str, compression_level: int = 4) -> Path:
    """Write the cache's arrays to an HDF5 file with the same names (groups `videos`, `texts`; the
    per-row arrays a store made before they existed lacks are left out as well).

    Root attributes `format`, `format_version`, and `fingerprint` / `failures` as JSON strings (HDF5
    attributes hold no nested dicts). Datasets are chunked like the Zarr inner chunks and gzip
    compressed; tokens are copied one shard at a time, so memory stays bounded by one shard.
    """
    cache = FeatureCache.open(cache_path, mode="r")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")

    def gz(shape: tuple[int, ...], chunks: tuple[int, ...] | None = None) -> dict[str, Any]:
        # h5py cannot chunk (hence compress) a dataset with a zero-length dimension.
        if 0 in shape:
            return {"shape": shape}
        opts = {"compression": "gzip", "compression_opts": compression_level, "shuffle": True}
        return {"shape": shape, "chunks": chunks or True, **opts}

    string = h5py.string_dtype(encoding="utf-8")
    n, t, nt, d, m, w = cache.n_videos, cache.frames, cache.num_tokens, cache.dim, cache.n_texts, cache.words
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["fingerprint"] = json.dumps(cache.fingerprint, sort_keys=True)
            f.attrs["failures"] = json.dumps(cache.failures)
            f.attrs["warnings"] = json.dumps(cache.warnings)
            videos, texts = f.create_group("videos"), f.create_group("texts")
            tokens = videos.create_dataset("tokens", dtype="float16", **gz((n, t, nt, d), (1, t, nt, d)))
            mask = videos.create_dataset("mask", dtype="uint8", **gz((n, t), (min(n, 4096), t)))
            for k in range(cache.n_shards):
                lo, hi = cache.shard_range(k)
                block, block_mask = cache.read_videos(np.arange(lo, hi))
                tokens[lo:hi] = block
                mask[lo:hi] = block_mask
            videos.create_dataset("done", data=cache.read_done())
            strings = {"ids": cache.video_ids, "split": cache.video_splits, "paths": cache.video_paths}
            rows = np.arange(n)
            numbers: dict[str, np.ndarray] = {}
            if cache.has_windows:  # the moments' windows, where the store records them
                numbers.update(zip(("start", "end"), cache.read_windows(rows).T, strict=True))
            if cache.has_row_facts:  # the row facts of a store that can grow
                strings["source"] = cache.read_sources(rows)
                numbers.update(duration=cache.read_durations(rows), grid_step=cache.read_grid_steps(rows))
                numbers.update(zip(("file_size", "file_mtime_ns"), cache.read_file_states(rows).T, strict=True))
            for name, values in strings.items():
                videos.create_dataset(name, data=np.array(values, dtype=object), dtype=string)
            for name, values in numbers.items():
                videos.create_dataset(name, data=np.ascontiguousarray(values))

            t_tokens = texts.create_dataset("tokens", dtype="int32", **gz((m, w), (min(m, 4096), w)))
            t_emb = texts.create_dataset("embeddings", dtype="float16", **gz((m, d), (min(m, 4096), d)))
            for lo in range(0, m, TEXT_ROWS_PER_STEP):
                hi = min(m, lo + TEXT_ROWS_PER_STEP)
                t_tokens[lo:hi], t_emb[lo:hi] = cache.read_texts(np.arange(lo, hi))
            texts.create_dataset("video_index", data=cache.text_video_index.astype(np.int32))
            texts.create_dataset("done", data=cache.read_text_done())
            for name, values in (("split", cache.text_splits), ("captions", cache.captions)):
                texts.create_dataset(name, data=np.array(values, dtype=object), dtype=string)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path
