"""The index folder: the on-disk format of `muse index`, its writer and its reader.

An index holds everything a query needs, so that searching never opens the run or the cache again
and the folder can be moved or copied:

```
INDEX/
  index.json               see below
  embeddings.npy           [N, D] float32, L2-normalised rows (memory-mapped at query time)
  ids.bin/.off.npy         [N] video ids, unique (UTF-8 blob + [N+1] int64 offsets, memory-mapped)
  paths.bin/.off.npy       [N] absolute source paths at index time
  relpaths.bin/.off.npy    [N] the same paths relative to INDEX (used when the absolute path is gone)
  captions.bin/.off.npy    [N] first caption of each video ("" when the dataset has none)
  windows.npy              [N, 2] float64 clip window (start, end) in seconds; NaN = not set
  text_adapter.safetensors the run's text adapter (fc.weight [D, D], fc.bias [D] float32); absent = identity
  ann.faiss                the approximate index (only when search.kind != "exact")
  text-encoder/            the CLIP text tower queries run (`text_encoder`; written by `muse index`
                           once per index root; absent in older indexes: queries then use open_clip)
```

A string column NAME is `NAME.bin` (the UTF-8 strings back to back) and `NAME.off.npy` ([N+1]
int64, string i = bin[off[i]:off[i+1]]), so opening a 1M-row index reads nothing.

index.json keys: format = INDEX_FORMAT ("muse-index"), format_version = INDEX_VERSION (2), n_videos,
dim, metric ("cosine"), search = {kind: exact | hnsw | ivf-flat, params: build parameters plus, when
approximate, the tuned efSearch | nprobe, "recall_at_<k>" and tuning_queries, build_seconds}, clip =
{model, weights_id, and pretrained (an open_clip tag) or weights_file {path, size, mtime_ns}; see
`query.clip_record`}, words (query tokens), has_captions, created (UTC ISO 8601), and whatever the
builder adds (`build_index`: head, head_config, which, run_name, cache_name, dataset).

Scoring is cosine similarity (inner product of unit rows); `VideoIndex.search_vectors` answers
exactly or through ann.faiss (see `topk`). Writing builds under a temporary name and renames, so a
crash never leaves half an index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.errors import InputError, UserError
from muse_pipeline.search.topk import (
    TUNING_QUERIES,
    SearchPlan,
    build_ann,
    exact_topk_fast,
    exact_topk_single,
    import_faiss,
    plan_search,
    set_search_param,
    tune_ann,
)

INDEX_FORMAT = "muse-index"
INDEX_VERSION = 2


class IndexFormatError(UserError, ValueError):
    """A missing, foreign or damaged index, or a text side that cannot be rebuilt."""


def write_string_column(folder: Path, name: str, values: Sequence[str]) -> None:
    """Write `values` as the string column `name` of `folder` (NAME.bin + NAME.off.npy)."""
    encoded = [str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    (folder / f"{name}.bin").write_bytes(b"".join(encoded))
    np.save(folder / f"{name}.off.npy", offsets)


class StringColumn:
    """Read side of `write_string_column`: column[i] -> str, decoded on demand."""

    def __init__(self, folder: Path, name: str) -> None:
        self.offsets = np.load(folder / f"{name}.off.npy", mmap_mode="r")
        blob = folder / f"{name}.bin"
        self._blob = np.memmap(blob, dtype=np.uint8, mode="r") if blob.stat().st_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self._blob[lo:hi]).decode("utf-8")

    def all(self) -> list[str]:
        return [self[i] for i in range(len(self))]


def write_index(
    out: Path | str,
    embeddings: np.ndarray,
    *,
    ids: Sequence[str],
    paths: Sequence[str],
    clip: dict[str, Any],
    words: int,
    captions: Sequence[str] | None = None,
    windows: np.ndarray | None = None,
    adapter: dict[str, np.ndarray] | None = None,
    plan: SearchPlan | None = None,
    tuning_queries: np.ndarray | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an index folder (the module docstring's format) from unit rows `embeddings` [N, D].

    tuning_queries [Q, D]: the queries an approximate index is tuned on (default: its first rows).
    Refuses an existing `out` unless `overwrite`. Returns `out`.
    """
    out = Path(out)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = emb.shape
    if not (len(ids) == len(paths) == n):
        raise ValueError(f"ids ({len(ids)}), paths ({len(paths)}) and embeddings ({n}) differ in length")
    if len(set(ids)) != n:
        raise ValueError("video ids are not unique")
    captions = list(captions) if captions is not None else [""] * n
    windows = np.full((n, 2), np.nan) if windows is None else np.asarray(windows, dtype=np.float64)
    plan = plan or plan_search(n)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "embeddings.npy", emb)
    np.save(tmp / "windows.npy", windows)
    out_abs = out.resolve()
    write_string_column(tmp, "ids", ids)
    write_string_column(tmp, "paths", paths)
    write_string_column(tmp, "relpaths", [os.path.relpath(p, out_abs) if os.path.isabs(p) else p for p in paths])
    write_string_column(tmp, "captions", captions)
    if adapter is not None:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in adapter.items()},
                  str(tmp / "text_adapter.safetensors"))
    search: dict[str, Any] = {"kind": plan.kind, "params": dict(plan.params)}
    if plan.kind != "exact":
        t0 = time.perf_counter()
        ann = build_ann(emb, plan)
        search["build_seconds"] = round(time.perf_counter() - t0, 2)
        queries = tuning_queries if tuning_queries is not None and len(tuning_queries) else emb[:TUNING_QUERIES]
        search["params"].update(tune_ann(ann, plan.kind, emb, queries))
        import_faiss().write_index(ann, str(tmp / "ann.faiss"))
    meta = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "n_videos": n,
        "dim": d,
        "metric": "cosine",
        "search": search,
        "clip": clip,
        "words": int(words),
        "has_captions": any(bool(c) for c in captions),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


