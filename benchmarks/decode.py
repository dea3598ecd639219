"""Sampled decode of a long video vs decoding the whole file (issue 7: timestamp sampling must not
cost a full decode).

Writes (once, cached in --work) a synthetic 10-minute 320x240 30 fps libx264 clip (keyframe every
250 frames, B-frames) and times, in one process:
- the baseline: a full decode of every frame. With the ffmpeg CLI installed, `ffmpeg -f null`;
  otherwise PyAV decoding every frame without colour conversion (the same libavcodec work).
- `decode_clip` at 12 and 64 sampled frames with each backend (seeks to the keyframe before each
  sample), the PyAV backend forced to decode sequentially (what sampling costs without seeks), and
  the old index x average-fps path (loaded from git history, commit LEGACY_COMMIT) for comparison.

    python benchmarks/decode.py [--minutes 10] [--keyint 250] [--repeats 3] [--short-videos 32]
                                [--work /tmp/muse-bench-decode]

Prints markdown tables: best-of-repeats seconds and the share of the full decode; then the same
decoders on short synthetic clips (where everything is decoded sequentially).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
from timing import best_of


def make_clip(
    path: Path, minutes: float, keyint: int = 250, width: int = 320, height: int = 240, fps: int = 30
) -> Path:
    """Moving gradient + frame counter bars, so the encoder has real motion to code."""
    import av

    if path.exists():
        return path
    n = int(minutes * 60 * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "x264-params": f"keyint={keyint}:bframes=2"}
        for i in range(n):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = (xx + 2 * i) % 256
            img[..., 1] = (yy + i) % 256
            img[..., 2] = (xx + yy + 3 * i) % 256
            img[: height // 8, : (i % width)] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


LEGACY_COMMIT = "12a4831"  # the last commit that picked frames by index x average frame rate


def load_legacy_decoder():
    """The old `decode_clip` (index x average fps, its own keyframe seeking) from git history, or None."""
    import sys
    import types

    repo = Path(__file__).resolve().parents[1]
    sources = {}
    for name in ("sampling", "decode"):
        try:
            sources[name] = subprocess.run(
                ["git", "-C", str(repo), "show", f"{LEGACY_COMMIT}:muse_pipeline/video/{name}.py"],
                check=True, capture_output=True, text=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    modules = {}
    for name in ("sampling", "decode"):
        module = types.ModuleType(f"legacy_{name}")
        sys.modules[module.__name__] = module
        code = sources[name].replace("muse_pipeline.video.sampling", "legacy_sampling")
        exec(compile(code, f"{LEGACY_COMMIT}:{name}.py", "exec"), module.__dict__)  # noqa: S102
        modules[name] = module
    return modules["decode"].decode_clip


def full_decode_pyav(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def main() -> None:
    from muse_pipeline.video.decode import decode_clip, decode_pyav

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keyint", type=int, default=250, help="keyframe interval (x264's default: 250)")
    parser.add_argument("--short-videos", type=int, default=32, help="short synthetic clips for a second table")
    parser.add_argument("--work", type=Path, default=Path("/tmp/muse-bench-decode"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    name = f"clip_{args.minutes:g}min_320x240_30fps_keyint{args.keyint}.mp4"
    path = make_clip(args.work / name, args.minutes, args.keyint)

    rows = []
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg:
        cmd = [ffmpeg, "-v", "error", "-i", str(path), "-f", "null", "-"]
        base_name = "full decode: `ffmpeg -f null` (every frame)"
        base = best_of(lambda: subprocess.run(cmd, check=True), args.repeats)
    else:
        base_name = "full decode: PyAV, every frame, no RGB conversion (ffmpeg CLI not installed)"
        base = best_of(lambda: full_decode_pyav(path), args.repeats)
    rows.append((base_name, "all", base))
    for frames in (12, 64):
        for backend in ("pyav", "decord"):
            seconds = best_of(lambda b=backend, f=frames: decode_clip(path, f, backend=b), args.repeats)
            rows.append((f"decode_clip, {backend} (seeks)", str(frames), seconds))
    seconds = best_of(lambda: decode_pyav(path, 64, seek=False), 1)
    rows.append(("decode_clip, pyav forced sequential (seek=False)", "64", seconds))
    legacy = load_legacy_decoder()
    if legacy is not None:
        for frames in (12, 64):
            seconds = best_of(lambda f=frames: legacy(path, f), args.repeats)
            rows.append((f"old index x fps path ({LEGACY_COMMIT}), pyav", str(frames), seconds))

    print(f"\nclip: {path.name} ({path.stat().st_size / 2**20:.1f} MiB), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, best of {args.repeats}\n")
    print("| method | sampled frames | seconds | share of full decode |")
    print("|---|---:|---:|---:|")
    for method, frames, seconds in rows:
        print(f"| {method} | {frames} | {seconds:.2f} | {seconds / base:.1%} |")
    if args.short_videos:
        short_clips(args.work, args.short_videos, args.repeats, legacy)


def short_clips(work: Path, n_videos: int, repeats: int, legacy) -> None:
    """Short clips (the synthetic set, 0.6-6 s): sequential decoding; the cost of the packet pass."""
    from muse_pipeline.data.synthetic import generate_synthetic
    from muse_pipeline.video.decode import decode_clip

    root = generate_synthetic(work / f"synthetic{n_videos}", n_videos=n_videos, seed=0)
    paths = sorted((root / "videos").glob("*.mp4"))
    rows = [
        (f"decode_clip, {backend}", best_of(lambda b=backend: [decode_clip(p, 12, backend=b) for p in paths], repeats))
        for backend in ("pyav", "decord")
    ]
    if legacy is not None:
        rows.append((f"old index x fps path ({LEGACY_COMMIT}), pyav", best_of(lambda: [legacy(p, 12) for p in paths], repeats)))
    print(f"\n{len(paths)} short synthetic clips (0.6-6 s, 64-160 px), 12 frames each, best of {repeats}\n")
    print("| method | seconds | ms per video |")
    print("|---|---:|---:|")
    for method, seconds in rows:
        print(f"| {method} | {seconds:.2f} | {1000 * seconds / len(paths):.1f} |")


if __name__ == "__main__":
    main()
