"""Selective scan: the fused numba kernel vs the chunked torch path vs a reference-style loop (CPU).

    python benchmarks/scan.py                     # the three CPU sizes of issue 11, 2 threads
    python benchmarks/scan.py --device cuda       # chunked torch vs mamba_ssm's kernel when installed

Baseline "loop": mamba_ssm's `selective_scan_ref` style: exp(delta*A) and delta*B*u precomputed as
[B, D, L, N] tensors, then one Python step per token over `unbind(2)` along time (h = a_t * h + b_t,
y_t = h . C_t), autograd for the backward. (A loop that indexes [:, :, t] instead of `unbind` is much
slower still: each step's backward writes a full-size gradient, O(L^2).) Every path runs at full
length; nothing is extrapolated. Times are the best of up to --repeats runs (a path whose single run
takes longer than --long seconds runs once). Accuracy: max abs difference of y and of all gradients
against the sequential float64 reference (`scan_ref.py`) at the same B x D x N and L = 512.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from muse_pipeline.models.scan import selective_scan_torch
from muse_pipeline.models.scan_ref import selective_scan_ref


def make(b, d, n, length, device, seed=0, dtype=torch.float32):
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
    return {k: v.to(device=device, dtype=dtype) for k, v in x.items()}


def loop_unbind(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):  # noqa: N803
    """The baseline: mamba_ssm-reference style (precomputed [B, D, L, N] decay and input, loop over
    `unbind` along time)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    inp = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(2), inp.unbind(2), C.unbind(2), strict=True):
        h = a_t * h + b_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, x, backward, device, repeats, long_s):
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
        del xs, y
        if best > long_s:
            break
    return best


def max_diff(fn, x):
    """max |fn - float64 reference| of y and of every input's gradient."""
    x64 = {k: v.double().requires_grad_() for k, v in x.items()}
    xf = {k: v.clone().requires_grad_() for k, v in x.items()}
    y64, yf = selective_scan_ref(**x64, delta_softplus=True), fn(**xf, delta_softplus=True)
    gy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y64 * gy).sum().backward()
    (yf * gy.to(yf.dtype)).sum().backward()
    grad = max((xf[k].grad.double() - x64[k].grad).abs().max().item() for k in x)
    return (yf.double() - y64).abs().max().item(), grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configs", default="2x128x16x3060,8x512x16x3060,1x128x16x16320", help="comma list of BxDxNxL")
    p.add_argument("--threads", type=int, default=2, help="torch (and numba) CPU threads; 0 = torch default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long", type=float, default=20.0, help="a path slower than this (s) runs once")
    p.add_argument("--skip-loop", action="store_true", help="leave out the (slow, memory-hungry) loop baseline")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = {}
    if not args.skip_loop:
        paths["loop (unbind)"] = loop_unbind
    paths["chunked torch"] = selective_scan_torch
    fast_name = "numba"
    if args.device == "cuda":
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fast
        except Exception:
            fast = None
        fast_name = "mamba_ssm"
    else:
        from muse_pipeline.models.scan_numba import selective_scan_numba as fast
    if fast is not None:
        paths[fast_name] = fast
        tiny = make(1, 2, 2, 8, args.device)
        timed(fast, tiny, True, args.device, 1, 0)  # JIT load / compile outside the timings
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("-",)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, float32, delta_softplus, "
          f"load average at start {load[0]:.2f}\n")
    names = list(paths)
    head = " | ".join(f"{n} (s)" for n in names)
    ratios = [f"{fast_name} vs {n}" for n in names if n != fast_name] if fast_name in paths else []
    print(f"| B x D x N x L | pass | {head} | {' | '.join(ratios)} | max abs diff vs float64 ref: y / grads |")
    print("| --- | --- | " + " | ".join("---" for _ in names + ratios) + " | --- |")
    for spec in args.configs.split(","):
        b, d, n, length = (int(v) for v in spec.split("x"))
        x = make(b, d, n, length, args.device)
        diffs = {k: max_diff(fn, make(b, d, n, min(length, 512), args.device, seed=1))
                 for k, fn in paths.items() if k in ("chunked torch", fast_name)}
        for backward in (False, True):
            t = {k: timed(fn, x, backward, args.device, args.repeats, args.long) for k, fn in paths.items()}
            cells = [f"{t[k]:.3f}" for k in names]
            cells += [f"{t[k] / t[fast_name]:.1f}x" for k in names if k != fast_name] if ratios else []
            diff = "; ".join(f"{k} {dy:.1e} / {dg:.1e}" for k, (dy, dg) in diffs.items())
            print(f"| {spec} | {'fwd+bwd' if backward else 'fwd'} | {' | '.join(cells)} | {diff} |", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("-",)
    print(f"\nload average at end {load[0]:.2f}")


if __name__ == "__main__":
    main()
