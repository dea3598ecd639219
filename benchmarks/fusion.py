"""MUSE (ResMamba) vs muse-transformer (self-attention): time and peak memory of one forward+backward
of the head, as the number of frames T (sequence length 255*T at grid 7) grows.

    python benchmarks/fusion.py                          # CPU: B=1, D=128, T = 4, 12, 32, 64
    python benchmarks/fusion.py --device cuda            # CUDA: defaults to the paper's D=512, B=8

Each (head, T) runs in its own subprocess so that peak memory is measured in isolation: on CPU the
growth of the max RSS (getrusage) over the first full-size forward+backward (after a one-frame warm-up
step, which loads the JIT-compiled kernels), on CUDA torch.cuda.max_memory_allocated.
The time is the best of --repeats later runs. Prints a markdown table and the crossover.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

HEADS = ("muse", "muse-transformer")


def _status_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_reset_peak() -> int:
    """Current RSS in bytes, after resetting the kernel's peak-RSS mark (Linux: clear_refs 5) so that the
    next `_rss_peak` is the high point of what runs in between. Without the reset, getrusage's max RSS
    is the process's lifetime high point: growth over it understates a step that runs below an earlier
    peak (model build, warm-up)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        global _NO_RESET
        _NO_RESET = True
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None and not _NO_RESET else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_peak() -> int:
    hwm = None if _NO_RESET else _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_NO_RESET = False


def child(args: argparse.Namespace) -> None:
    import torch

    from muse_pipeline.models.heads import build_head

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    head = build_head(args.head, args.dim, args.grid, args.frames).to(dev).train()
    with torch.no_grad():  # zero-init out_fc would skip the mixers' backward: give them weights
        for name, p in head.named_parameters():
            if "out_fc" in name:
                p.normal_(0, 0.02)
    tokens = torch.randn(args.batch, args.frames, 1 + args.grid**2, args.dim, device=dev)
    mask = torch.ones(args.batch, args.frames, dtype=torch.bool, device=dev)

    def step(t: torch.Tensor = tokens, m: torch.Tensor = mask) -> None:
        head.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and args.bf16):
            out = head(t, m)
        out.float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # One frame first, for both heads alike: loads the numba kernels from their cache (LLVM code and
    # its memory would otherwise count as the muse head's activations) and warms the allocator.
    step(tokens[:, :1], mask[:, :1])

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        before = _rss_reset_peak()
        step()
        peak = (_rss_peak() - before) / 2**20
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"seconds": best, "peak_mib": peak, "seq_len": args.frames * (1 + sum(
        s * s for s in head.pyramid.grids(args.grid)))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--frames-list", default="4,12,32,64")
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 8 on CUDA")
    p.add_argument("--dim", type=int, default=None, help="default 128 on CPU, 512 on CUDA")
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and numba)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (the trainer's setting)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per (head, T) subprocess")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--head", default="muse", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.batch = args.batch or (8 if cuda else 1)
    args.dim = args.dim or (512 if cuda else 128)
    if args.child:
        child(args)
        return
    results: dict[tuple[str, int], dict] = {}
    frames_list = [int(t) for t in args.frames_list.split(",")]
    for t in frames_list:
        for head in HEADS:
            cmd = [sys.executable, __file__, "--child", "--head", head, "--frames", str(t), "--device", args.device,
                   "--batch", str(args.batch), "--dim", str(args.dim), "--grid", str(args.grid),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)] + (["--bf16"] if args.bf16 else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if proc.returncode == 0:
                    results[head, t] = json.loads(proc.stdout.strip().splitlines()[-1])
                else:
                    err = proc.stderr.strip().splitlines()
                    results[head, t] = {"error": ("OOM" if "out of memory" in proc.stderr.lower() else
                                                  (err[-1] if err else f"exit {proc.returncode}"))[:60]}
            except subprocess.TimeoutExpired:
                results[head, t] = {"error": f"timeout > {args.timeout:g}s"}
            print(f"  {head} T={t}: {results[head, t]}", file=sys.stderr, flush=True)
    print(f"device {args.device}, B={args.batch}, D={args.dim}, grid {args.grid}, one forward+backward"
          f"{', bf16 autocast' if args.bf16 and cuda else ', float32'}"
          f"{'' if cuda else f', {args.threads} CPU thread(s), peak = max-RSS growth'}\n")
    print("| T | seq len | muse (s) | muse-transformer (s) | time ratio T/M | muse peak (MiB) | "
          "muse-transformer peak (MiB) | memory ratio T/M |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    crossover = {"time": None, "memory": None}
    for t in frames_list:
        m, tr = results["muse", t], results["muse-transformer", t]

        def cell(r, key, fmt):
            return fmt.format(r[key]) if key in r else r.get("error", "-")

        ratio_t = ratio_m = "-"
        if "seconds" in m and "seconds" in tr:
            ratio_t = f"{tr['seconds'] / m['seconds']:.2f}"
            if tr["seconds"] > m["seconds"] and crossover["time"] is None:
                crossover["time"] = t
        elif "seconds" in m and crossover["time"] is None:
            crossover["time"] = t  # the transformer failed (OOM / timeout) where MUSE ran
        if "peak_mib" in m and "peak_mib" in tr and m["peak_mib"] > 0:
            ratio_m = f"{tr['peak_mib'] / m['peak_mib']:.2f}"
            if tr["peak_mib"] > m["peak_mib"] and crossover["memory"] is None:
                crossover["memory"] = t
        seq = m.get("seq_len", tr.get("seq_len", "-"))
        print(f"| {t} | {seq} | {cell(m, 'seconds', '{:.3f}')} | {cell(tr, 'seconds', '{:.3f}')} | {ratio_t} | "
              f"{cell(m, 'peak_mib', '{:.0f}')} | {cell(tr, 'peak_mib', '{:.0f}')} | {ratio_m} |")
    for kind in ("time", "memory"):
        c = crossover[kind]
        print(f"\ncrossover ({kind}): " + (f"muse-transformer costs more from T = {c} on" if c else
                                           "none in this range (muse-transformer is cheaper throughout)"))


if __name__ == "__main__":
    main()
