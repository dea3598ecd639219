"""Write and read throughput of the Zarr feature cache vs one .npy file per video, and the trainer's
batch reads (random sorted batches of whole videos) against a memmapped .npy of the same bytes.

    .venv/bin/python benchmarks/cache_io.py --videos 96 --per-shard 32
    .venv/bin/python benchmarks/cache_io.py --skip-writes --read-videos 768 --batch 128

Batch reads (second table), one thread, page cache warm for every store: memmap .npy gather (the
baseline), an in-RAM tensor gather (`--cache-memory ram`), zarr `oindex` (the read path before issue 8,
zarr-python #3829), one zarr slice per contiguous run, and `FeatureCache.read_videos` (whole chunks
from the shard files), each with raw and blosc-zstd tokens; peak Python-heap growth per batch from
tracemalloc. Methods take turns on each batch, so that the load of a shared machine shifts them alike.
Third table: the same batches through the trainer's DataLoader (`make_loader`, 2 workers).

Writes N videos of [T, L, D] float16 tokens (ViT-B/32 shape by default) three ways:
- zarr, per-video: `write_shard_videos` one row at a time (each call rewrites the shard),
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
import tracemalloc
from pathlib import Path

import numpy as np

from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem


def _index(n: int, captions: bool = False) -> DatasetIndex:
    videos = tuple(VideoItem(f"v{i}", Path(f"v{i}.mp4"), "train") for i in range(n))
    caps = tuple(CaptionItem(f"c{i}", i, "train") for i in range(n)) if captions else ()
    return DatasetIndex("bench", Path("."), videos, caps)


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
    ap.add_argument("--skip-writes", action="store_true", help="only the batch-read tables")
    ap.add_argument("--read-videos", type=int, default=768, help="videos in the batch-read stores")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=5, help="timed batches per method (after one warm-up)")
    ap.add_argument("--loader-batches", type=int, default=12)
    args = ap.parse_args()
    if not args.skip_writes:
        write_tables(args)
    batch_read_tables(args)


def write_tables(args) -> None:
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

        def per_shard(cache: FeatureCache) -> None:
            for k in range(cache.n_shards):
                lo, hi = cache.shard_range(k)
                cache.write_shard_videos(lo, feats[lo:hi], mask[lo:hi], np.ones(hi - lo, np.uint8))

        for name, writer in (
            ("zarr per-video, unbuffered", unbuffered),
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


def _oindex_read(cache: FeatureCache, rows: np.ndarray) -> np.ndarray:
    """The batch read before issue 8: orthogonal indexing over the sharded array."""
    return cache._tokens.oindex[np.unique(rows)]


def _slice_read(cache: FeatureCache, rows: np.ndarray) -> np.ndarray:
    from muse_pipeline.cache.shard_reader import runs

    rows = np.unique(rows)
    out = np.empty((rows.size, *cache._tokens.shape[1:]), np.float16)
    for lo, hi, at in runs(rows):
        out[at : at + hi - lo] = cache._tokens[lo:hi]
    return out


def _measure_all(methods, batches: list[np.ndarray]) -> list[tuple[str, float, float]]:
    """(name, seconds per batch, peak traced-heap growth in MB of one batch) per method. Methods take
    turns on each batch (round robin), so that a shared machine's load shifts all of them alike."""
    for _, fn in methods:
        fn(batches[0])  # warm-up: open files, page cache, first allocations
    totals = [0.0] * len(methods)
    for b in batches[1:]:
        for k, (_, fn) in enumerate(methods):
            start = time.perf_counter()
            fn(b)
            totals[k] += time.perf_counter() - start
    out = []
    for k, (name, fn) in enumerate(methods):
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        fn(batches[-1])
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        out.append((name, totals[k] / (len(batches) - 1), peak / 1e6))
    return out


def _reading_store(root: Path, name: str, feats: np.ndarray, compression: str | None) -> Path:
    n, t, length, d = feats.shape
    cache = FeatureCache.create(root / name, _index(n, captions=True), frames=t, num_tokens=length, dim=d,
                                words=8, fingerprint={"bench": name}, compression=compression,
                                text_tokens=np.ones((n, 8), np.int32))
    for k in range(cache.n_shards):
        lo, hi = cache.shard_range(k)
        cache.write_shard_videos(lo, feats[lo:hi], np.ones((hi - lo, t), np.uint8), np.ones(hi - lo, np.uint8))
    cache.write_texts(0, embeddings=np.zeros((n, d), np.float16))
    return root / name


