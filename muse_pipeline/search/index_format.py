"""One index generation folder: the on-disk format of `muse index`, its writer and its reader.

An index holds everything a query needs, so that searching never opens the run or the cache again
and the folder can be moved or copied. `muse index` writes it as one immutable generation folder
of an index root (`generations.py`: `ROOT/CURRENT` names the current `ROOT/gen-NNNNNN/`); an index
written before generations existed is this folder directly (generation "0"):

```
GEN/
  index.json               see below
  embeddings.npy           [N, D] float32, L2-normalised rows
  ids.bin/.off.npy         [N] row ids, unique (UTF-8 blob + [N+1] int64 offsets)
  sources.bin/.off.npy     [N] id of the file each row comes from (v3; v2: the row id)
  paths.bin/.off.npy       [N] absolute source paths at index time
  relpaths.bin/.off.npy    [N] the same paths relative to GEN (used when the absolute path is gone)
  captions.bin/.off.npy    [N] first caption of each video ("" when the dataset has none)
  windows.npy              [N, 2] float64 clip window (start, end) in seconds; NaN = not set
  durations.npy            [N] float64 duration of the row's file in seconds; NaN = unknown (v3)
  cache_rows.npy           [N] int64 the cache row each index row was embedded from (v3; for updates)
  text_adapter.safetensors the run's text adapter (fc.weight [D, D], fc.bias [D] float32); absent = identity
  ann.faiss                the approximate index (only when search.kind != "exact")
  text-encoder/            the CLIP text tower queries run (`text_encoder`; written by `muse index`
                           once per index root; absent in older indexes: queries then use open_clip)
```

A string column NAME is `NAME.bin` (the UTF-8 strings back to back) and `NAME.off.npy` ([N+1]
int64, string i = bin[off[i]:off[i+1]]).

Reading (`VideoIndex`) loads every array into memory, never memory-maps: a file replaced or truncated
under a running server cannot crash it. Every file is checked on open (present, parseable, N rows);
a damaged one is an IndexFormatError naming the file and saying to rebuild with `--overwrite`.

A hit's moment (`VideoIndex.hit`): start = the window's start if set else 0.0; end = the window's end
if set else the file's duration (None only when that is unknown too).

index.json keys: format = INDEX_FORMAT ("muse-index"), format_version = INDEX_VERSION (3; 2 is read), n_videos,
dim, metric ("cosine"), search = {kind: exact | hnsw | ivf-flat, params: build parameters plus, when
approximate, the tuned efSearch | nprobe, "recall_at_<k>" and tuning_queries, build_seconds}, clip =
{model, weights_id, and pretrained (an open_clip tag) or weights_file {path, size, mtime_ns}; see
`query.clip_record`}, words (query tokens), has_captions, created (UTC ISO 8601), and whatever the
builder adds (`build_index`: head, head_config, which, run_name, cache_name, dataset, identity,
frames, update).

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
INDEX_VERSION = 3
READABLE_VERSIONS = (2, 3)
REBUILD = "rebuild it with `muse index ... --overwrite`"


class IndexFormatError(UserError, ValueError):
    """A missing, foreign or damaged index, or a text side that cannot be rebuilt."""


def write_string_column(folder: Path, name: str, values: Sequence[str]) -> None:
    """Write `values` as the string column `name` of `folder` (NAME.bin + NAME.off.npy)."""
    encoded = [str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    (folder / f"{name}.bin").write_bytes(b"".join(encoded))
    np.save(folder / f"{name}.off.npy", offsets)


def _damaged(path: Path, what: str) -> IndexFormatError:
    return IndexFormatError(f"index file {path} {what}; {REBUILD}")


def load_array(path: Path, *, rows: int | None = None, ndim: int | None = None) -> np.ndarray:
    """The .npy file at `path` read into memory; a missing, unreadable or misshapen file (not `ndim`
    dimensions, or not `rows` rows) is an IndexFormatError naming it."""
    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = "is empty" if path.stat().st_size == 0 else f"is damaged ({exc})"
        raise _damaged(path, reason) from None
    if (ndim is not None and arr.ndim != ndim) or (rows is not None and arr.shape[0] != rows):
        raise _damaged(path, f"has shape {arr.shape}, not {rows} rows of {ndim} dimensions")
    return arr


class StringColumn:
    """Read side of `write_string_column`, read into memory: column[i] -> str, decoded on demand."""

    def __init__(self, folder: Path, name: str, rows: int | None = None) -> None:
        self.offsets = load_array(folder / f"{name}.off.npy", ndim=1,
                                  rows=None if rows is None else rows + 1).astype(np.int64)
        blob = folder / f"{name}.bin"
        if not blob.is_file():
            raise _damaged(blob, "is missing")
        self._blob = blob.read_bytes()
        offsets = self.offsets
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(self._blob) or np.any(np.diff(offsets) < 0):
            raise _damaged(blob, f"does not match {name}.off.npy (truncated or replaced)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._blob[lo:hi].decode("utf-8")

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
    sources: Sequence[str] | None = None,
    durations: np.ndarray | None = None,
    cache_rows: np.ndarray | None = None,
    adapter: dict[str, np.ndarray] | None = None,
    plan: SearchPlan | None = None,
    tuning_queries: np.ndarray | None = None,
    ann: tuple[Any, dict[str, Any]] | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an index folder (the module docstring's format) from unit rows `embeddings` [N, D].

    sources default to the ids, durations to NaN, cache_rows to -1. tuning_queries [Q, D]: the queries
    an approximate index is tuned on (default: its first rows). ann: (a faiss index over exactly these
    rows, its tuned params) to store instead of building one (an updated index). Refuses an existing
    `out` unless `overwrite`. Returns `out`.
    """
    out = Path(out)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = emb.shape
    if not (len(ids) == len(paths) == n):
        raise ValueError(f"ids ({len(ids)}), paths ({len(paths)}) and embeddings ({n}) differ in length")
    if len(set(ids)) != n:
        raise ValueError("video ids are not unique")
    captions = list(captions) if captions is not None else [""] * n
    sources = list(sources) if sources is not None else list(ids)
    windows = np.full((n, 2), np.nan) if windows is None else np.asarray(windows, dtype=np.float64)
    durations = np.full(n, np.nan) if durations is None else np.asarray(durations, dtype=np.float64)
    cache_rows = np.full(n, -1, np.int64) if cache_rows is None else np.asarray(cache_rows, dtype=np.int64)
    if not (len(sources) == len(captions) == len(windows) == len(durations) == len(cache_rows) == n):
        raise ValueError("sources, captions, windows, durations and cache_rows need one value per row")
    plan = plan or plan_search(n)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "embeddings.npy", emb)
    np.save(tmp / "windows.npy", windows)
    np.save(tmp / "durations.npy", durations)
    np.save(tmp / "cache_rows.npy", cache_rows)
    out_abs = out.resolve()
    write_string_column(tmp, "ids", ids)
    write_string_column(tmp, "sources", sources)
    write_string_column(tmp, "paths", paths)
    write_string_column(tmp, "relpaths", [os.path.relpath(p, out_abs) if os.path.isabs(p) else p for p in paths])
    write_string_column(tmp, "captions", captions)
    if adapter is not None:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in adapter.items()},
                  str(tmp / "text_adapter.safetensors"))
    search: dict[str, Any] = {"kind": plan.kind, "params": dict(plan.params)}
    if plan.kind != "exact":
        if ann is None:
            t0 = time.perf_counter()
            index = build_ann(emb, plan)
            search["build_seconds"] = round(time.perf_counter() - t0, 2)
            queries = tuning_queries if tuning_queries is not None and len(tuning_queries) else emb[:TUNING_QUERIES]
            search["params"].update(tune_ann(index, plan.kind, emb, queries))
        else:
            index, params = ann
            if index.ntotal != n:
                raise ValueError(f"the faiss index holds {index.ntotal} rows, the index {n}")
            search["params"].update(params)
        import_faiss().write_index(index, str(tmp / "ann.faiss"))
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


