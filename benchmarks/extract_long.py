"""What an hour of video costs to extract and store at the default settings (auto windows).

Generates one long video (default 10 min, 320x240, 25 fps, a keyframe every 2 s), extracts it as a
folder library with muse-tiny at the folder defaults (12 frames, 24 s windows, 12 s stride, the
default work path), and scales to an hour. ViT-B-32's time is estimated from the same run: the
run's non-encoder time (decode, preprocess, staging, writes; muse-tiny's encoder cost is
subtracted) plus the frames encoded times ViT-B-32's measured per-frame encode cost at the
extractor's CPU batch (12 frames). Store bytes: the measured muse-tiny store, and ViT-B-32's from
the layout (rows x 12 frames x 50 tokens x 512 x 2 bytes, raw float16, plus the small arrays).

    python benchmarks/extract_long.py [--minutes 10] [--gop 50]
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


def _frames(n: int, width: int, height: int):
    """A drifting gradient with a moving square: cheap to make, real work for the codec."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    for k in range(n):
        frame = np.empty((height, width, 3), np.uint8)
        frame[..., 0] = (x + k) % 256
        frame[..., 1] = (y + 2 * k) % 256
        frame[..., 2] = (x + y + 3 * k) % 256
        cx, cy = (k * 3) % (width - 40), (k * 2) % (height - 40)
        frame[cy : cy + 40, cx : cx + 40] = (255 * ((k // 250) % 2), 40, 200)
        yield frame


def encode_seconds_per_frame(model: str, frames: int = 12, repeats: int = 5) -> float:
    """Seconds per frame of `encode_frames` on random pixels, batches of `frames` (after a warm-up)."""
    from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config

    register_tiny_config()
    encoder = ClipEncoder(model, pretrained=None)
    pixels = torch.randn(frames, 3, encoder.image_size, encoder.image_size)
    with torch.inference_mode():
        encoder.encode_frames(pixels)
        t0 = time.perf_counter()
        for _ in range(repeats):
            encoder.encode_frames(pixels)
    return (time.perf_counter() - t0) / (repeats * frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--gop", type=int, default=50)
    args = parser.parse_args()

    from muse_pipeline.cache.export import bytes_on_disk
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data.synthetic import write_video
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.stages.extract import run_extract

    work = Path(tempfile.mkdtemp(prefix="muse-long-"))
    try:
        root = work / "library"
        fps = 25
        n = int(args.minutes * 60 * fps)
        t0 = time.perf_counter()
        write_video(root / "long.mp4", _frames(n, 320, 240), fps, gop=args.gop)
        made = time.perf_counter() - t0
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}; video: {args.minutes:g} min, 320x240, {fps} fps, keyframe every "
              f"{args.gop / fps:g} s ({made:.0f} s to generate)\n")
        cfg = ExtractConfig(dataset="folder", data_root=root, model="muse-tiny", cache_dir=work / "cache", quiet=True)
        t0 = time.perf_counter()
        summary = run_extract(cfg)
        seconds = time.perf_counter() - t0
        cache = FeatureCache.open(summary.store)
        rows, frames = cache.n_videos, summary.frames_encoded
        slots = int(cache.read_videos(np.arange(rows))[1].sum())
        tiny_bytes = bytes_on_disk(summary.store)
        tiny_encode = encode_seconds_per_frame("muse-tiny")
        vitb_encode = encode_seconds_per_frame("ViT-B-32")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hours = args.minutes / 60
    other = max(0.0, seconds - frames * tiny_encode)  # decode, preprocess, staging, writes, fixed costs
    vitb_seconds = other + frames * vitb_encode
    vitb_bytes = rows * 12 * 50 * 512 * 2 + (tiny_bytes - rows * 12 * 50 * 64 * 2)
    print(f"path taken: {summary.path_taken}\n")
    print("| per hour of video (default settings) | muse-tiny (measured) | ViT-B-32 (estimated) |")
    print("| --- | ---: | ---: |")
    print(f"| rows (moments of 24 s, every 12 s) | {rows / hours:.0f} | {rows / hours:.0f} |")
    print(f"| frames decoded and encoded (distinct grid times) | {frames / hours:.0f} | {frames / hours:.0f} |")
    print(f"| frame slots stored (rows x frames, mask 1) | {slots / hours:.0f} | {slots / hours:.0f} |")
    print(f"| extraction time, s | {seconds / hours:.0f} | {vitb_seconds / hours:.0f} |")
    print(f"| of which encoder, s | {frames * tiny_encode / hours:.1f} | {frames * vitb_encode / hours:.0f} |")
    print(f"| store, MB | {tiny_bytes / hours / 1e6:.1f} | {vitb_bytes / hours / 1e6:.0f} |")
    print(f"\nencoder per frame (batch 12): muse-tiny {tiny_encode * 1e3:.1f} ms, ViT-B-32 {vitb_encode * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
