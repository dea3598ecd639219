"""Bit-for-bit comparison of two pipeline outputs: the check behind a behaviour-preserving refactor.

    # before the change (one checkout), then after it (another), same arguments:
    python benchmarks/pipeline_bits.py run /tmp/before --videos 48 --epochs 2
    python benchmarks/pipeline_bits.py run /tmp/after  --videos 48 --epochs 2
    python benchmarks/pipeline_bits.py compare /tmp/before /tmp/after

`run` drives the `muse demo` command (synthetic data -> extract -> zero-shot -> train muse and
seqTransf -> evaluate -> report -> index -> search page) through the CLI only, so the same script
works on both sides of a refactor. `compare` walks both folders and prints one table row per file:
- Zarr stores: every array's values and dtype, and the root/array attributes, bit for bit; arrays
  present on one side only (new arrays such as the clip windows) are listed, not failed.
- `.safetensors` weights: every tensor bit for bit (for the muse head, whose run-to-run gradients can
  differ in the last bits, see BENCHMARKS.md, the largest difference is printed as well).
- `.npy`, `.bin`: bytes; JSON: values, with wall-clock keys (times, dates, durations) and absolute
  paths of the two roots ignored.
Exit status 1 when anything differs that is not a listed addition.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

VOLATILE_KEYS = {"created", "seconds", "time", "elapsed", "started", "finished", "date", "wall_s",
                 "duration_s", "timings", "ended", "start_time", "end_time", "timestamp", "run_id", "reason",
                 # safetensors writes its metadata map in a per-process random order: the file's hash
                 # differs run to run while every tensor is the same (compared tensor by tensor here)
                 "weights_sha256"}
SKIP_SUFFIXES = {".png", ".pdf", ".lock", ".log", ".html", ".md"}


# Both sides run in this one folder, then move to their own: paths recorded in the outputs are then the
# same on both sides. The synthetic videos are generated once and copied in for every run: libx264 may
# entropy-code a clip two ways from identical frames, and the annotation checksum covers the files.
WORK_DIR = Path(tempfile.gettempdir()) / "muse-pipeline-bits"
DATA_COPY = Path(tempfile.gettempdir()) / "muse-pipeline-bits-data"


def run(out: Path, videos: int, epochs: int) -> None:
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose a new folder")
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    if not DATA_COPY.exists():
        from muse_pipeline.data.synthetic import generate_synthetic

        generate_synthetic(DATA_COPY / "data", n_videos=videos, seed=0)
    shutil.copytree(DATA_COPY / "data", WORK_DIR / "data")
    cmd = [sys.executable, "-m", "muse_pipeline.cli.main", "demo", "--out", str(WORK_DIR), "--videos",
           str(videos), "--epochs", str(epochs), "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    shutil.move(str(WORK_DIR), str(out))


def _stores(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.zarr") if p.is_dir())


def _scrub(value: Any, roots: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, roots) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_scrub(v, roots) for v in value]
    if isinstance(value, str):
        for r in roots:
            value = value.replace(r, "<root>")
        return value
    return value


def _arrays(store: Path) -> dict[str, Any]:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    found: dict[str, Any] = {}

    def walk(g: Any, prefix: str) -> None:
        for name, member in g.members():
            path = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, path + "/")
            else:
                found[path] = member

    walk(group, "")
    found[""] = group
    return found


def compare_store(a: Path, b: Path, roots: tuple[str, ...]) -> list[tuple[str, str]]:
    rows = []
    left, right = _arrays(a), _arrays(b)
    for name in sorted(set(left) | set(right)):
        label = f"{a.name}/{name}" if name else f"{a.name} (root attrs)"
        if name not in left or name not in right:
            rows.append((label, "added" if name in right else "REMOVED"))
            continue
        x, y = left[name], right[name]
        same_attrs = _scrub(dict(x.attrs), roots) == _scrub(dict(y.attrs), roots)
        if not name:
            rows.append((label, "same" if same_attrs else "ATTRS DIFFER"))
            continue
        vx, vy = x[...], y[...]
        same = vx.dtype == vy.dtype and vx.shape == vy.shape and (
            np.array_equal(vx, vy) if vx.dtype.kind in "OUS" else vx.tobytes() == vy.tobytes())
        rows.append((label, ("same" if same else "VALUES DIFFER") + ("" if same_attrs else ", ATTRS DIFFER")))
    return rows


def compare_safetensors(a: Path, b: Path) -> str:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if set(x) != set(y):
        return "TENSOR NAMES DIFFER"
    worst = max((float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)), initial=0.0))
                 for k in x if x[k].shape == y[k].shape), default=0.0)
    if all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x):
        return "same"
    return f"DIFFER (max |diff| {worst:.3g})"


def _same_tree(x: Any, y: Any) -> bool:
    """Nested dicts/lists of tensors, arrays and plain values, equal bit for bit."""
    import torch

    if isinstance(x, dict) and isinstance(y, dict):
        return set(x) == set(y) and all(_same_tree(x[k], y[k]) for k in x if k not in VOLATILE_KEYS)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_tree(u, v) for u, v in zip(x, y, strict=True))
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        return x.dtype == y.dtype and x.tobytes() == y.tobytes()
    return type(x) is type(y) and x == y


def _svg_body(path: Path) -> str:
    import re

    text = path.read_text()
    text = re.sub(r"<dc:date>.*?</dc:date>", "", text)
    text = re.sub(r'(id|clip-path|xlink:href)="[^"]*"', "", text)
    return re.sub(r"url\(#[0-9a-z]+\)", "url()", text)


def compare(a: Path, b: Path) -> int:
    roots = (str(a.resolve()), str(b.resolve()), str(a), str(b))
    rows: list[tuple[str, str]] = []
    stores_a = {p.relative_to(a) for p in _stores(a)}
    stores_b = {p.relative_to(b) for p in _stores(b)}
    for rel in sorted(stores_a | stores_b):
        if rel in stores_a and rel in stores_b:
            rows += compare_store(a / rel, b / rel, roots)
        else:
            rows.append((str(rel), "only in " + ("before" if rel in stores_a else "after")))

    def files(root: Path) -> set[Path]:
        out = set()
        for p in root.rglob("*"):
            rel = p.relative_to(root)
            if p.is_file() and not any(part.endswith(".zarr") or part.endswith(".staging") for part in rel.parts) \
                    and p.suffix not in SKIP_SUFFIXES and "data" != rel.parts[0]:
                out.add(rel)
        return out

    fa, fb = files(a), files(b)
    for rel in sorted(fa | fb):
        if rel not in fa or rel not in fb:
            rows.append((str(rel), "added" if rel in fb else "REMOVED"))
            continue
        pa, pb = a / rel, b / rel
        if rel.suffix == ".safetensors":
            status = compare_safetensors(pa, pb)
        elif rel.suffix in (".json", ".jsonl"):
            def load(p: Path) -> Any:
                text = p.read_text()
                return [json.loads(line) for line in text.splitlines() if line.strip()] \
                    if p.suffix == ".jsonl" else json.loads(text)
            status = "same" if _scrub(load(pa), roots) == _scrub(load(pb), roots) else "DIFFER"
        elif rel.suffix == ".pt":
            import torch

            status = "same" if _same_tree(torch.load(pa, weights_only=False), torch.load(pb, weights_only=False)) \
                else "DIFFER"
        elif rel.suffix == ".svg":  # matplotlib stamps a date and random clip ids: compare the text sans those
            status = "same" if _svg_body(pa) == _svg_body(pb) else "DIFFER"
        else:
            status = "same" if pa.read_bytes() == pb.read_bytes() else "BYTES DIFFER"
        rows.append((str(rel), status))

    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"| {'file or array':<{width}} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for name, status in rows:
        print(f"| {name:<{width}} | {status} |")
    bad = [r for r in rows if r[1] not in ("same", "added")]
    print(f"\n{len(rows)} compared, {sum(r[1] == 'added' for r in rows)} added, {len(bad)} differ")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the demo pipeline into a folder")
    r.add_argument("out", type=Path)
    r.add_argument("--videos", type=int, default=48)
    r.add_argument("--epochs", type=int, default=2)
    c = sub.add_parser("compare", help="compare two folders written by `run`")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.out, args.videos, args.epochs)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