def read_meta(folder: Path) -> dict[str, Any]:
    """index.json of a generation folder, checked for format and version (IndexFormatError)."""
    meta_path = folder / "index.json"
    if not meta_path.is_file():
        if (folder / "zarr.json").is_file():
            raise IndexFormatError(f"{folder} is an index of an older format; rebuild it with `muse index`")
        raise IndexFormatError(f"index {folder} does not exist or is not a muse index "
                               "(no index.json); build it with `muse index`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise _damaged(meta_path, f"is not valid JSON ({exc})") from None
    if meta.get("format") != INDEX_FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise IndexFormatError(f"{folder} is not a muse index of version {INDEX_VERSION} "
                               f"(format {meta.get('format')!r} v{meta.get('format_version')}); rebuild it")
    for key in ("n_videos", "dim", "search", "clip", "words"):
        if key not in meta:
            raise _damaged(meta_path, f"lacks the key {key!r}")
    return meta


class VideoIndex:
    """An opened index generation folder: its arrays read into memory, metadata, the faiss index if any.

    Opening reads every file once and checks it (see the module docstring): no torch, no run, no CLIP.
    A folder that is not an index of a readable format is an IndexFormatError, so is a damaged file.
    """

    def __init__(self, path: Path | str, generation: str = "0") -> None:
        self.path = Path(path).resolve()
        self.generation = generation
        meta = read_meta(self.path)
        self.meta = meta
        n = int(meta["n_videos"])
        self.embeddings = load_array(self.path / "embeddings.npy", rows=n, ndim=2)
        if self.embeddings.dtype != np.float32 or self.embeddings.shape[1] != int(meta["dim"]):
            raise _damaged(self.path / "embeddings.npy",
                           f"holds {self.embeddings.dtype} [{n}, {self.embeddings.shape[1]}], not float32 "
                           f"[{n}, {meta['dim']}]")
        self.ids = StringColumn(self.path, "ids", n)
        self.paths = StringColumn(self.path, "paths", n)
        self.relpaths = StringColumn(self.path, "relpaths", n)
        self.captions = StringColumn(self.path, "captions", n)
        self.windows = load_array(self.path / "windows.npy", rows=n, ndim=2)
        v3 = meta["format_version"] >= 3
        self.sources = StringColumn(self.path, "sources", n) if v3 else self.ids
        self.durations = load_array(self.path / "durations.npy", rows=n, ndim=1) if v3 else np.full(n, np.nan)
        self.cache_rows = load_array(self.path / "cache_rows.npy", rows=n, ndim=1) if v3 else None
        self.kind = meta["search"]["kind"]
        self._ann = None
        self._row_of: dict[str, int] | None = None
        adapter_path = self.path / "text_adapter.safetensors"
        self.adapter = None
        if adapter_path.is_file():
            from safetensors.numpy import load_file

            try:
                self.adapter = load_file(str(adapter_path))
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise _damaged(adapter_path, f"cannot be read ({exc})") from None

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

    def ann_index(self):
        """The faiss index (approximate search), read into memory on first use."""
        if self._ann is None:
            ann_path = self.path / "ann.faiss"
            if not ann_path.is_file():
                raise _damaged(ann_path, "is missing")
            try:
                self._ann = import_faiss().read_index(str(ann_path))
            except RuntimeError as exc:
                raise _damaged(ann_path, f"cannot be read ({str(exc).splitlines()[0]})") from None
            if self._ann.ntotal != len(self):
                raise _damaged(ann_path, f"holds {self._ann.ntotal} rows, not {len(self)}")
            params = self.meta["search"]["params"]
            set_search_param(self._ann, self.kind, params.get("efSearch", params.get("nprobe", 1)))
        return self._ann

    def load(self) -> VideoIndex:
        """Read what the first query would load (the faiss index), e.g. when a server starts."""
        if self.kind != "exact":
            self.ann_index()
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
        scores, rows = self.ann_index().search(q, min(k, len(self)))
        return scores, rows.astype(np.int64)

    def moment(self, row: int) -> tuple[float, float | None]:
        """(start, end) seconds of a row: the window where set, else 0.0 and the file's duration."""
        start, end = (float(x) for x in self.windows[row])
        duration = float(self.durations[row])
        start = 0.0 if math.isnan(start) else start
        if math.isnan(end):
            end = duration
        return start, None if math.isnan(end) else end

    def hit(self, row: int, score: float, rank: int) -> dict[str, Any]:
        """One search hit: {rank, id, source, path, start, end (None only if the duration is unknown),
        score (6 decimals), caption (None if empty), missing (the file is gone)}."""
        start, end = self.moment(row)
        return {
            "rank": rank,
            "id": self.ids[row],
            "source": self.sources[row],
            "path": self.paths[row],
            "start": start,
            "end": end,
            "score": round(float(score), 6),
            "caption": self.captions[row] or None,
            "missing": not self.media_path(row).is_file(),
        }
