"""BiMamba's mixer on CPU as one autograd Function: mamba_ssm's `mamba_inner_fn` idea, with the numba scan.

y = out_proj(dir_fwd(xi, z) + flip(dir_bwd(flip(xi), flip(z)))), (xi, z) = in_proj(x), each direction
conv -> SiLU -> x_proj -> dt_proj -> softplus -> selective scan gated by z (the layer of `bimamba.py`).

Why a hand-written backward: under autograd each direction keeps ~9 [B, Dm, L] activations (conv output,
SiLU output, dt_proj output, softplus output, the masked delta, the scan's contiguous copies, the flips
of the backward direction) and, when the block is recomputed for the backward, both directions' graphs
are alive at once; on CPU that transient set the muse head's peak memory above muse-transformer's
(BENCHMARKS.md, fusion). Here the forward keeps only the mixer's input x. The backward recomputes
in_proj, then one direction at a time: its forward (activations, the scan's checkpoints and its output
for out_proj's weight gradient), the scan's backward, and the chain back to in_proj, overwriting each
activation's buffer once its gradient is formed (`Workspace`). The backward direction runs on the
sequence as it lies: the scan kernels walk time from the end (`reverse`) and the conv looks ahead
instead of behind, so nothing is flipped or copied.

Work layout [B, Dm, L] throughout (time innermost, what the scan kernels read), from in_proj's matmul
straight into that layout. Padding as in `bimamba.py`: xi zero and delta zero at the pads.
The plain autograd composition (`BiMamba(..., reference=True)` and `BiMamba._mix`) is the yardstick:
tests compare values and every gradient.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch

from muse_pipeline.models.conv import shifted_conv, shifted_conv_backward
from muse_pipeline.models.scan_numba import scan_backward, scan_forward

_SOFTPLUS_BETA, _SOFTPLUS_THRESHOLD = 1.0, 20.0  # F.softplus's defaults, as the layer uses it


class DirectionParams(NamedTuple):
    """One direction's tensors: conv_w [Dm, k], conv_b [Dm] or None, x_proj_w [R + 2N, Dm],
    dt_proj_w [Dm, R], dt_proj_b [Dm], A [Dm, N] (= -exp(A_log)), D [Dm]."""

    conv_w: torch.Tensor
    conv_b: torch.Tensor | None
    x_proj_w: torch.Tensor
    dt_proj_w: torch.Tensor
    dt_proj_b: torch.Tensor
    A: torch.Tensor  # noqa: N815 (Mamba's name)
    D: torch.Tensor  # noqa: N815


N_DIRECTION_PARAMS = len(DirectionParams._fields)


class Workspace:
    """Named scratch buffers that the mixer's calls reuse (per thread): the big [B, Dm, L] temporaries of
    every block's forward and backward come from here instead of the allocator.

    Why: glibc's malloc keeps freed blocks of the process heap for reuse, and dozens of differently sized
    transients per block fragment it, so the process's resident memory ended at ~2x what was live at its
    peak (BENCHMARKS.md, fusion); returning them to the OS instead (a fixed mmap threshold) cost 40% of
    the step in page faults. A buffer only grows (to the longest sequence seen) and is never returned."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised [shape] tensor of like's dtype, valid until `name` is asked for again."""
        bufs = self._local.__dict__.setdefault("bufs", {})
        numel = math.prod(shape)
        key = (name, like.dtype)
        buf = bufs.get(key)
        if buf is None or buf.numel() < numel:
            bufs.pop(key, None)  # free the smaller one first
            buf = bufs[key] = like.new_empty(numel)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._local.__dict__.get("bufs", {}).values())

    def clear(self) -> None:
        self._local.__dict__.pop("bufs", None)


WORKSPACE = Workspace()


