"""The selective scan as a plain loop over time: slow, obviously correct, the yardstick of `scan.py`.

Semantics of mamba_ssm's `selective_scan_fn` (spec section 5):
    delta <- delta + delta_bias[:, None];  delta <- softplus(delta) if asked
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (h_{-1} = 0, per channel d and state n)
    y_t = C_t . h_t + D * u_t;   y <- y * silu(z)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """u, delta, z: [Bt, Dm, L]; A: [Dm, N]; B, C: [Bt, N, L] (time-varying) or [Dm, N] (fixed);
    D, delta_bias: [Dm]. Computes in the dtype of u (float32 for half inputs). Returns y [Bt, Dm, L]
    in u's dtype."""
    dtype = u.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dm, length = u.shape
    # Per-step slices come from `unbind` (one backward node that stacks all step gradients once);
    # indexing x[:, :, t] instead gives every step a backward that writes a full-size zero gradient,
    # which made this reference's backward O(L^2) (582 s at L = 3,060 for the paper's width).
    fixed_b, fixed_c = B.ndim == 2, C.ndim == 2
    b_steps = [B[None]] * length if fixed_b else [b_t[:, None, :] for b_t in B.unbind(-1)]  # [Bt|1, Dm|1, N]
    c_steps = [C[None]] * length if fixed_c else [c_t[:, None, :] for c_t in C.unbind(-1)]
    h = u.new_zeros(batch, dm, A.shape[1])
    ys = []
    for d_t, u_t, b_t, c_t in zip(delta.unbind(-1), u.unbind(-1), b_steps, c_steps, strict=True):
        d_t, u_t = d_t[:, :, None], u_t[:, :, None]  # [Bt, Dm, 1]
        h = torch.exp(d_t * A) * h + d_t * b_t * u_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)
