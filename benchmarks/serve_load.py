"""Load on `muse serve` over loopback: requests/s, latency percentiles and requests left without an
answer, at 1, 8 and 64 concurrent clients, for the guarded server (`search.server.run_server`) and
the server as it was before (plain `uvicorn.run` of the same app: 40 threadpool workers, no limits).

    .venv/bin/python benchmarks/serve_load.py --videos 5000 --seconds 10
    .venv/bin/python benchmarks/serve_load.py --model ViT-B-32 --levels 1 8 64

The index: `--videos` random unit embeddings under a random-init CLIP (`--model`; the text forward is
the same compute as with real weights). The server runs in its own process (its own GIL); the
clients are asyncio keep-alive HTTP/1.1 connections in this process, each sending
`GET /search?q=...&k=10` back to back (queries cycle through a fixed list) for `--seconds` per level
(`--new-connections`: a new connection for each request).
A request "without an answer" is one whose connection closed, reset or timed out (`--timeout`) before
a whole answer came; the client then reconnects. Statuses other than 200 (503 under overload) are
counted separately: they are answers. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

QUERIES = ["a red circle moves left", "a dog runs on the beach", "two people talk in a kitchen",
           "a car drives at night", "someone plays the guitar", "a cat jumps onto a table",
           "a crowd cheers in a stadium", "rain falls on a window"]


def build_index(folder: Path, videos: int, model: str) -> Path:
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.search.index_format import write_index

    dim = ClipEncoder(model, pretrained=None).dim
    emb = np.random.default_rng(0).normal(size=(videos, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return write_index(folder / "index", emb, ids=[f"v{i}" for i in range(videos)],
                       paths=[f"/videos/v{i}.mp4" for i in range(videos)],
                       clip={"model": model, "weights_id": "random-init"}, words=32)


def serve(index: str, port_file: str, kind: str, workers: int) -> None:
    """The server process: bind a free port, write it to `port_file`, serve until killed."""
    from muse_pipeline.search.app import create_app
    from muse_pipeline.search.http_limits import HttpLimits
    from muse_pipeline.search.query import Searcher
    from muse_pipeline.search.server import bind_socket, run_server

    sock = bind_socket("127.0.0.1", 0)
    app = create_app(Searcher(index))
    Path(port_file + ".tmp").write_text(str(sock.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    if kind == "guarded":
        run_server(app, sock, HttpLimits(search_workers=workers))
    else:  # the server before issue 17: uvicorn's defaults, sync routes in anyio's 40-thread pool
        import uvicorn

        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


async def client(port: int, stop_at: float, timeout: float, offset: int, stats: dict, reuse: bool) -> None:
    reader = writer = None
    i = offset
    while time.monotonic() < stop_at:
        q = QUERIES[i % len(QUERIES)].replace(" ", "%20")
        i += 1
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            close = "" if reuse else "Connection: close\r\n"
            writer.write(f"GET /search?q={q}&k=10 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{close}\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), timeout)
            stats["latency"].append(time.perf_counter() - t0)
            stats["status"][status] += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader = writer = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
            stats["no_answer"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def load(port: int, clients: int, seconds: float, timeout: float, reuse: bool = True) -> dict:
    stats = {"latency": [], "status": Counter(), "no_answer": 0}
    t0 = time.monotonic()
    await asyncio.gather(*(client(port, t0 + seconds, timeout, k, stats, reuse) for k in range(clients)))
    stats["elapsed"] = time.monotonic() - t0
    return stats


def start_server(index: Path, kind: str, workers: int, folder: Path) -> tuple[subprocess.Popen, int]:
    port_file = folder / f"port-{kind}"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(index), "--port-file", str(port_file),
                             "--kind", kind, "--workers", str(workers)])
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the {kind} server did not start")
        time.sleep(0.1)
    port = int(port_file.read_text())
    time.sleep(1.0)  # uvicorn starts answering right after the app is built
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=5000)
    parser.add_argument("--model", default="muse-tiny")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--workers", type=int, default=0, help="search workers of the guarded server (0: default)")
    parser.add_argument("--new-connections", action="store_true", help="one connection per request")
    parser.add_argument("--servers", nargs="+", default=["before", "guarded"], choices=["before", "guarded"])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file, args.kind, args.workers)
        return
    if args.model == "muse-tiny":
        from muse_pipeline.encoders.clip import register_tiny_config

        register_tiny_config()
    from muse_pipeline.search.http_limits import default_search_workers

    workers = args.workers or default_search_workers()
    print(f"{args.videos} videos, CLIP {args.model} (random init), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}, guarded server with {workers} search workers, "
          f"{'one connection per request' if args.new_connections else 'keep-alive connections'}\n")
    print("| server | clients | requests | req/s | p50 ms | p99 ms | max ms | statuses | without answer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(Path(tmp), args.videos, args.model)
        servers = {}
        try:
            for kind in args.servers:
                servers[kind] = start_server(index, kind, workers, Path(tmp))
                asyncio.run(load(servers[kind][1], 1, 2.0, args.timeout))  # warm-up
            for clients in args.levels:  # servers take turns at each level: a shared machine's load shifts both
                for kind, (_, port) in servers.items():
                    s = asyncio.run(load(port, clients, args.seconds, args.timeout, not args.new_connections))
                    lat = np.array(s["latency"]) * 1000 if s["latency"] else np.zeros(1)
                    n = sum(s["status"].values())
                    statuses = " ".join(f"{k}: {v}" for k, v in sorted(s["status"].items()))
                    print(f"| {kind} | {clients} | {n} | {n / s['elapsed']:.1f} | {np.percentile(lat, 50):.1f} | "
                          f"{np.percentile(lat, 99):.1f} | {lat.max():.1f} | {statuses} | {s['no_answer']} |", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

if __name__ == "__main__":
    main()
