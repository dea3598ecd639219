"""FeatureCache: open, read and write the Zarr v3 feature cache (layout: `schema.py`, docs/ARCHITECTURE.md).

Writers. Shard k of videos (rows `shard_range(k)`) lives in exactly one file per array
(`videos/tokens/c/k/0/0/0`, `videos/mask/c/k/0`, `videos/done/c/k`), and each write to a shard is a
read-modify-write of those files. So:

- ALL writes to one shard must come from ONE process (the extractor gives each task whole shards);
  two writers in a shard lose each other's rows. Different shards can be written concurrently.
- Root attributes (the ledger, `ledger.py`) and the text arrays are written by the client process only.
- Zarr rewrites the whole shard file for any partial write, so writing a shard video by video costs
  O(S^2) bytes: `write_shard_videos` writes a contiguous range of one shard at once (extraction writes
  whole shards; resume granularity is one shard).
- Within a shard write, tokens and mask are written before `done`, so a crash never leaves a video
  marked done without its tokens.

Reads of video tokens go through `shard_reader.py` (raw shard files where the layout allows, zarr
slices otherwise).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from muse_pipeline.cache import growth, ledger
from muse_pipeline.cache.compat import FingerprintMismatch, fingerprint_paths_differing, normalise
from muse_pipeline.cache.schema import (
    CACHED,
    FAILED,
    FORMAT,
    FORMAT_VERSION,
    PENDING,
    RETIRED,
    ROW_CHUNK,
    TOKEN_CODECS,
    TOKEN_COMPRESSION,
    RowFacts,
    StoreLayout,
    check_positive,
    create_store,
    default_videos_per_shard,
    is_cache_dir,
    remove_cache,
    row_values,
)
from muse_pipeline.cache.shard_reader import ShardFileReader, read_rows_sliced, runs, runs_cover
from muse_pipeline.data.base import SPLITS, DatasetIndex

# Re-exported: importers take these from the store (extract's text chunk, the HDF5 export, tests).
__all__ = [
    "CACHED", "FAILED", "FORMAT", "FORMAT_VERSION", "PENDING", "RETIRED", "ROW_CHUNK", "RowFacts", "TOKEN_CODECS", "TOKEN_COMPRESSION",
    "FeatureCache", "FingerprintMismatch", "default_videos_per_shard",
]


class FeatureCache:
    """A Zarr v3 feature cache opened for reading ("r") or writing ("r+")."""

    def __init__(self, path: Path | str, mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no feature cache at {self.path}")
        if not is_cache_dir(self.path):
            raise ValueError(f"{self.path} is not a muse feature cache (no zarr.json with format={FORMAT!r})")
        self.mode = mode
        self._root = zarr.open_group(str(self.path), mode=mode, zarr_format=3)
        version = self._root.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: cache format_version {version} is not supported (need {FORMAT_VERSION})"
            )
        v, t = self._root["videos"], self._root["texts"]
        self._tokens, self._mask, self._done = v["tokens"], v["mask"], v["done"]
        self._t_tokens, self._t_emb, self._t_done = t["tokens"], t["embeddings"], t["done"]
        self._videos, self._texts = v, t
        _, frames, num_tokens, dim = self._tokens.shape
        n = self._done.shape[0]  # the rows that exist (a growing store commits new rows with `done`)
        self.n_videos, self.frames, self.num_tokens, self.dim = int(n), int(frames), int(num_tokens), int(dim)
        self.n_texts, self.words = (int(x) for x in self._t_tokens.shape)
        self.videos_per_shard = int(self._done.chunks[0])
        self._meta: dict[str, list[Any]] = {}
        self._mask_all: np.ndarray | None = None
        self._shard_files: ShardFileReader | bool | None = None  # None: not probed yet; False: not usable

    # ------------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: Path | str,
        index: DatasetIndex,
        *,
        frames: int,
        num_tokens: int,
        dim: int,
        words: int,
        fingerprint: Mapping[str, Any],
        videos_per_shard: int | None = None,
        overwrite: bool = False,
        text_tokens: np.ndarray | None = None,
        compression: str | None = TOKEN_COMPRESSION,
        facts: RowFacts | None = None,
        growing: bool = False,
    ) -> FeatureCache:
        """Create an empty cache for `index` (all videos pending) and open it for writing.

        `facts`: each row's file duration and state (schema.RowFacts; unknown when None).
        `growing`: rows will be appended later (`append_generation`): S is not clipped to N, so the
        shards of later generations are as large as the first's.
        `text_tokens` int32 [M, W] (optional): caption token ids, written now; embeddings come later.
        An existing cache at `path` is an error unless `overwrite` (which deletes it first).
        `compression`: codec of the video tokens, None or "zstd" (see TOKEN_COMPRESSION).
        The store is built under a temporary name and renamed, so a crash never leaves half a cache.
        """
        path = Path(path)
        n, m = len(index.videos), len(index.captions)
        if n == 0:
            raise ValueError(f"dataset {index.name!r} has no videos to cache")
        check_positive(frames=frames, num_tokens=num_tokens, dim=dim, words=words)
        if videos_per_shard is None:  # a growing store's later rows count too: ~256 MB shards
            videos_per_shard = default_videos_per_shard(2**62 if growing else n, frames, num_tokens, dim)
        check_positive(videos_per_shard=videos_per_shard)
        if not growing:
            videos_per_shard = min(videos_per_shard, n)
        if compression not in TOKEN_CODECS:
            raise ValueError(f"compression must be one of {TOKEN_CODECS}, got {compression!r}")
        if text_tokens is not None:
            text_tokens = np.asarray(text_tokens)
            if text_tokens.shape != (m, words):
                raise ValueError(f"text_tokens must be [{m}, {words}], got {text_tokens.shape}")
        try:
            fp = normalise(dict(fingerprint))
        except TypeError as e:
            raise TypeError(f"fingerprint must be JSON-serialisable: {e}") from None

        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass --overwrite to delete it and extract again")
            remove_cache(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)

        create_store(tmp, index, StoreLayout(frames, num_tokens, dim, words, videos_per_shard, compression, fp,
                                             text_tokens), facts)
        os.replace(tmp, path)
        return cls(path, mode="r+")

    @classmethod
    def open(cls, path: Path | str, mode: str = "r") -> FeatureCache:
        return cls(path, mode=mode)

    @classmethod
    def open_or_create(
        cls, path: Path | str, index: DatasetIndex, *, overwrite: bool = False, **layout: Any
    ) -> FeatureCache:
        """Reopen the cache at `path` for writing (resume) if it was built with the same fingerprint
        and layout, else `create(path, index, overwrite=overwrite, **layout)` (`layout`: create's
        keywords frames, num_tokens, dim, words, fingerprint, videos_per_shard, text_tokens,
        compression). A different existing cache raises `FingerprintMismatch` unless `overwrite`,
        which deletes it and starts again."""
        path = Path(path)
        if path.exists() and not overwrite:
            if not is_cache_dir(path):
                raise FileExistsError(f"{path} exists and is not a muse feature cache; choose another path")
            cache = cls(path, mode="r+")
            differing = fingerprint_paths_differing(
                cache.fingerprint, normalise(dict(layout["fingerprint"])), "fingerprint."
            )
            expected = {"n_videos": len(index.videos), "n_texts": len(index.captions),
                        **{k: layout[k] for k in ("frames", "num_tokens", "dim", "words")}}
            if layout.get("videos_per_shard") is not None:
                expected["videos_per_shard"] = min(layout["videos_per_shard"], len(index.videos))
            differing += [f"layout.{k}" for k, want in expected.items() if getattr(cache, k) != want]
            if not differing and cache.video_ids != [v.id for v in index.videos]:
                differing.append("videos.ids")
            if differing:
                raise FingerprintMismatch(path, differing)
            return cache
        return cls.create(path, index, overwrite=overwrite, **layout)

    # ----------------------------------------------------------------------------- properties
    @property
    def n_shards(self) -> int:
        return -(-self.n_videos // self.videos_per_shard)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Video rows [lo, hi) of shard k."""
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range [0, {self.n_shards})")
        lo = k * self.videos_per_shard
        return lo, min(lo + self.videos_per_shard, self.n_videos)

    def shard_of(self, i: int) -> int:
        return int(i) // self.videos_per_shard

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self._root.attrs["fingerprint"])

    @property
    def failures(self) -> list[dict[str, str]]:
        """{id, reason, ...} of each video whose latest extraction failed (ledger.py)."""
        return ledger.failures(self._root.attrs)

    def _strings(self, group: str, name: str) -> list[Any]:
        key = f"{group}/{name}"
        if key not in self._meta:
            self._meta[key] = self._root[key][:].tolist()
        return self._meta[key]

    @property
    def video_ids(self) -> list[str]:
        return self._strings("videos", "ids")

    @property
    def video_splits(self) -> list[str]:
        return self._strings("videos", "split")

    @property
    def video_paths(self) -> list[str]:
        return self._strings("videos", "paths")

    @property
    def captions(self) -> list[str]:
        return self._strings("texts", "captions")

    @property
    def text_splits(self) -> list[str]:
        return self._strings("texts", "split")

    @property
    def text_video_index(self) -> np.ndarray:
        """int32 [M]: the video row of each text."""
        return self._texts["video_index"][:]

    @property
    def has_windows(self) -> bool:
        """True for stores that record each clip's window (/videos/start, /videos/end)."""
        return "start" in self._videos and "end" in self._videos

    def read_windows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float64 [len(rows), 2]: (start, end) seconds of each video's clip; NaN where the clip is the whole
        video, and (NaN, NaN) for every row of a store made before /videos/start and /videos/end existed."""
        start = self._row_array("start", rows, np.nan).astype(np.float64)
        end = self._row_array("end", rows, np.nan).astype(np.float64)
        return np.stack([start, end], axis=1)

    @property
    def has_row_facts(self) -> bool:
        """True for stores that record each row's source file and its state (libraries that grow)."""
        return "source" in self._videos and "file_size" in self._videos

    def _row_array(self, name: str, rows: Sequence[int] | np.ndarray, fill: Any) -> np.ndarray:
        # the whole per-row array, read once per open (reopened rows: `_reload_rows` forgets it)
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_videos):
            raise IndexError(f"video indices out of range [0, {self.n_videos})")
        if name not in self._videos:  # a store made before this array existed
            return np.full(idx.size, fill)
        key = f"videos/{name}"
        if key not in self._meta:
            self._meta[key] = self._videos[name][:]
        return np.asarray(self._meta[key])[idx]

    def read_durations(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float64 [len(rows)]: the length in seconds of each row's file (NaN unknown or an old store)."""
        return self._row_array("duration", rows, np.nan).astype(np.float64)

    def read_sources(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The id of the file each row comes from (= the row id for whole-file rows and old stores)."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if "source" not in self._videos:
            ids = self.video_ids
            return [ids[i] for i in idx]
        return [str(s) for s in self._row_array("source", idx, "")]

    def read_grid_steps(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float64 [len(rows)]: seconds between an auto window's frames; NaN for clip-protocol rows."""
        return self._row_array("grid_step", rows, np.nan).astype(np.float64)

    def read_file_states(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64 [len(rows), 2]: (size, mtime_ns) of each row's file when it was planned; -1 unknown."""
        size = self._row_array("file_size", rows, -1).astype(np.int64)
        mtime = self._row_array("file_mtime_ns", rows, -1).astype(np.int64)
        return np.stack([size, mtime], axis=1)

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.path)!r}, mode={self.mode!r}, videos={self.n_videos}, texts={self.n_texts}, "
            f"T={self.frames}, L={self.num_tokens}, D={self.dim}, W={self.words}, S={self.videos_per_shard})"
        )

    # --------------------------------------------------------------------------- video writes
    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise PermissionError(f"{self.path} is open read-only; open it with mode='r+' to write")

    def write_shard_videos(self, lo: int, tokens: np.ndarray, mask: np.ndarray, done: np.ndarray) -> None:
        """Write videos [lo, lo + b) now: tokens f16 [b, T, L, D], mask uint8 [b, T], done uint8 [b].

        The range must lie within one shard."""
        self._require_writable()
        tokens = np.asarray(tokens, dtype=np.float16)
        mask, done = np.asarray(mask, dtype=np.uint8), np.asarray(done, dtype=np.uint8)
        b = tokens.shape[0]
        if (
            tokens.shape != (b, self.frames, self.num_tokens, self.dim)
            or mask.shape != (b, self.frames)
            or done.shape != (b,)
        ):
            raise ValueError(
                f"expected tokens [b, {self.frames}, {self.num_tokens}, {self.dim}], mask [b, {self.frames}], done [b]; "
                f"got {tokens.shape}, {mask.shape}, {done.shape}"
            )
        hi = lo + b
        if b == 0 or lo < 0 or hi > self.n_videos:
            raise IndexError(f"rows [{lo}, {hi}) out of range [0, {self.n_videos}) or empty")
        if self.shard_of(lo) != self.shard_of(hi - 1):
            raise ValueError(
                f"rows [{lo}, {hi}) span shards {self.shard_of(lo)}..{self.shard_of(hi - 1)}; write one shard at a time"
            )
        if done.max(initial=0) > RETIRED:
            raise ValueError("done values must be 0 (pending), 1 (cached), 2 (failed) or 3 (retired)")
        self._tokens[lo:hi] = tokens
        self._mask[lo:hi] = mask
        self._done[lo:hi] = done  # last: a video is done only once its tokens are stored

    # ------------------------------------------------------------------------- a growing store
    @property
    def generations(self) -> list[dict[str, Any]]:
        """The `generations` root attribute (growth.py): one record per run that changed the rows."""
        return list(self._root.attrs.get("generations", []))

    def append_generation(self, index: DatasetIndex, facts: RowFacts | None = None) -> tuple[int, int]:
        """Append `index.videos` as pending rows at the next shard boundary (growth.py); returns
        their rows [lo, hi). Client process only, while no extraction task runs."""
        self._require_writable()
        lo, hi = growth.append_rows(self._videos, self.n_videos, self.videos_per_shard, row_values(index, facts))
        self._reload_rows()
        return lo, hi

    def retire(self, rows: Sequence[int] | np.ndarray) -> None:
        """Mark `rows` RETIRED: no reader uses them again (growth.py)."""
        self._require_writable()
        growth.retire_rows(self._videos, np.asarray(rows, dtype=np.int64))
        self._reload_rows()

    def record_generation(self, record: Mapping[str, Any], fingerprint: Mapping[str, Any] | None = None) -> None:
        """Append a generation record (and replace the fingerprint, whose row counts changed)."""
        self._require_writable()
        self._root.attrs["generations"] = [*self.generations, normalise(dict(record))]
        if fingerprint is not None:
            self._root.attrs["fingerprint"] = normalise(dict(fingerprint))

    def set_text_videos(self, video_index: np.ndarray) -> None:
        """Point the texts at other video rows (a changed file's captions follow its new rows)."""
        self._require_writable()
        video_index = np.asarray(video_index, dtype=np.int32)
        if video_index.shape != (self.n_texts,):
            raise ValueError(f"video_index must be [{self.n_texts}], got {video_index.shape}")
        if self.n_texts:
            self._texts["video_index"][:] = video_index

    def _reload_rows(self) -> None:
        # zarr array handles keep the shape they were opened with: open them again after a resize
        v = self._root["videos"]
        self._videos, self._tokens, self._mask, self._done = v, v["tokens"], v["mask"], v["done"]
        self.n_videos = int(self._done.shape[0])
        self._meta.clear()
        self._mask_all = None
        self._shard_files = None

    # ---------------------------------------------------------------------------- text writes
    def write_texts(
        self, lo: int, token_ids: np.ndarray | None = None, embeddings: np.ndarray | None = None
    ) -> None:
        """Write rows [lo, lo + m) of the texts: token ids int32 [m, W] and/or embeddings f16 [m, D]
        (which marks those texts done). Client process only."""
        self._require_writable()
        if token_ids is None and embeddings is None:
            raise ValueError("write_texts needs token_ids and/or embeddings")
        m = None
        if token_ids is not None:
            token_ids = np.asarray(token_ids)
            m = token_ids.shape[0]
            if token_ids.shape != (m, self.words):
                raise ValueError(f"token_ids must be [m, {self.words}], got {token_ids.shape}")
        if embeddings is not None:
            embeddings = np.asarray(embeddings, dtype=np.float16)
            if m is not None and embeddings.shape[0] != m:
                raise ValueError(f"token_ids has {m} rows, embeddings {embeddings.shape[0]}")
            m = embeddings.shape[0]
            if embeddings.shape != (m, self.dim):
                raise ValueError(f"embeddings must be [m, {self.dim}], got {embeddings.shape}")
        assert m is not None
        if lo < 0 or lo + m > self.n_texts:
            raise IndexError(f"text rows [{lo}, {lo + m}) out of range [0, {self.n_texts})")
        if m == 0:
            return
        if token_ids is not None:
            self._t_tokens[lo : lo + m] = token_ids.astype(np.int32)
        if embeddings is not None:
            self._t_emb[lo : lo + m] = embeddings
            self._t_done[lo : lo + m] = 1

    def add_failures(self, failures: Iterable[Mapping[str, Any]]) -> None:
        """Append {id, reason, ...} records to the failures ledger (client process only; see ledger.py)."""
        self._require_writable()
        ledger.add_failures(self._root.attrs, failures)

    @property
    def failure_history(self) -> list[dict[str, Any]]:
        """Earlier failure records of videos that were retried (oldest first)."""
        return ledger.failure_history(self._root.attrs)

    def retire_failures(self, ids: Iterable[str]) -> None:
        """Move the ledger records of `ids` to `failure_history` (they are being retried)."""
        self._require_writable()
        ledger.retire_failures(self._root.attrs, ids)

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """{id, warning} records of cached videos the decoder had to patch up (see decode.py)."""
        return ledger.warnings(self._root.attrs)

    def add_warnings(self, warnings: Iterable[Mapping[str, Any]]) -> None:
        """Record {id, warning} entries (client process only); a newer entry for an id replaces it."""
        self._require_writable()
        ledger.add_warnings(self._root.attrs, warnings)

    def mark_pending(self, indices: Sequence[int] | np.ndarray) -> None:
        """Set videos back to pending (done = 0, mask = 0) so that the next extraction redoes them.
        Only while no extraction task writes their shards (the extractor calls it before starting)."""
        self._require_writable()
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if idx.size == 0:
            return
        self._mask.oindex[idx] = np.zeros((idx.size, self.frames), np.uint8)
        self._done.oindex[idx] = np.zeros(idx.size, np.uint8)

    # ---------------------------------------------------------------------------------- reads
    def read_videos(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> tokens float16 [b, T, L, D], mask uint8 [b, T] in the order of `indices` (repeats ok).

        Each stored video is read once: whole inner chunks straight from the shard files where the
        layout allows (`shard_reader.ShardFileReader`), else one basic zarr slice per contiguous run of rows. Never
        orthogonal indexing: over a sharded array zarr-python builds a per-element coordinate
        selection inside each shard (zarr-python issue #3829), ~35x slower with GBs of temporaries.
        Reads what is stored."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_videos):
            raise IndexError(f"video indices out of range [0, {self.n_videos})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        tokens = np.empty((uniq.size, self.frames, self.num_tokens, self.dim), np.float16)
        mask = np.empty((uniq.size, self.frames), np.uint8)
        self.read_videos_into(uniq, tokens, mask)
        if uniq.size == idx.size and np.array_equal(uniq, idx):  # sorted, unique: already in order
            return tokens, mask
        return tokens[inverse], mask[inverse]

    def read_videos_into(self, rows: np.ndarray, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Read sorted, unique video `rows` into `tokens` (float16 [b, T, L, D], C-contiguous; e.g. a
        pinned tensor's numpy view) and `mask` (uint8 [b, T]) without intermediate copies."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        b = rows.size
        if tokens.shape != (b, self.frames, self.num_tokens, self.dim) or tokens.dtype != np.float16:
            raise ValueError(f"tokens must be float16 [{b}, {self.frames}, {self.num_tokens}, {self.dim}], "
                             f"got {tokens.dtype} {tokens.shape}")
        if not tokens.flags.c_contiguous:
            raise ValueError("tokens must be C-contiguous")
        if b and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.n_videos):
            raise ValueError(f"rows must be sorted, unique and in [0, {self.n_videos})")
        if b == 0:
            return
        if mask is not None:
            mask[...] = self._stored_mask(rows)
        if self._shard_files is None:
            self._shard_files = ShardFileReader.open(self.path / "videos" / "tokens") or False
        if self._shard_files:
            self._shard_files.read_into(rows, tokens, self.videos_per_shard)
        else:
            read_rows_sliced(self._tokens, rows, tokens)

    def _stored_mask(self, rows: np.ndarray) -> np.ndarray:
        # The whole mask is small (N x T bytes): a reader loads it once; a writer reads the runs.
        if self.mode == "r":
            if self._mask_all is None:
                self._mask_all = self._mask[:]
            return self._mask_all[rows]
        return np.concatenate([self._mask[lo:hi] for lo, hi, _ in runs(rows)])

    def read_done(self) -> np.ndarray:
        """uint8 [N]: 0 pending, 1 cached, 2 failed, 3 retired (as stored)."""
        return self._done[:]

    def read_text_done(self) -> np.ndarray:
        """uint8 [M]: 1 where the text embedding is stored."""
        return self._t_done[:]

    def read_text_tokens(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """-> int32 [m, W] (all texts when `indices` is None)."""
        return self._read_rows(self._t_tokens, indices)

    def read_text_embeddings(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """-> float16 [m, D] (all texts when `indices` is None)."""
        return self._read_rows(self._t_emb, indices)

    def read_texts(self, indices: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (token ids int32 [m, W], embeddings float16 [m, D])."""
        return self.read_text_tokens(indices), self.read_text_embeddings(indices)

    def _read_rows(self, arr: Any, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if indices is None:
            return arr[:]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= arr.shape[0]):
            raise IndexError(f"text indices out of range [0, {arr.shape[0]})")
        if idx.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = arr[int(uniq[0]) : int(uniq[-1]) + 1] if runs_cover(uniq) else arr.oindex[uniq]
        return rows if np.array_equal(uniq, idx) else rows[inverse]

    def split_indices(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """-> (video rows, text rows) of `split`, sorted int64 (RETIRED rows excluded)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        live = self._done[:] != RETIRED  # retired rows belong to no split
        videos = np.flatnonzero((np.array(self.video_splits, dtype=object) == split) & live).astype(np.int64)
        texts = np.flatnonzero(np.array(self.text_splits, dtype=object) == split).astype(np.int64)
        return videos, texts

    def pending_videos(self) -> np.ndarray:
        """Sorted int64 rows still to extract: stored done == 0."""
        return np.flatnonzero(self._done[:] == PENDING).astype(np.int64)

    def progress(self) -> dict[str, int]:
        """Stored counts: videos total / cached / failed / pending, texts total / done."""
        done = self._done[:]
        return {
            "videos": self.n_videos,
            "cached": int((done == CACHED).sum()),
            "failed": int((done == FAILED).sum()),
            "retired": int((done == RETIRED).sum()),
            "pending": int((done == PENDING).sum()),
            "texts": self.n_texts,
            "texts_done": int(self._t_done[:].sum()) if self.n_texts else 0,
        }