def batch_read_tables(args) -> None:
    import torch

    from muse_pipeline.training.data import (
        CachePairDataset,
        EpochBatchSampler,
        InMemoryCachePairDataset,
        make_loader,
        open_cache_arrays,
    )

    torch.set_num_threads(1)
    n, t, length, d, bsz = args.read_videos, args.frames, args.tokens, args.dim, args.batch
    feats = _features(n, t, length, d, seed=2)
    rng = np.random.default_rng(3)
    batches = [np.sort(rng.choice(n, bsz, replace=False)) for _ in range(args.batches + 1)]
    per_video = t * length * d * 2
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        np.save(scratch / "tokens.npy", feats)
        memmap = np.load(scratch / "tokens.npy", mmap_mode="r")
        stores = {c: _reading_store(scratch, f"cache-{c or 'raw'}", feats, c) for c in (None, "zstd")}
        ram_ds = InMemoryCachePairDataset(open_cache_arrays(stores[None]), np.arange(n), torch.device("cpu"),
                                          pin=False)
        readers = {c: FeatureCache.open(p) for c, p in stores.items()}
        sizes = {c: sum(f.stat().st_size for f in (p / "videos" / "tokens").rglob("*") if f.is_file())
                 for c, p in stores.items()}
        methods = [
            ("memmap .npy gather (baseline)", lambda r: np.ascontiguousarray(memmap[r])),
            ("in-RAM gather (--cache-memory ram)", lambda r: ram_ds.gather_rows(r)[0]),
        ]
        for c, reader in readers.items():
            tag = "zstd" if c else "raw"
            methods += [
                (f"zarr oindex, {tag} (before)", lambda r, reader=reader: _oindex_read(reader, r)),
                (f"zarr slice per run, {tag} (fallback)", lambda r, reader=reader: _slice_read(reader, r)),
                (f"read_videos, {tag} (shard files)", lambda r, reader=reader: reader.read_videos(r)[0]),
            ]
        check = batches[1]
        for name, fn in methods[2:]:
            got = np.asarray(fn(check))
            assert np.array_equal(got, feats[np.unique(check)]), name
        results = _measure_all(methods, batches)

        print(f"\nBatch reads: {n} videos x [{t}, {length}, {d}] float16 ({per_video / 1e6:.2f} MB each), "
              f"batch {bsz} sorted random rows, {args.batches} timed batches, 1 thread; tokens on disk: "
              f"raw {sizes[None] / 1e6:.0f} MB, zstd {sizes['zstd'] / 1e6:.0f} MB "
              f"({1 - sizes['zstd'] / sizes[None]:.1%} smaller)\n")
        print("| method | videos/s | MB/s | vs memmap | peak heap growth per batch MB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        base = results[0][1]
        for name, sec, peak in results:
            mem = f"{peak:.0f}" if "RAM" not in name else "n/a (torch allocator)"
            print(f"| {name} | {bsz / sec:.0f} | {bsz * per_video / sec / 1e6:.0f} | {base / sec:.2f}x | {mem} |")

        # the same batches through the trainer's DataLoader
        rows: list[tuple[str, float]] = []
        for label, c, mode in (("zarr oindex, raw (before)", None, "oindex"), ("read_videos, raw", None, "direct"),
                               ("read_videos, zstd", "zstd", "direct"), ("in-RAM gather (ram)", None, "ram")):
            arrays = open_cache_arrays(stores[c])
            texts = np.arange(n)
            if mode == "ram":
                ds = InMemoryCachePairDataset(arrays, texts, torch.device("cpu"), pin=False)
            else:
                ds = CachePairDataset(arrays, texts) if mode == "direct" else _OindexDataset(arrays, texts)
            sampler = EpochBatchSampler(n, bsz)
            count, start = 0, None
            for epoch in range(1000):
                sampler.set_epoch(epoch)
                for _batch in make_loader(ds, sampler, num_workers=2):
                    if start is None:
                        start = time.perf_counter()  # after the workers' start and first batch
                        continue
                    count += 1
                    if count >= args.loader_batches:
                        break
                if count >= args.loader_batches:
                    break
            rows.append((label, count * bsz / (time.perf_counter() - start)))
        print(f"\nThrough the trainer's DataLoader (make_loader, 2 workers unless in memory, batch {bsz}, "
              f"{args.loader_batches} batches after the first):\n")
        print("| dataset | videos/s | vs before |")
        print("| --- | ---: | ---: |")
        for label, vps in rows:
            print(f"| {label} | {vps:.0f} | {vps / rows[0][1]:.1f}x |")
    finally:
        shutil.rmtree(scratch)


class _OindexDataset:
    """CachePairDataset with the pre-issue-8 read (orthogonal indexing), for the comparison only."""

    def __new__(cls, arrays, texts):
        import torch

        from muse_pipeline.training.data import CachePairDataset

        class Old(CachePairDataset):
            def read_videos(self, videos):
                unique, inverse = np.unique(videos, return_inverse=True)
                reader = self._reader()
                tokens = torch.from_numpy(np.ascontiguousarray(_oindex_read(reader, unique)))
                mask = torch.from_numpy(reader._mask.oindex[unique]).bool()
                return tokens[torch.from_numpy(inverse)], mask[torch.from_numpy(inverse)]

        return Old(arrays, texts)


if __name__ == "__main__":
    main()
