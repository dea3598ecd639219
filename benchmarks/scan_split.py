"""Where the numba selective scan's time goes: its two kernels against the whole call (with the torch
glue: softplus and bias of delta, the B / C layout, the gradient sums), forward + backward, on CPU.

    python benchmarks/scan_split.py --threads 2

Prints a markdown table (min of --repeats runs) with the per state update cost of each kernel.
"""

from __future__ import annotations

import argparse

from timing import best_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="2x128x16x3060,8x512x16x3060", help="comma list of BxDxNxL")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from muse_pipeline.models import scan_numba

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"float32, {args.threads} thread(s), min of {args.repeats}\n")
    print("| B x D x N x L | fwd kernel (ms) | bwd kernel (ms) | whole call fwd+bwd (ms) | glue share | "
          "fwd ns / update / thread | bwd ns / update / thread |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.configs.split(","):
        b, d, n, length = (int(v) for v in spec.split("x"))
        t_fwd, t_bwd, t_all = measure(scan_numba, b, d, n, length, args.repeats)
        updates = b * d * length * n / args.threads
        print(f"| {spec} | {t_fwd * 1e3:.1f} | {t_bwd * 1e3:.1f} | {t_all * 1e3:.1f} | "
              f"{100 * (1 - (t_fwd + t_bwd) / t_all):.0f}% | {t_fwd / updates * 1e9:.2f} | {t_bwd / updates * 1e9:.2f} |")


def measure(scan_numba, b: int, d: int, n: int, length: int, repeats: int) -> tuple[float, float, float]:
    """(forward kernel, backward kernel, whole call forward + backward) seconds for one shape."""
    import torch

    u, z, gy = (torch.randn(b, d, length) for _ in range(3))
    delta = torch.rand(b, d, length) * 0.1
    a_mat = -torch.rand(d, n) - 0.5
    b_mat, c_mat = torch.randn(b, n, length), torch.randn(b, n, length)
    d_vec, bias = torch.randn(d), torch.randn(d)
    bk, ck = b_mat.transpose(1, 2).contiguous(), c_mat.transpose(1, 2).contiguous()
    _, ckpt = scan_numba.scan_forward(u, delta, a_mat, bk, ck, d_vec, z)
    t_fwd = best_of(lambda: scan_numba.scan_forward(u, delta, a_mat, bk, ck, d_vec, z), repeats, warmup=True)
    t_bwd = best_of(lambda: scan_numba.scan_backward(u, delta, a_mat, bk, ck, d_vec, z, ckpt, gy), repeats,
                    warmup=True)
    inputs = [t.clone().requires_grad_() for t in (u, delta, a_mat, b_mat, c_mat, d_vec, z, bias)]

    def whole():
        y = scan_numba.selective_scan_numba(*inputs[:7], delta_bias=inputs[7], delta_softplus=True)
        y.backward(gy)

    return t_fwd, t_bwd, best_of(whole, repeats, warmup=True)


if __name__ == "__main__":
    main()
