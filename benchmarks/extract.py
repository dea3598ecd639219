"""Extraction throughput: decode, encode and write separately, end to end, and a naive baseline.

The naive baseline is what a first script does: one video at a time, decode with PyAV, per-frame
PIL preprocessing with open_clip's transform, encode, one .npy file per video.

    python benchmarks/extract.py [--videos 16] [--models muse-tiny,ViT-B-32] [--frames 12]
                                 [--ceiling-only] [--batch-frames 96]

Prints a markdown table of frames/s (higher is better) and the pipeline/naive ratio, then the
feeding ceiling: the real extraction path (decode + preprocess in threads or in 1 / 2 decode
processes, cross-video encoder batches, staging, shard writes) with a null encoder, i.e. the
frames/s a GPU encoder could be fed at most on this machine, and the encoder batch sizes reached.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

IN_PROCESS = "end to end, in process (--workers 0; the default on <= 3 CPU cores)"
ONE_DASK_WORKER = "end to end, dask LocalCluster of 1 worker (--workers 1; the old default there)"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def naive_extract(videos, make_encoder, preprocess, frames: int, out_dir: Path) -> int:
    import av
    from PIL import Image

    from muse_pipeline.video.sampling import sample_times, subsample

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = make_encoder()  # timed, as the pipeline's own model load is
    n_frames = 0
    for v in videos:
        with av.open(str(v.path)) as container:
            stream = container.streams.video[0]
            pil = [Image.fromarray(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
            fps = float(stream.average_rate)
        times = sample_times(len(pil) / fps)
        keep = [pil[min(int(round(t * fps)), len(pil) - 1)] for t in times]
        keep = [keep[i] for i in subsample(len(keep), frames)]
        pixels = torch.stack([preprocess(im) for im in keep])
        with torch.inference_mode():
            tokens = encoder.encode_frames(pixels).to(torch.float16).numpy()
        np.save(out_dir / f"{v.id}.npy", tokens)
        n_frames += len(keep)
    return n_frames


def bench_model(model: str, videos, root: Path, frames: int, work: Path) -> list[dict]:
    import open_clip

    from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.extract.encoders import ENCODER_CACHE
    from muse_pipeline.extract.store_plan import open_store
    from muse_pipeline.stages.extract import run_extract
    from muse_pipeline.video.decode import decode_clip
    from muse_pipeline.video.transforms import preprocess_frames

    register_tiny_config()
    encoder = ClipEncoder(model, pretrained=None)
    rows = []

    decoded, t_decode = _timed(lambda: [decode_clip(v.path, frames) for v in videos])
    n = sum(len(d) for d in decoded)
    rows.append({"stage": "decode (pyav)", "seconds": t_decode, "frames": n})
    _, t_decode_d = _timed(lambda: [decode_clip(v.path, frames, backend="decord") for v in videos])
    rows.append({"stage": "decode (decord)", "seconds": t_decode_d, "frames": n})
    pixels, t_pre = _timed(lambda: [preprocess_frames(d, encoder.image_size, encoder.mean, encoder.std)
                                    for d in decoded])
    rows.append({"stage": "preprocess (torch)", "seconds": t_pre, "frames": n})

    def encode():
        with torch.inference_mode():
            return [encoder.encode_frames(p).to(torch.float16).numpy() for p in pixels]

    tokens, t_enc = _timed(encode)
    rows.append({"stage": "encode", "seconds": t_enc, "frames": n})

    # write: the shard writes the extractor does, on a store of this geometry
    cfg = ExtractConfig(dataset="synthetic", data_root=root, model=model, frames=frames,
                        out=work / f"{model}.zarr", workers=0, quiet=True)
    from muse_pipeline.data import load_dataset

    index = load_dataset("synthetic", root)
    cache, _ = open_store(cfg, index)
    batch = np.zeros((len(videos), frames, cache.num_tokens, cache.dim), np.float16)
    mask = np.zeros((len(videos), frames), np.uint8)
    for i, t in enumerate(tokens):
        batch[i, : len(t)] = t
        mask[i, : len(t)] = 1

    def write():
        for shard in range(cache.n_shards):
            lo, hi = cache.shard_range(shard)
            cache.write_shard_videos(lo, batch[lo:hi], mask[lo:hi], np.ones(hi - lo, np.uint8))

    _, t_write = _timed(write)
    rows.append({"stage": "write (zarr shards)", "seconds": t_write, "frames": n})
    shutil.rmtree(cfg.out)
    shutil.rmtree(str(cfg.out) + ".staging", ignore_errors=True)

    ENCODER_CACHE.clear()  # the end-to-end runs pay for their model load, like the baseline
    _, t_e2e = _timed(lambda: run_extract(cfg))
    rows.append({"stage": IN_PROCESS, "seconds": t_e2e, "frames": n})
    shutil.rmtree(cfg.out)
    _, t_e2e_dask = _timed(lambda: run_extract(ExtractConfig(**{**cfg.__dict__, "workers": 1})))
    rows.append({"stage": ONE_DASK_WORKER, "seconds": t_e2e_dask, "frames": n})

    preprocess = open_clip.image_transform(encoder.image_size, is_train=False)
    n_naive, t_naive = _timed(lambda: naive_extract(videos, lambda: ClipEncoder(model, pretrained=None),
                                                    preprocess, frames, work / "naive"))
    rows.append({"stage": "naive baseline (PIL, one .npy per video)", "seconds": t_naive, "frames": n_naive})
    for r in rows:
        r["model"] = model
    return rows


class NullEncoder:
    """The real encoder's geometry and text tower, but frames cost nothing to encode: what is left
    is the CPU work that feeds the encoder."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def encode_frames(self, pixels):
        return torch.zeros(pixels.shape[0], self._real.num_tokens, self._real.dim)


