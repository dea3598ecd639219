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
    h = u.new_zeros(batch, dm, A.shape[1])
    ys = []
    for t in range(length):
        d_t = delta[:, :, t, None]  # [Bt, Dm, 1]
        b_t = B[:, :, t][:, None, :] if B.ndim == 3 else B[None]  # [Bt|1, Dm|1, N]
        c_t = C[:, :, t][:, None, :] if C.ndim == 3 else C[None]
        h = torch.exp(d_t * A) * h + d_t * b_t * u[:, :, t, None]
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)
