"""Write and read throughput of the Zarr feature cache vs one .npy file per video.

    .venv/bin/python benchmarks/cache_io.py --videos 96 --per-shard 32

Writes N videos of [T, L, D] float16 tokens (ViT-B/32 shape by default) four ways:
- zarr, per-video unbuffered: `write_shard_videos` one row at a time (each call rewrites the shard),
- zarr, `write_video` (buffered: one shard write when the shard is complete),
- zarr, `write_shard_videos` with a whole shard per call,
- numpy: one `np.save` per video;
then reads them back sequentially (a shard / all files) and as random single videos. Prints a
markdown table; MB/s are of uncompressed tokens; ratios are against .npy in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.data.base import DatasetIndex, VideoItem


def _index(n: int) -> DatasetIndex:
    videos = tuple(VideoItem(f"v{i}", Path(f"v{i}.mp4"), "train") for i in range(n))
    return DatasetIndex("bench", Path("."), videos, ())


def _features(n: int, t: int, length: int, d: int, seed: int = 0) -> np.ndarray:
    # Smooth-ish features like CLIP's (per-channel offsets + noise); pure noise would not compress at all.
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, 1, length, d)).astype(np.float32)
    return (base + 0.5 * rng.standard_normal((n, t, length, d))).astype(np.float16)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _new_cache(root: Path, name: str, n: int, t: int, length: int, d: int, per_shard: int) -> FeatureCache:
    return FeatureCache.create(
        root / name,
        _index(n),
        frames=t,
        num_tokens=length,
        dim=d,
        words=8,
        fingerprint={"bench": name},
        videos_per_shard=per_shard,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--random-reads", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    n, t, length, d, s = args.videos, args.frames, args.tokens, args.dim, args.per_shard

    feats = _features(n, t, length, d)
    mask = np.ones((n, t), np.uint8)
    mb = feats.nbytes / 1e6
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    rows: list[tuple[str, float, float, float, float]] = []  # name, write s, seq read s, rand read s, size
    rng = np.random.default_rng(1)
    picks = rng.integers(0, n, args.random_reads)
    try:
        # one .npy per video
        npy = scratch / "npy"
        npy.mkdir()
        w = _timed(lambda: [np.save(npy / f"{i}.npy", feats[i]) for i in range(n)])
        r = _timed(lambda: np.stack([np.load(npy / f"{i}.npy") for i in range(n)]))
        rr = _timed(lambda: [np.load(npy / f"{i}.npy") for i in picks])
        rows.append((".npy per video", w, r, rr, sum(p.stat().st_size for p in npy.iterdir()) / 1e6))

        def unbuffered(cache: FeatureCache) -> None:
            for i in range(n):
                cache.write_shard_videos(i, feats[i : i + 1], mask[i : i + 1], np.ones(1, np.uint8))

        def buffered(cache: FeatureCache) -> None:
            for i in range(n):
                cache.write_video(i, feats[i])
            cache.flush()

        def per_shard(cache: FeatureCache) -> None:
            for k in range(cache.n_shards):
                lo, hi = cache.shard_range(k)
                cache.write_shard_videos(lo, feats[lo:hi], mask[lo:hi], np.ones(hi - lo, np.uint8))

        for name, writer in (
            ("zarr per-video, unbuffered", unbuffered),
            ("zarr write_video (buffered)", buffered),
            ("zarr write_shard_videos", per_shard),
        ):
            cache = _new_cache(scratch, name.replace(" ", "_"), n, t, length, d, s)
            w = _timed(lambda cache=cache, writer=writer: writer(cache))
            reader = FeatureCache.open(cache.path)
            ranges = [reader.shard_range(k) for k in range(reader.n_shards)]
            got: list[np.ndarray] = []
            r = _timed(
                lambda reader=reader, ranges=ranges, got=got: [
                    got.append(reader.read_videos(np.arange(lo, hi))[0]) for lo, hi in ranges
                ]
            )
            assert np.array_equal(np.concatenate(got), feats), name
            rr = _timed(lambda reader=reader: [reader.read_videos([i]) for i in picks])
            size = (
                sum(p.stat().st_size for p in (cache.path / "videos" / "tokens").rglob("*") if p.is_file())
                / 1e6
            )
            rows.append((name, w, r, rr, size))
    finally:
        shutil.rmtree(scratch)

    base_w, base_r, base_rr = rows[0][1], rows[0][2], rows[0][3]
    per_video_mb = mb / n
    print(
        f"{n} videos x [{t}, {length}, {d}] float16 = {mb:.1f} MB, {s} videos per shard, {args.random_reads} random reads\n"
    )
    print(
        "| storage | write MB/s | write vs .npy | seq read MB/s | seq read vs .npy | random read MB/s | random vs .npy | on disk MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, w, r, rr, size in rows:
        rand_mb = per_video_mb * len(picks)
        print(
            f"| {name} | {mb / w:.0f} | {base_w / w:.2f}x | {mb / r:.0f} | {base_r / r:.2f}x | "
            f"{rand_mb / rr:.0f} | {base_rr / rr:.2f}x | {size:.1f} |"
        )


if __name__ == "__main__":
    main()
