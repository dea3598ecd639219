"""Bidirectional Mamba ("v2", as in Vision Mamba), spec section 5, exact under right padding.

Shared in_proj / out_proj; each direction has its own causal depthwise conv, x_proj, dt_proj, A_log
and D. The backward direction runs on the time-flipped sequence and its output is flipped back;
y = out_proj(y_fwd + flip(y_bwd)). At padding positions the conv input is zeroed and delta forced to
0 (a = exp(0) = 1, b = 0): the state passes through unchanged, so real tokens see exactly what they
would see without the padding, in both directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from muse_pipeline.models import dispatch
from muse_pipeline.models import scan as scan_module
from muse_pipeline.models.conv import causal_conv1d, causal_conv1d_torch
from muse_pipeline.models.scan import selective_scan
from muse_pipeline.models.scan_ref import selective_scan_ref


class MambaDirection(nn.Module):
    """One scan direction: conv -> SiLU -> x_proj -> (dt, B, C) -> selective scan gated by z."""

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # Mamba's init (kept: nothing re-initialises these later, unlike upstream MUSE).
        bound = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # inverse softplus, so that softplus(bias) = dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # [d_inner, N]
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))

    def params(self):  # -> bimamba_cpu.DirectionParams
        """This direction's tensors for the fused CPU mixer (`bimamba_cpu`)."""
        from muse_pipeline.models.bimamba_cpu import DirectionParams  # imports numba: only where it runs

        return DirectionParams(self.conv1d.weight[:, 0, :], self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                               self.dt_proj.bias, -torch.exp(self.A_log), self.D)

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        pad_mask: torch.Tensor | None,
        *,
        conv_fn: Callable[..., torch.Tensor] = causal_conv1d,
        scan_fn: Callable[..., torch.Tensor] = selective_scan,
    ) -> torch.Tensor:
        """x, z: [B, d_inner, L] (x already zero at padding); pad_mask: [B, L] True = padding -> [B, d_inner, L]."""
        xc = conv_fn(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, "silu")
        dt, b, c = self.x_proj(xc.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # softplus here (not in the scan) so that padding can force delta to exactly 0 afterwards
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # [B, d_inner, L]
        if pad_mask is not None:
            delta = delta.masked_fill(pad_mask[:, None, :], 0.0)
        # dtypes under bf16 autocast (CUDA's policy): xc, b, c, z are bf16 (matmul / conv outputs),
        # delta float32 (softplus is on autocast's float32 list), A and D float32 parameters. The torch
        # scan computes in float32 whatever it gets; the CUDA dispatch (scan.kernel_arguments) casts
        # delta and z to xc's dtype as mamba_ssm's checks demand, where 0 at the pads stays exactly 0.
        return scan_fn(
            xc, delta, -torch.exp(self.A_log), b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(),
            D=self.D, z=z, delta_bias=None, delta_softplus=False,
        )


class BiMamba(nn.Module):
    """forward(x [B, L, D], pad_mask [B, L] bool True = padding, or None) -> [B, L, D]."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 1) -> None:
        super().__init__()
        d_inner = expand * d_model
        dt_rank = math.ceil(d_model / 16)
        self.d_model, self.d_inner = d_model, d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.fwd = MambaDirection(d_inner, d_state, d_conv, dt_rank)
        self.bwd = MambaDirection(d_inner, d_state, d_conv, dt_rank)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, *, reference: bool = False) -> torch.Tensor:
        """`reference=True` uses the sequential scan and the plain torch conv (for tests)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"BiMamba expects [B, L, {self.d_model}], got {tuple(x.shape)}")
        if pad_mask is not None and pad_mask.shape != x.shape[:2]:
            raise ValueError(f"pad_mask must be [B, L]={tuple(x.shape[:2])}, got {tuple(pad_mask.shape)}")
        fns = dict(conv_fn=causal_conv1d_torch, scan_fn=selective_scan_ref) if reference else {}
        if not reference and self._fused_cpu(x):
            from muse_pipeline.models.bimamba_cpu import bimamba_inner_cpu

            return bimamba_inner_cpu(x, pad_mask.bool() if pad_mask is not None else None, self.in_proj.weight,
                                     self.out_proj.weight, self.fwd.params(), self.bwd.params())
        if torch.is_grad_enabled() and x.device.type == "cpu" and not reference and not dispatch.on_kernel_device(x):
            # Other CPU cases (MUSE_SCAN=torch, numba missing, half precision) keep only x and recompute
            # the block in the backward: its activations are ~17 [B, d_inner, L] tensors per block.
            return checkpoint(self._mix, x, pad_mask, fns, use_reentrant=False)
        return self._mix(x, pad_mask, fns)

    def _fused_cpu(self, x: torch.Tensor) -> bool:
        """Whether `bimamba_cpu` runs this call: CPU tensors where the numba scan is the backend, float32
        or float64 throughout, no CPU autocast (its casts belong to autograd's per-op path)."""
        if x.device.type != "cpu" or dispatch.on_kernel_device(x) or x.dtype not in (torch.float32, torch.float64):
            return False
        if torch.is_autocast_enabled("cpu") or scan_module.scan_backend(x) != "numba":
            return False
        return all(p.dtype == x.dtype for p in self.parameters())

    def _mix(self, x: torch.Tensor, pad_mask: torch.Tensor | None, fns: dict) -> torch.Tensor:
        xi, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, d_inner, L] each
        if pad_mask is not None:
            pad_mask = pad_mask.bool()
            xi = xi.masked_fill(pad_mask[:, None, :], 0.0)
        y_f = self.fwd(xi, z, pad_mask, **fns)
        flip_pad = pad_mask.flip(-1) if pad_mask is not None else None
        y_b = self.bwd(xi.flip(-1), z.flip(-1), flip_pad, **fns).flip(-1)
        return self.out_proj((y_f + y_b).transpose(1, 2))
