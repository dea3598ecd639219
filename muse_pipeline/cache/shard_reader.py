"""Reading rows of /videos/tokens: the fast raw shard-file reader and its zarr-slice reference.

`read_rows_sliced(array, rows, out)` is the obviously-correct path: one basic zarr slice per contiguous
run of rows (never orthogonal indexing: over a sharded array zarr-python builds a per-element coordinate
selection inside each shard, zarr-python issue #3829). `ShardFileReader.read_into` fills the same
`out` straight from the shard files with one pread per video; tests compare the two bit for bit.

Both take sorted, unique int64 `rows` and a C-contiguous float16 `out` [len(rows), T, L, D].
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

EMPTY_CHUNK = 2**64 - 1  # offset and length of an inner chunk that was never written (reads as fill value 0)


def runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted unique rows -> [(lo, hi, position of lo in rows)] for each contiguous run."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[e - 1]) + 1, int(a)) for a, e in zip(starts, ends, strict=True)]


def runs_cover(indices: np.ndarray) -> bool:
    """True when sorted unique `indices` form one contiguous range."""
    return indices.size == 0 or int(indices[-1]) - int(indices[0]) + 1 == indices.size


def read_rows_sliced(array: Any, rows: np.ndarray, out: np.ndarray) -> None:
    """The reference read: `out[j] = array[rows[j]]`, one basic zarr slice per run of rows."""
    for lo, hi, at in runs(rows):
        out[at : at + hi - lo] = array[lo:hi]


class ShardFileReader:
    """Reads whole inner chunks of /videos/tokens straight from the shard files of a local store.

    The layout is zarr v3's `sharding_indexed` codec as `schema.create_store` writes it: one file per
    shard at `c/<k>/0/0/0`, inner chunks of one video ([1, T, L, D]) encoded with `bytes` (little
    endian) and optionally `blosc`; at the end of the file the index, [S, 1, 1, 1, 2] little-endian
    uint64 (offset, nbytes) per inner chunk ((2^64-1, 2^64-1) = not written), then its crc32c. Each
    video is one pread into the destination (uncompressed) or one pread plus a blosc decode into it:
    no per-call zarr machinery. `open` returns None for any other layout or store (then the caller
    uses `read_rows_sliced`)."""

    def __init__(self, root: Path, chunk_bytes: int, blosc: bool) -> None:
        self.root = root
        self.chunk_bytes = chunk_bytes
        self.blosc = blosc
        self.checksum = True
        self._index: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    @classmethod
    def open(cls, root: Path) -> ShardFileReader | None:
        """A reader for the tokens array stored at `root`, or None where the layout is not the one above."""
        try:
            meta = json.loads((root / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs", [])
        key = meta.get("chunk_key_encoding", {})
        if (
            len(codecs) != 1
            or codecs[0].get("name") != "sharding_indexed"
            or meta.get("data_type") != "float16"
            or key.get("name") != "default"
            or key.get("configuration", {}).get("separator", "/") != "/"
        ):
            return None
        conf = codecs[0].get("configuration", {})
        shape = list(meta["shape"])
        inner = [c.get("name") for c in conf.get("codecs", [])]
        index = [c.get("name") for c in conf.get("index_codecs", [])]
        if (
            conf.get("index_location", "end") != "end"
            or list(conf.get("chunk_shape", [])) != [1, *shape[1:]]
            or inner not in (["bytes"], ["bytes", "blosc"])
            or conf["codecs"][0].get("configuration", {}).get("endian", "little") != "little"
            or index not in (["bytes"], ["bytes", "crc32c"])
            or conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little"
            or not (root / "c").is_dir()
        ):
            return None
        reader = cls(root, int(np.prod(shape[1:])) * 2, inner == ["bytes", "blosc"])
        reader.checksum = index == ["bytes", "crc32c"]
        return reader

    def _shard_index(self, k: int, fd: int, per_shard: int) -> np.ndarray:
        """[S, 2] uint64 (offset, nbytes) of shard k, cached while the file is unchanged."""
        st = os.fstat(fd)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._index.get(k)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        size = per_shard * 16 + (4 if self.checksum else 0)
        raw = os.pread(fd, size, st.st_size - size)
        if len(raw) != size:
            raise OSError(f"{self.root}: shard {k} is truncated ({st.st_size} bytes)")
        if self.checksum:
            _check_crc32c(raw[:-4], raw[-4:], self.root, k)
        table = np.frombuffer(raw[: per_shard * 16], dtype="<u8").reshape(per_shard, 2)
        self._index[k] = (stamp, table)
        return table

    def read_into(self, rows: np.ndarray, out: np.ndarray, per_shard: int) -> None:
        """`out[j]` = stored row `rows[j]` (zeros where never written); `per_shard` = videos per shard."""
        flat = out.reshape(out.shape[0], -1).view(np.uint8)  # one byte row per video
        shards = rows // per_shard
        for k in np.unique(shards):
            at = np.flatnonzero(shards == k)
            path = self.root / "c" / str(int(k)) / "0" / "0" / "0"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # shard never written: fill value
                out[at] = 0
                continue
            try:
                table = self._shard_index(int(k), fd, per_shard)
                for j in at:
                    offset, nbytes = (int(x) for x in table[int(rows[j]) - int(k) * per_shard])
                    dest = flat[j]
                    if offset == EMPTY_CHUNK:
                        dest[:] = 0
                    elif self.blosc:
                        _blosc_into(os.pread(fd, nbytes, offset), dest, self.chunk_bytes)
                    else:
                        if nbytes != self.chunk_bytes or os.preadv(fd, [dest], offset) != nbytes:
                            raise OSError(f"{path}: chunk of video {int(rows[j])} is damaged")
            finally:
                os.close(fd)


def _blosc_into(src: bytes, dest: np.ndarray, nbytes: int) -> None:
    from numcodecs import blosc

    # blosc frame header: bytes 4..8 = uncompressed size (little-endian uint32)
    if dest.nbytes != nbytes or len(src) < 16 or int.from_bytes(src[4:8], "little") != nbytes:
        raise OSError(f"a compressed chunk of the feature cache does not decode to {nbytes} bytes (damaged)")
    blosc.decompress(src, dest)


def _check_crc32c(data: bytes, stored: bytes, root: Path, k: int) -> None:
    try:
        import google_crc32c  # zarr's own dependency for this checksum
    except ImportError:  # pragma: no cover - zarr installs it
        return
    if np.uint32(google_crc32c.value(data)).tobytes() != stored:
        raise OSError(f"{root}: the index of shard {k} fails its crc32c checksum (damaged file)")