def _in_proj(x: torch.Tensor, w_in: torch.Tensor, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, D], w_in [2 Dm, D] -> xi, z: [B, Dm, L] (workspace buffers); xi zero at the pads."""
    dm = w_in.shape[0] // 2
    shape = (x.shape[0], dm, x.shape[1])
    xt = x.transpose(1, 2)
    xi = torch.matmul(w_in[:dm], xt, out=WORKSPACE.get("xi", shape, x))
    if pad is not None:
        xi.masked_fill_(pad[:, None, :], 0.0)
    return xi, torch.matmul(w_in[dm:], xt, out=WORKSPACE.get("z", shape, x))


def _dt(p: DirectionParams, xdbl: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dt_proj's output before softplus, written into out [B, Dm, L], from xdbl [B, L, R + 2N]."""
    rank = p.dt_proj_w.shape[1]
    return torch.matmul(p.dt_proj_w, xdbl[..., :rank].transpose(1, 2), out=out).add_(p.dt_proj_b[:, None])


def _direction_forward(p: DirectionParams, xi: torch.Tensor, z: torch.Tensor, pad: torch.Tensor | None,
                       reverse: bool, save: bool, y_slot: str = "du") -> dict[str, torch.Tensor | None]:
    """One direction's forward; returns its activations by name (y [B, Dm, L] among them, in the
    workspace buffer `y_slot`: by default the one that the scan's dL/du takes over once y is spent)."""
    rank, n = p.dt_proj_w.shape[1], p.A.shape[1]
    pre = shifted_conv(xi, p.conv_w, p.conv_b, reverse, out=WORKSPACE.get("pre", tuple(xi.shape), xi))
    xc = torch.ops.aten.silu.out(pre, out=WORKSPACE.get("xc", tuple(xi.shape), xi))
    xdbl = torch.matmul(xc.transpose(1, 2), p.x_proj_w.t())  # [B, L, R + 2N]
    delta = _dt(p, xdbl, WORKSPACE.get("delta", tuple(xi.shape), xi))
    torch.ops.aten.softplus.out(delta, _SOFTPLUS_BETA, _SOFTPLUS_THRESHOLD, out=delta)
    if pad is not None:
        delta.masked_fill_(pad[:, None, :], 0.0)
    bk, ck = xdbl[..., rank : rank + n].contiguous(), xdbl[..., rank + n :].contiguous()  # [B, L, N]

    def alloc(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return WORKSPACE.get(y_slot if name == "y" else name, shape, like)

    y, ckpt = scan_forward(xc, delta, p.A.contiguous(), bk, ck, p.D.contiguous(), z, reverse=reverse, save=save,
                           alloc=alloc)
    return dict(pre=pre, xc=xc, xdbl=xdbl, delta=delta, bk=bk, ck=ck, y=y, ckpt=ckpt)


def _direction_backward(p: DirectionParams, act: dict, xi: torch.Tensor, z: torch.Tensor, g: torch.Tensor,
                        pad: torch.Tensor | None, reverse: bool, dxi: torch.Tensor, dz: torch.Tensor) -> DirectionParams:
    """Given the direction's activations and g = dL/dy [B, Dm, L]: adds its share to dxi and dz, returns
    the parameter gradients."""
    rank = p.dt_proj_w.shape[1]
    du, ddelta, _, d_a, d_b, d_c, d_d = scan_backward(
        act["xc"], act["delta"], p.A.contiguous(), act["bk"], act["ck"], p.D.contiguous(), z, act["ckpt"], g,
        reverse=reverse, dz_into=dz, alloc=WORKSPACE.get)
    xdbl = act["xdbl"]
    if pad is not None:
        ddelta.masked_fill_(pad[:, None, :], 0.0)
    dt = _dt(p, xdbl, act["delta"])  # recomputed into delta's buffer (delta is no longer needed)
    d_dt = torch.ops.aten.softplus_backward.grad_input(ddelta, dt, _SOFTPLUS_BETA, _SOFTPLUS_THRESHOLD,
                                                        grad_input=ddelta)
    d_xdbl = torch.cat([torch.matmul(d_dt.transpose(1, 2), p.dt_proj_w), d_b, d_c], dim=-1)  # [B, L, R + 2N]
    d_dt_w = torch.matmul(d_dt, xdbl[..., :rank]).sum(0)
    d_dt_b = d_dt.sum((0, 2))
    xc = act["xc"]  # the scan read it and left it as it was
    d_x_w = torch.matmul(d_xdbl.transpose(1, 2), xc.transpose(1, 2)).sum(0)
    du.baddbmm_(p.x_proj_w.t().expand(du.shape[0], -1, -1), d_xdbl.transpose(1, 2))  # now dL/d(xc)
    d_pre = torch.ops.aten.silu_backward.grad_input(du, act["pre"], grad_input=du)
    d_xi, d_conv_w, d_conv_b = shifted_conv_backward(
        d_pre, xi, p.conv_w, p.conv_b is not None, reverse, dx=d_dt, scratch=act["pre"])  # both spent by now
    dxi.add_(d_xi)
    return DirectionParams(d_conv_w, d_conv_b, d_x_w, d_dt_w, d_dt_b, d_a, d_d)


class _BiMambaInner(torch.autograd.Function):
    """(x [B, L, D], pad [B, L] bool or None, w_in [2 Dm, D], w_out [D, Dm], fwd params..., bwd params...)
    -> out_proj(y_fwd + y_bwd) [B, L, D]; saves only x (and the parameters)."""

    @staticmethod
    def forward(ctx, x, pad, w_in, w_out, *params):
        fwd, bwd = DirectionParams(*params[:N_DIRECTION_PARAMS]), DirectionParams(*params[N_DIRECTION_PARAMS:])
        xi, z = _in_proj(x, w_in, pad)
        y = _direction_forward(fwd, xi, z, pad, False, save=False, y_slot="g")["y"]  # g: a backward-only slot
        y += _direction_forward(bwd, xi, z, pad, True, save=False)["y"]
        ctx.save_for_backward(x, pad, w_in, w_out, *params)
        return torch.matmul(y.transpose(1, 2), w_out.t())

    @staticmethod
    def backward(ctx, gout):
        x, pad, w_in, w_out, *params = ctx.saved_tensors
        gout = gout.contiguous()
        xi, z = _in_proj(x, w_in, pad)
        # dL/dy for both directions: [B, Dm, L]
        g = torch.matmul(w_out.t(), gout.transpose(1, 2), out=WORKSPACE.get("g", tuple(xi.shape), xi))
        dxi, dz = WORKSPACE.get("dxi", tuple(xi.shape), xi).zero_(), WORKSPACE.get("dz", tuple(xi.shape), xi).zero_()
        d_w_out = torch.zeros_like(w_out)
        grads: list[torch.Tensor | None] = []
        for reverse, chunk in ((False, params[:N_DIRECTION_PARAMS]), (True, params[N_DIRECTION_PARAMS:])):
            p = DirectionParams(*chunk)
            act = _direction_forward(p, xi, z, pad, reverse, save=True)
            d_w_out += torch.matmul(gout.transpose(1, 2), act["y"].transpose(1, 2)).sum(0)
            grads.extend(_direction_backward(p, act, xi, z, g, pad, reverse, dxi, dz))
        if pad is not None:
            dxi.masked_fill_(pad[:, None, :], 0.0)
        dm = w_in.shape[0] // 2
        dx = torch.matmul(dxi.transpose(1, 2), w_in[:dm]).add_(torch.matmul(dz.transpose(1, 2), w_in[dm:]))
        d_w_in = torch.cat([torch.matmul(dxi, x).sum(0), torch.matmul(dz, x).sum(0)])
        return (dx, None, d_w_in, d_w_out, *grads)


def bimamba_inner_cpu(x: torch.Tensor, pad: torch.Tensor | None, w_in: torch.Tensor, w_out: torch.Tensor,
                      fwd: DirectionParams, bwd: DirectionParams) -> torch.Tensor:
    """x [B, L, D], pad [B, L] (True = padding) or None -> [B, L, D]. All tensors on CPU, one float dtype."""
    return _BiMambaInner.apply(x, pad, w_in, w_out, *fwd, *bwd)
