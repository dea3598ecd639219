"""What one `muse search` call and `muse serve`'s first answer cost, against a bare `import torch`.

Issue 16 item 6: one `muse search` call (ViT-B-32, a 10k-video index) costs at most 1.5x
`python -c "import torch"` on the same machine, and `muse serve` answers within 5 s of its start.

Setup (in a temporary folder): a synthetic 10,000-row index written directly with `write_index`
(random unit rows, D = 512, exact search: below the ANN threshold), CLIP record ViT-B-32 with the
seeded random init (no download is possible here; real weights have the same shapes, so the same
cost), words 32, and its text tower exported as `muse index` does (`ensure_text_encoder`). A copy
without the export stands for an index built before exports (the open_clip path).

Every row is a fresh process timed from spawn to exit (or, for serve, to the first complete
`GET /search` answer); rounds run the rows in turn (so load drifts hit all rows alike), the table
shows the best of `--repeats` and the ratio to `import torch` measured in the same run. One untimed
round first warms the page cache. `--importtime` adds the slowest imports of one `muse search`.

    .venv/bin/python benchmarks/search_startup.py [--repeats 3] [--importtime]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

N_VIDEOS = 10_000
DIM = 512
WORDS = 32
QUERY = "a person slices a red tomato on a wooden board"
CLIP = {"model": "ViT-B-32", "weights_id": "random-init"}
MUSE = [sys.executable, "-m", "muse_pipeline.cli.main"]


def make_index(root: Path) -> tuple[Path, Path]:
    """(index with the exported text tower, the same index without it)."""
    from muse_pipeline.search.index_format import write_index
    from muse_pipeline.search.text_encoder import TEXT_ENCODER_DIR, ensure_text_encoder

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((N_VIDEOS, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"video{i:05d}" for i in range(N_VIDEOS)]
    paths = [f"/videos/{v}.mp4" for v in ids]
    exported = write_index(root / "index", emb, ids=ids, paths=paths, clip=CLIP, words=WORDS,
                           captions=[f"caption of {v}" for v in ids])
    ensure_text_encoder(exported, CLIP)
    legacy = root / "index-legacy"
    shutil.copytree(exported, legacy, ignore=shutil.ignore_patterns(TEXT_ENCODER_DIR))
    return exported, legacy


def timed_run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_first_answer(index: Path) -> float:
    """Seconds from spawning `muse serve` to the first complete GET /search answer (the client connects
    as soon as the port accepts; the request waits in the backlog while the server loads)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/search?q={QUERY.replace(' ', '+')}&k=10"
    t0 = time.perf_counter()
    server = subprocess.Popen([*MUSE, "serve", "--index", str(index), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=300) as response:
                    hits = json.loads(response.read())["hits"]
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("muse serve exited before answering") from None
                time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        if len(hits) != 10:
            raise RuntimeError(f"muse serve answered {len(hits)} hits, not 10")
        return elapsed
    finally:
        server.terminate()
        server.wait(timeout=60)


def slowest_imports(cmd: list[str], top: int) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the `top` slowest top-level imports of one run of cmd."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True)
    rows = []
    for m in re.finditer(r"^import time:\s*\d+\s*\|\s*(\d+)\s*\|( *)(\S.*)$", proc.stderr, re.MULTILINE):
        if len(m.group(2)) <= 1:  # a top-level import (one space after the bar)
            rows.append((int(m.group(1)) / 1e6, m.group(3).strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports of muse search")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exported, legacy = make_index(Path(tmp))
        rows = {
            'python -c "import torch"': lambda: timed_run([sys.executable, "-c", "import torch"]),
            "muse search (exported text tower)": lambda: timed_run([*MUSE, "search", QUERY, "--index", str(exported)]),
            "muse search (older index: open_clip)": lambda: timed_run([*MUSE, "search", QUERY, "--index", str(legacy)]),
            "muse serve, first answer (exported)": lambda: serve_first_answer(exported),
        }
        times: dict[str, list[float]] = {name: [] for name in rows}
        for round_ in range(args.repeats + 1):
            for name, fn in rows.items():
                elapsed = fn()
                if round_:  # round 0 warms the page cache
                    times[name].append(elapsed)
        base = min(times['python -c "import torch"'])
        print(f"{N_VIDEOS:,}-video index, ViT-B-32 (random init), D {DIM}, exact search; "
              f"best of {args.repeats}, fresh process each")
        print(f"{'':40s} {'best s':>8s} {'x import torch':>15s}   all (s)")
        for name, values in times.items():
            print(f"{name:40s} {min(values):8.2f} {min(values) / base:15.2f}   "
                  + " ".join(f"{v:.2f}" for v in values))
        if args.importtime:
            print("\nslowest top-level imports of one `muse search` (exported), cumulative s:")
            for seconds, module in slowest_imports([*MUSE, "search", QUERY, "--index", str(exported)], 12):
                print(f"  {seconds:6.3f}  {module}")


if __name__ == "__main__":
    main()