class VideoIndex:
    """An opened index folder: memory-mapped embeddings and metadata, the faiss index if any.

    Opening reads index.json and maps the arrays: no torch, no run, no CLIP. A folder that is not an
    index of this format and version is an IndexFormatError.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            if (self.path / "zarr.json").is_file():
                raise IndexFormatError(f"{self.path} is an index of an older format; rebuild it with `muse index`")
            raise IndexFormatError(f"index {self.path} does not exist or is not a muse index "
                              "(no index.json); build it with `muse index`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_VERSION:
            raise IndexFormatError(f"{self.path} is not a muse index of version {INDEX_VERSION} "
                              f"(format {meta.get('format')!r} v{meta.get('format_version')}); rebuild it")
        self.meta = meta
        self.embeddings = np.load(self.path / "embeddings.npy", mmap_mode="r")
        self.ids = StringColumn(self.path, "ids")
        self.paths = StringColumn(self.path, "paths")
        self.relpaths = StringColumn(self.path, "relpaths")
        self.captions = StringColumn(self.path, "captions")
        self.windows = np.load(self.path / "windows.npy", mmap_mode="r")
        self.kind = meta["search"]["kind"]
        self._ann = None
        self._row_of: dict[str, int] | None = None
        adapter_path = self.path / "text_adapter.safetensors"
        self.adapter = None
        if adapter_path.is_file():
            from safetensors.numpy import load_file

            self.adapter = load_file(str(adapter_path))

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def random_init(self) -> bool:
        """Whether the index's CLIP is the seeded random init (its words mean nothing)."""
        from muse_pipeline.encoders.weights_identity import RANDOM_INIT

        return self.meta["clip"].get("weights_id") == RANDOM_INIT

    def row_of(self, video_id: str) -> int | None:
        if self._row_of is None:
            self._row_of = {vid: i for i, vid in enumerate(self.ids.all())}
        return self._row_of.get(video_id)

    def media_path(self, row: int) -> Path:
        """The video file of a row: the absolute path stored at index time, else the path relative to
        the index folder (an index moved together with its videos)."""
        stored = Path(self.paths[row])
        if stored.exists():
            return stored
        rel = self.path / self.relpaths[row]
        return rel if rel.exists() else stored

    def _ann_index(self):
        if self._ann is None:
            self._ann = import_faiss().read_index(str(self.path / "ann.faiss"))
            params = self.meta["search"]["params"]
            set_search_param(self._ann, self.kind, params.get("efSearch", params.get("nprobe", 1)))
        return self._ann

    def load(self) -> VideoIndex:
        """Touch what the first query would load (the faiss index), e.g. when a server starts."""
        if self.kind != "exact":
            self._ann_index()
        return self

    def search_vectors(self, queries: np.ndarray, k: int, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], rows [Q, k']) with k' = min(k, N), best first; queries [Q, D] unit rows.
        An approximate index may return row -1 where it found fewer than k'."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if exact or self.kind == "exact":
            # One query: a matrix-vector product + partition beats faiss's threaded kNN; a batch:
            # faiss's blocked BLAS + heaps win (benchmarks/search.py).
            if len(q) == 1:
                return exact_topk_single(self.embeddings, q, k)
            return exact_topk_fast(self.embeddings, q, k)
        scores, rows = self._ann_index().search(q, min(k, len(self)))
        return scores, rows.astype(np.int64)

    def hit(self, row: int, score: float, rank: int) -> dict[str, Any]:
        """One search hit: {rank, id, path, start (0.0 if unset), end (None if unset), score (6
        decimals), caption (None if empty)}."""
        start, end = (float(x) for x in self.windows[row])
        return {
            "rank": rank,
            "id": self.ids[row],
            "path": self.paths[row],
            "start": 0.0 if math.isnan(start) else start,
            "end": None if math.isnan(end) else end,
            "score": round(float(score), 6),
            "caption": self.captions[row] or None,
        }
