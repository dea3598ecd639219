"""What `muse index` costs per hour of video: a full (zero-shot) build, and an update after the
library changed, on a synthetic cache of ViT-B-32 shaped rows.

An hour of video is ROWS_PER_HOUR cache rows: extraction's default windows (30 s, stride 15 s) cut
an hour into 3600 / 15 = 240 overlapping moments (issue 16's contract; short clips are one row each,
so a library of short clips has fewer rows per hour). Each row is T x L x D float16 tokens (default
ViT-B-32 at 12 frames: 12 x 50 x 512, 600 KiB), random normal, written with `write_shard_videos`.

Measured, each the median of --repeats runs in this process (torch imported first, the cache in the
page cache after the first build):
- full build: `build_index(None, cache, out)` of every row (reads every token, zero-shot meanP,
  writes a generation);
- update: the same library after --new-fraction more rows were extracted and --retire rows retired;
  `build_index` on a copy of the first index publishes a second generation (new rows embedded,
  the rest copied);
- sizes on disk: the cache's tokens, one index generation.

    .venv/bin/python benchmarks/index_update.py --hours 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS_PER_HOUR = 240


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def synthetic_cache(path: Path, n: int, pending: int, frames: int, tokens: int, dim: int):
    """A cache of n rows; the last `pending` rows not extracted yet (done 0)."""
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data.base import DatasetIndex, VideoItem

    items = tuple(VideoItem(f"hour{i // ROWS_PER_HOUR}.mp4@{15 * (i % ROWS_PER_HOUR)}-{15 * (i % ROWS_PER_HOUR) + 30}",
                            Path(f"/library/hour{i // ROWS_PER_HOUR}.mp4"), "test") for i in range(n))
    fp = {"model": "ViT-B-32", "weights": "random-init", "dim": dim, "words": 32, "frames": frames,
          "dataset": "folder"}
    cache = FeatureCache.create(path, DatasetIndex("folder", Path("/library"), items, ()), frames=frames,
                                num_tokens=tokens, dim=dim, words=32, fingerprint=fp)
    rng = np.random.default_rng(0)
    for k in range(cache.n_shards):
        lo, hi = cache.shard_range(k)
        hi_done = min(hi, n - pending)
        if hi_done > lo:
            block = rng.normal(size=(hi_done - lo, frames, tokens, dim)).astype(np.float16)
            cache.write_shard_videos(lo, block, np.ones((hi_done - lo, frames), np.uint8),
                                     np.ones(hi_done - lo, np.uint8))
    return cache


def extract_more(cache, rows: np.ndarray, retire: np.ndarray) -> None:
    """Mark `rows` extracted (random tokens) and `retire` retired (done 3), as `muse extract` would."""
    import zarr

    rng = np.random.default_rng(1)
    for lo in np.unique([cache.shard_range(cache.shard_of(int(r)))[0] for r in rows]):
        mine = rows[(rows >= lo) & (rows < cache.shard_range(cache.shard_of(int(lo)))[1])]
        block = rng.normal(size=(len(mine), cache.frames, cache.num_tokens, cache.dim)).astype(np.float16)
        cache.write_shard_videos(int(mine[0]), block, np.ones((len(mine), cache.frames), np.uint8),
                                 np.ones(len(mine), np.uint8))
    done = zarr.open_array(str(cache.path / "videos" / "done"), mode="r+")
    for r in retire:
        done[int(r)] = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--new-fraction", type=float, default=0.1)
    parser.add_argument("--retire", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import torch  # noqa: F401 - imported before timing: every build after the first pays no import

    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.stages.search import build_index

    base = int(round(ROWS_PER_HOUR * args.hours))
    new = max(1, int(round(base * args.new_fraction)))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        cache = synthetic_cache(work / "lib.zarr", base + new, new, args.frames, args.tokens, args.dim)
        cache = FeatureCache.open(cache.path, mode="r+")
        full = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            built = build_index(None, cache.path, work / f"full{r}")
            full.append(time.perf_counter() - t0)
        gen_bytes = folder_bytes(built.path / built.generation)
        extract_more(cache, np.arange(base, base + new), np.arange(0, args.retire * 7, 7))
        updates = []
        for r in range(args.repeats):
            out = work / f"upd{r}"
            shutil.copytree(work / "full0", out)
            t0 = time.perf_counter()
            upd = build_index(None, cache.path, out)
            updates.append(time.perf_counter() - t0)
        token_bytes = folder_bytes(cache.path / "videos" / "tokens")
    mib = 1024 * 1024
    print(f"{args.hours:g} h = {base} rows of {args.frames}x{args.tokens}x{args.dim} float16; "
          f"update: +{new} rows, -{args.retire} retired; median of {args.repeats}")
    print("| what | rows | time (s) | per hour of video (s) | size |")
    print("| --- | --- | --- | --- | --- |")
    per_hour = 1 / args.hours
    print(f"| cache tokens on disk | {base + new} | - | - | {token_bytes / mib:.1f} MiB "
          f"({token_bytes / mib / (base + new) * ROWS_PER_HOUR:.1f} MiB per hour) |")
    print(f"| full build (zero-shot) | {base} | {statistics.median(full):.2f} | "
          f"{statistics.median(full) * per_hour:.2f} | {gen_bytes / mib:.2f} MiB per generation |")
    print(f"| update ({upd.added} embedded, {upd.kept} copied, {upd.removed} removed) | {upd.n_videos} | "
          f"{statistics.median(updates):.2f} | - | faiss: {upd.faiss} |")
    print("all runs (s): full", [round(x, 2) for x in full], "update", [round(x, 2) for x in updates])


if __name__ == "__main__":
    main()
