"""Selective scan: the chunked torch path vs the sequential reference (time, equal results).

    python benchmarks/scan.py                     # CPU, the paper's size and the tiny demo size
    python benchmarks/scan.py --device cuda       # adds the mamba_ssm kernel when installed

Prints a markdown table. The reference is timed on --ref-length tokens and scaled linearly to the
full length (it is one Python step per token, so its time is linear in L; the table says so).
"""

from __future__ import annotations

import argparse
import time

import torch

from muse_pipeline.models.scan import selective_scan_torch
from muse_pipeline.models.scan_ref import selective_scan_ref


def make(b, d, n, length, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(
        u=torch.randn(b, d, length, generator=g),
        delta=torch.randn(b, d, length, generator=g) * 0.5,
        A=-torch.exp(torch.log(torch.arange(1, n + 1.0))).repeat(d, 1),
        B=torch.randn(b, n, length, generator=g),
        C=torch.randn(b, n, length, generator=g),
        D=torch.ones(d),
        z=torch.randn(b, d, length, generator=g),
        delta_bias=torch.full((d,), -3.0),
    )
    return {k: v.to(device) for k, v in x.items()}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, x, backward, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        xs = {k: v.clone().requires_grad_(backward) for k, v in x.items()}
        sync(device)
        t0 = time.perf_counter()
        y = fn(**xs, delta_softplus=True)
        if backward:
            y.sum().backward()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def max_diff(fn_a, fn_b, x):
    xa = {k: v.clone().requires_grad_() for k, v in x.items()}
    xb = {k: v.clone().requires_grad_() for k, v in x.items()}
    ya, yb = fn_a(**xa, delta_softplus=True), fn_b(**xb, delta_softplus=True)
    gy = torch.randn_like(ya)
    (ya * gy).sum().backward()
    (yb * gy).sum().backward()
    grad = max((xa[k].grad - xb[k].grad).abs().max().item() for k in xa)
    return (ya - yb).abs().max().item(), grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configs", default="8x512x16x3060:306,2x64x16x2040:2040",
                   help="comma list of BxDxNxL:REF_L (reference timed on REF_L tokens, scaled to L)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default; 1 keeps a shared machine fair)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = None
    if args.device == "cuda":
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
        except Exception:
            kernel = None
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, float32, delta_softplus\n")
    print("| B x D x N x L | pass | reference (s) | chunked torch (s) | speedup | mamba_ssm (s) | max abs diff y / grads |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.configs.split(","):
        shape, ref_len = spec.split(":")
        b, d, n, length = (int(v) for v in shape.split("x"))
        ref_len = min(int(ref_len), length)
        x = make(b, d, n, length, args.device)
        x_ref = make(b, d, n, ref_len, args.device)
        diff_y, diff_g = max_diff(selective_scan_ref, selective_scan_torch, make(b, d, n, min(ref_len, 512), args.device))
        for backward in (False, True):
            t_ref = timed(selective_scan_ref, x_ref, backward, args.device, 1) * length / ref_len
            t_new = timed(selective_scan_torch, x, backward, args.device, args.repeats)
            t_k = f"{timed(kernel, x, backward, args.device, args.repeats):.4f}" if kernel else "-"
            scaled = f"{t_ref:.3f}" + (f" (L={ref_len} x{length / ref_len:g})" if ref_len < length else "")
            print(f"| {b}x{d}x{n}x{length} | {'fwd+bwd' if backward else 'fwd'} | {scaled} | {t_new:.3f} | "
                  f"{t_ref / t_new:.1f}x | {t_k} | {diff_y:.1e} / {diff_g:.1e} |", flush=True)


if __name__ == "__main__":
    main()
