"""The feature cache's on-disk layout: constants, the array specs, and building an empty store.

```
/                    attrs: format="muse-cache", format_version=1, fingerprint={...}, failures=[{id, reason}]
/videos/tokens       [N, T, L, D] float16   chunk (1,T,L,D), shard (S,T,L,D), raw (or blosc zstd)
/videos/mask         [N, T] uint8           1 = real frame; chunk = shard = (S, T)
/videos/done         [N] uint8              0 pending, 1 cached, 2 failed, 3 retired; chunk = shard = (S,)
/videos/ids, /videos/split, /videos/paths   [N] str
/videos/start, /videos/end                  [N] float64 clip window in seconds; NaN = whole video
/videos/duration                            [N] float64 the file's length in seconds; NaN unknown
/videos/source                              [N] str the id of the file the row comes from
/videos/grid_step                           [N] float64 s between an auto window's frames; NaN: clip protocol
/videos/file_size, /videos/file_mtime_ns    [N] int64 the file's state when the row was planned; -1 unknown
/texts/tokens [M, W] int32, /texts/embeddings [M, D] float16, /texts/video_index [M] int32,
/texts/split [M] str, /texts/captions [M] str, /texts/done [M] uint8
```

`/videos/start` and `/videos/end` are written at creation from each VideoItem's (start, end); stores
made before they existed lack them (readers then report NaN windows). The same holds for the row
facts (`RowFacts`: duration, source, grid step, file state): old stores read as NaN / the row id / -1.

RETIRED rows (done = 3) are rows no reader may use: a removed or changed file's rows, and the
padding slots before a generation's first row (appends start at a shard boundary, `store.py`).
Readers select done == 1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from muse_pipeline.data.base import DatasetIndex

FORMAT = "muse-cache"
FORMAT_VERSION = 1
# Target uncompressed size of one shard of /videos/tokens.
SHARD_BYTES = 256 * 1024 * 1024
# Rows per chunk of the text and string arrays: small enough to read a slice cheaply.
ROW_CHUNK = 65536
# Codec of /videos/tokens in new caches: None (raw float16) or "zstd" (blosc zstd-1 + byte shuffle).
# zstd saves a little space on CLIP float16 tokens but reads much slower (BENCHMARKS.md, "Cache I/O"),
# and reads are what the trainer waits on. Either is read by any zarr v3 client.
TOKEN_COMPRESSION: str | None = None
TOKEN_CODECS = (None, "zstd")

PENDING, CACHED, FAILED, RETIRED = 0, 1, 2, 3
# The per-row arrays beside ids/split/paths: name -> (dtype, fill value of rows that lack it).
ROW_FLOATS = {"start": np.nan, "end": np.nan, "duration": np.nan, "grid_step": np.nan}
ROW_INTS = {"file_size": -1, "file_mtime_ns": -1}
ROW_STRINGS = ("ids", "split", "paths", "source")


def check_positive(**values: int) -> None:
    """ValueError '<name> must be >= 1, got <value>' for the first value below 1 (frames, dims, ...)."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def default_videos_per_shard(n_videos: int, frames: int, num_tokens: int, dim: int) -> int:
    """Largest S with S * T * L * D * 2 bytes <= SHARD_BYTES, clipped to [1, N]."""
    per_video = frames * num_tokens * dim * 2
    return max(1, min(n_videos, SHARD_BYTES // per_video))


def is_cache_dir(path: Path) -> bool:
    """Whether `path` holds a zarr group whose attributes say format=FORMAT."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def remove_cache(path: Path) -> None:
    """Delete an existing cache; refuse to delete anything that is not one (or an empty dir)."""
    if path.is_dir() and (is_cache_dir(path) or not any(path.iterdir())):
        shutil.rmtree(path)
    else:
        raise FileExistsError(f"{path} exists and is not a muse feature cache; refusing to delete it")


@dataclass(frozen=True)
class RowFacts:
    """What a store records of each row's file beside its VideoItem: `duration` float64 [N] seconds
    (NaN unknown), `file_size` / `file_mtime_ns` int64 [N] (-1 unknown; a growing library compares
    them to find changed files)."""

    duration: np.ndarray
    file_size: np.ndarray
    file_mtime_ns: np.ndarray

    @classmethod
    def unknown(cls, n: int) -> RowFacts:
        return cls(np.full(n, np.nan), np.full(n, -1, np.int64), np.full(n, -1, np.int64))


def row_values(index: DatasetIndex, facts: RowFacts | None = None) -> dict[str, np.ndarray]:
    """Every per-row array of `index`'s videos (name -> values [N]), as stored."""
    facts = facts or RowFacts.unknown(len(index.videos))
    start, end = clip_windows(index)
    grid = np.array([np.nan if v.grid_step is None else float(v.grid_step) for v in index.videos], np.float64)
    return {
        "ids": _as_str_array(v.id for v in index.videos),
        "split": _as_str_array(v.split for v in index.videos),
        "paths": _as_str_array(str(v.path) for v in index.videos),
        "source": _as_str_array(v.source_id for v in index.videos),
        "start": start, "end": end, "grid_step": grid,
        "duration": np.asarray(facts.duration, np.float64),
        "file_size": np.asarray(facts.file_size, np.int64),
        "file_mtime_ns": np.asarray(facts.file_mtime_ns, np.int64),
    }


def create_row_arrays(videos, n: int, values: dict[str, np.ndarray] | None) -> None:
    """Create the per-row arrays of group `videos` with n rows, filled with `values` when given."""
    # at least 4096 rows per chunk: a store that grows from a few rows keeps few chunks
    row_chunk = (min(max(n, 4096), ROW_CHUNK),)
    for name in ROW_STRINGS:
        videos.create_array(name, shape=(n,), dtype=str, chunks=row_chunk, dimension_names=("video",))
    for names, dtype in ((ROW_FLOATS, "float64"), (ROW_INTS, "int64")):
        for name, fill in names.items():
            videos.create_array(name, shape=(n,), dtype=dtype, chunks=row_chunk, fill_value=fill,
                                dimension_names=("video",))
    if values is not None and n:
        for name, array in values.items():
            videos[name][:] = array


def clip_windows(index: DatasetIndex) -> tuple[np.ndarray, np.ndarray]:
    """(start [N], end [N]) float64 seconds of each video's clip; NaN where the VideoItem gives None."""
    start = np.array([np.nan if v.start is None else float(v.start) for v in index.videos], dtype=np.float64)
    end = np.array([np.nan if v.end is None else float(v.end) for v in index.videos], dtype=np.float64)
    return start, end


def _as_str_array(values: Iterable[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


@dataclass(frozen=True)
class StoreLayout:
    """A new store's validated geometry: T frames, L tokens, D dim, W words, S videos per shard (<= N),
    the tokens codec (None or "zstd"), the JSON-normalised fingerprint, optional text token ids [M, W]."""

    frames: int
    num_tokens: int
    dim: int
    words: int
    videos_per_shard: int
    compression: str | None
    fingerprint: dict
    text_tokens: np.ndarray | None = None


def create_store(path: Path, index: DatasetIndex, layout: StoreLayout, facts: RowFacts | None = None) -> None:
    """Write the empty layout above at `path` (which must not exist): all videos pending, texts not done,
    the per-row arrays (`row_values(index, facts)`) and captions filled; `layout.text_tokens` written
    when given."""
    frames, num_tokens, dim, words = layout.frames, layout.num_tokens, layout.dim, layout.words
    text_tokens = layout.text_tokens
    n, m = len(index.videos), len(index.captions)
    root = zarr.open_group(
        str(path),
        mode="w-",
        zarr_format=3,
        attributes={"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": dict(layout.fingerprint),
                    "failures": []},
    )
    s = layout.videos_per_shard
    videos = root.create_group("videos")
    videos.create_array(
        "tokens",
        shape=(n, frames, num_tokens, dim),
        dtype="float16",
        chunks=(1, frames, num_tokens, dim),
        shards=(s, frames, num_tokens, dim),
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle") if layout.compression else None,
        fill_value=0,
        dimension_names=("video", "frame", "token", "channel"),
    )
    videos.create_array(
        "mask", shape=(n, frames), dtype="uint8", chunks=(s, frames), fill_value=0, dimension_names=("video", "frame")
    )
    videos.create_array(
        "done", shape=(n,), dtype="uint8", chunks=(s,), fill_value=PENDING, dimension_names=("video",)
    )
    create_row_arrays(videos, n, row_values(index, facts))

    texts = root.create_group("texts")
    mc = max(1, min(m, ROW_CHUNK))
    tok = texts.create_array(
        "tokens", shape=(m, words), dtype="int32", chunks=(mc, words), fill_value=0, dimension_names=("text", "word")
    )
    texts.create_array(
        "embeddings", shape=(m, dim), dtype="float16", chunks=(mc, dim), fill_value=0,
        dimension_names=("text", "channel"),
    )
    vi = texts.create_array("video_index", shape=(m,), dtype="int32", chunks=(mc,), dimension_names=("text",))
    sp = texts.create_array("split", shape=(m,), dtype=str, chunks=(mc,), dimension_names=("text",))
    cap = texts.create_array("captions", shape=(m,), dtype=str, chunks=(mc,), dimension_names=("text",))
    texts.create_array("done", shape=(m,), dtype="uint8", chunks=(mc,), fill_value=0, dimension_names=("text",))
    if m:
        vi[:] = np.array([c.video_index for c in index.captions], dtype=np.int32)
        sp[:] = _as_str_array(c.split for c in index.captions)
        cap[:] = _as_str_array(c.text for c in index.captions)
        if text_tokens is not None:
            tok[:] = text_tokens.astype(np.int32)