def bench_ceiling(root: Path, frames: int, batch_frames: int, work: Path) -> list[dict]:
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.extract.decode_pool import shutdown_decode_pools
    from muse_pipeline.extract.encoders import ENCODER_CACHE
    from muse_pipeline.stages.extract import run_extract

    model = "muse-tiny"  # 224 px input like ViT-B/32: the same decode + preprocess work
    rows = []
    for label, decode_workers in (("2 decode threads (CPU default)", 0), ("1 decode process", 1),
                                  ("2 decode processes", 2)):
        ENCODER_CACHE.clear()
        real = ENCODER_CACHE.get(model, None, "cpu", "fp32")
        ENCODER_CACHE.put(NullEncoder(real), model, None, "cpu", "fp32")
        out = work / f"ceiling-{decode_workers}.zarr"
        cfg = ExtractConfig(dataset="synthetic", data_root=root, model=model, frames=frames, out=out,
                            workers=0, quiet=True, decode_workers=decode_workers,
                            batch_frames=batch_frames)
        # warm-up: the decode pool (spawned processes importing torch) starts once per worker
        # process, not once per shard; time the second run
        run_extract(cfg)
        shutil.rmtree(out)
        summary, seconds = _timed(lambda cfg=cfg: run_extract(cfg))
        sizes = summary.batch_sizes
        rows.append({"stage": f"null encoder, {label}", "seconds": seconds, "frames": summary.frames_encoded,
                     "batches": f"{len(sizes)} x {np.mean(sizes):.0f} frames (max {max(sizes)})"})
        shutil.rmtree(out)
    ENCODER_CACHE.clear()
    shutdown_decode_pools()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--models", default="muse-tiny,ViT-B-32")
    parser.add_argument("--ceiling-only", action="store_true", help="Only the null-encoder feeding table.")
    parser.add_argument("--batch-frames", type=int, default=96, help="Encoder batch of the ceiling runs.")
    args = parser.parse_args()

    from muse_pipeline.data import load_dataset
    from muse_pipeline.data.synthetic import generate_synthetic

    work = Path(tempfile.mkdtemp(prefix="muse-bench-"))
    try:
        root = work / "synthetic"
        # longer, larger clips than the test set so that decode has real work (12+ s, 320 px)
        generate_synthetic(root, n_videos=args.videos, seed=7, size_range=(240, 320),
                           duration_range=(12.0, 16.0))
        videos = load_dataset("synthetic", root).videos
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(videos)} videos, "
              f"{args.frames} frames each\n")
        rows = []
        if not args.ceiling_only:
            for model in args.models.split(","):
                rows += bench_model(model.strip(), videos, root, args.frames, work)
        ceiling = bench_ceiling(root, args.frames, args.batch_frames, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("| feeding ceiling (decode + preprocess + stage + write) | frames | seconds | frames/s | encoder batches |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in ceiling:
        print(f"| {r['stage']} | {r['frames']} | {r['seconds']:.2f} | {r['frames'] / r['seconds']:.1f} | "
              f"{r['batches']} |")
    print()
    if not rows:
        return

    print("| model | stage | frames | seconds | frames/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['frames']} | {r['seconds']:.2f} | "
              f"{r['frames'] / r['seconds']:.1f} |")
    print()
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["stage"]: r for r in rows if r["model"] == model}
        e2e = by[IN_PROCESS]
        naive = by["naive baseline (PIL, one .npy per video)"]
        enc = by["encode"]
        print(f"{model}: end to end is {naive['seconds'] / e2e['seconds']:.2f}x the naive baseline; "
              f"encode alone takes {enc['seconds'] / e2e['seconds']:.0%} of the end-to-end time; "
              f"one dask worker takes {by[ONE_DASK_WORKER]['seconds'] / e2e['seconds']:.2f}x the in-process time")


if __name__ == "__main__":
    main()
