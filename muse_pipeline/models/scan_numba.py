"""Fused selective scan for CPU tensors: numba kernels for the forward and the backward.

Same signature and semantics as `scan_ref.selective_scan_ref` / mamba_ssm's `selective_scan_fn`:
    delta <- softplus(delta + delta_bias) (softplus if asked);  a_t = exp(delta_t A),  b_t = delta_t B_t u_t
    h_t = a_t * h_{t-1} + b_t;   y_t = C_t . h_t + D u_t;   y <- y * silu(z)

One task per (batch row, channel) in the forward, per (batch row, channel group) in the backward, run in
parallel (`prange`). A task walks along time with its [N] state in locals, so nothing of size
B x D x L x N is ever written. The forward stores the state entering every CHECKPOINT_EVERY-th step
([B, D, L / CHECKPOINT_EVERY, N], a quarter of u's size at N = 16). The backward, like mamba_ssm's
CUDA kernel, recomputes each checkpoint interval's states from its checkpoint into a small local buffer
(last interval first) and walks it backwards with dL/dh. Gradients of B and C that sum over channels
are accumulated per channel group ([G, B, L, N], G ~ 4 x threads / B, small) and summed afterwards,
so that no two tasks write the same memory.

Half inputs compute in float32 and return half outputs (like the CUDA kernel). Kernels compile on
first use (~tens of seconds per dtype) and are cached next to this file (`cache=True`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

CHECKPOINT_EVERY = 64  # steps per recomputed interval: its [64, N] buffers stay in L1
# Reassociation lets LLVM vectorise the sums over the state dim; no nnan/ninf, so inf and nan still
# propagate like in the reference.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (LLVM bitcast: free, and vectorisable)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(cache=True, fastmath=False)  # explicit: a callee otherwise inherits its caller's fastmath
def _expf(x):
    """exp of a float32, written out so that LLVM vectorises it across the state dim (a call to libm's
    expf is scalar, and was 80% of the kernel's time). Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2,
    Cephes' degree-7 polynomial for exp(r), 2^k built from exponent bits in two halves (so that k up
    to 128 and down to -150 stay representable). Max relative error 8e-8 over [-104, 88.7] (numpy's
    float32 exp: 2e-7); 0 below, inf above, nan for nan. No fastmath here, even inside the fastmath
    kernels: reassociation would merge the two halves of ln2 and lose the reduction's precision."""
    lo = np.float32(-104.0)
    hi = np.float32(88.72284)
    xc = min(max(x, lo), hi)
    k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    ki = np.int32(k)
    half = ki >> np.int32(1)
    res = (p * _float32_from_bits((ki - half + np.int32(127)) << np.int32(23))
           * _float32_from_bits((half + np.int32(127)) << np.int32(23)))
    if x < lo:
        res = np.float32(0.0)
    if x > hi:
        res = np.float32(np.inf)
    if x != x:
        res = x
    return res


def typed_exp(x):
    """exp in the work dtype: `_expf` for float32, libm's exp for float64 (the precision tests' dtype)."""
    return math.exp(x)


@overload(typed_exp)
def _exp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _expf(x)
    return lambda x: math.exp(x)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _forward_task(b, d, n_state, u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, save, out, ckpt):
    """One (batch row, channel) of `_forward_kernel`; inlined there, so a literal `n_state` is a constant."""
    length = u.shape[2]
    one = u.dtype.type(1)
    bstep = 0 if b_fixed else 1
    cstep = 0 if c_fixed else 1
    h = np.zeros(n_state, dtype=u.dtype)
    gate = np.ones(every, dtype=u.dtype)
    brow = Bk[d] if b_fixed else Bk[b]
    crow = Ck[d] if c_fixed else Ck[b]
    a_d = A[d]
    d_d = D[d]
    for t0 in range(0, length, every):
        r = min(length, t0 + every) - t0
        if save:
            ckpt[b, d, t0 // every, :] = h
        if has_z:  # silu(z) for the whole interval first: a loop that vectorises, exp included
            for i in range(r):
                zt = z[b, d, (length - 1 - t0 - i) if reverse else (t0 + i)]
                gate[i] = zt / (one + typed_exp(-zt))
        for i in range(r):
            t = (length - 1 - t0 - i) if reverse else (t0 + i)
            dt = delta[b, d, t]
            ut = u[b, d, t]
            dbu = dt * ut
            bt = brow[t * bstep]
            ct = crow[t * cstep]
            y = d_d * ut
            for n in range(n_state):
                hn = typed_exp(dt * a_d[n]) * h[n] + dbu * bt[n]
                h[n] = hn
                y += hn * ct[n]
            out[b, d, t] = y * gate[i]


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_kernel(u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, save, out, ckpt):
    """u, delta (softplus and bias already applied), z, out: [Bt, Dm, L]; A: [Dm, N]; Bk, Ck: [Bt, L, N]
    or [Dm, 1, N] (fixed); D: [Dm]; ckpt: [Bt, Dm, ceil(L / every), N], written when `save`.
    `reverse`: step i reads and writes time L-1-i (the scan of the time-flipped sequence, flipped back,
    without copying anything); checkpoints are in step order."""
    nb, nd, length = u.shape
    n_state = A.shape[1]
    for task in prange(nb * nd):
        b = task // nd
        d = task - b * nd
        if n_state == 16:  # d_state 16 (the paper's): a constant trip count vectorises the state loop fully (2x)
            _forward_task(b, d, 16, u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, save, out, ckpt)
        else:
            _forward_task(b, d, n_state, u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, save, out,
                          ckpt)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _backward_task(b, g, n_state, per_group, u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, ckpt,
                   gy, du, ddelta, dz, add_dz, dA_part, dB_part, dC_part, dD_part):
    """One (batch row, channel group) of `_backward_kernel`; inlined there, so a literal `n_state` is a constant."""
    nd, length = u.shape[1], u.shape[2]
    n_ckpt = ckpt.shape[2]
    one = u.dtype.type(1)
    zero = u.dtype.type(0)
    bstep = 0 if b_fixed else 1
    cstep = 0 if c_fixed else 1
    a_buf = np.empty((every, n_state), dtype=u.dtype)
    h_buf = np.empty((every + 1, n_state), dtype=u.dtype)  # h_buf[i + 1] = h_{t0 + i}; [0] enters
    y_buf = np.empty(every, dtype=u.dtype)  # C . h + D u, before the gate
    sig = np.empty(every, dtype=u.dtype)  # sigmoid(z)
    dh = np.empty(n_state, dtype=u.dtype)  # a_{t+1} * dL/dh_{t+1}, flowing back in time
    da_acc = np.empty(n_state, dtype=u.dtype)
    for d in range(g * per_group, min(nd, (g + 1) * per_group)):
        brow = Bk[d] if b_fixed else Bk[b]
        crow = Ck[d] if c_fixed else Ck[b]
        dbrow = dB_part[b, d] if b_fixed else dB_part[g, b]
        dcrow = dC_part[b, d] if c_fixed else dC_part[g, b]
        a_d = A[d]
        d_d = D[d]
        dh[:] = zero
        da_acc[:] = zero
        dd_acc = zero
        for c in range(n_ckpt - 1, -1, -1):
            t0 = c * every
            r = min(length, t0 + every) - t0
            h_buf[0, :] = ckpt[b, d, c, :]
            for i in range(r):  # recompute this interval's states
                t = (length - 1 - t0 - i) if reverse else (t0 + i)
                dt = delta[b, d, t]
                ut = u[b, d, t]
                dbu = dt * ut
                bt = brow[t * bstep]
                ct = crow[t * cstep]
                y = d_d * ut
                for n in range(n_state):
                    a = typed_exp(dt * a_d[n])
                    a_buf[i, n] = a
                    hn = a * h_buf[i, n] + dbu * bt[n]
                    h_buf[i + 1, n] = hn
                    y += hn * ct[n]
                y_buf[i] = y
            if has_z:
                for i in range(r):
                    sig[i] = one / (one + typed_exp(-z[b, d, (length - 1 - t0 - i) if reverse else (t0 + i)]))
            for i in range(r - 1, -1, -1):  # and walk them backwards
                t = (length - 1 - t0 - i) if reverse else (t0 + i)
                ut = u[b, d, t]
                dt = delta[b, d, t]
                gt = gy[b, d, t]
                if has_z:
                    zt = z[b, d, t]
                    sg = sig[i]
                    dzt = gt * y_buf[i] * sg * (one + zt * (one - sg))
                    if add_dz:
                        dz[b, d, t] += dzt
                    else:
                        dz[b, d, t] = dzt
                    gt = gt * zt * sg
                dd_acc += gt * ut
                dbu = dt * ut
                bt = brow[t * bstep]
                ct = crow[t * cstep]
                dbt = dbrow[t * bstep]
                dct = dcrow[t * cstep]
                s_b = zero  # dL/d(delta u) = sum_n dh_n B_n
                s_a = zero  # dL/d(delta) through a = sum_n dh_n h_{t-1,n} a_n A_n
                # The dB / dC rows (shared by the group's channels) in a loop of their own: 13% off the
                # backward at the paper size (BENCHMARKS.md, scan_split); likely their possible aliasing
                # with the other arrays kept the fused loop from vectorising well.
                for n in range(n_state):
                    dct[n] += gt * h_buf[i + 1, n]
                    dbt[n] += (dh[n] + gt * ct[n]) * dbu
                for n in range(n_state):
                    dhn = dh[n] + gt * ct[n]
                    s_b += dhn * bt[n]
                    x = dhn * h_buf[i, n] * a_buf[i, n]
                    s_a += x * a_d[n]
                    da_acc[n] += x * dt
                    dh[n] = dhn * a_buf[i, n]
                du[b, d, t] = gt * d_d + s_b * dt
                ddelta[b, d, t] = s_b * ut + s_a
        dA_part[b, d, :] = da_acc
        dD_part[b, d] = dd_acc


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_kernel(u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, ckpt, gy, groups,
                     du, ddelta, dz, add_dz, dA_part, dB_part, dC_part, dD_part):
    """Inputs as in `_forward_kernel`; gy: [Bt, Dm, L]. Writes du, ddelta, dz ([Bt, Dm, L]; dz is added
    to instead when `add_dz`, for a caller summing two directions); dA_part
    [Bt, Dm, N] and dD_part [Bt, Dm] (summed over Bt by the caller); dB_part / dC_part: [G, Bt, L, N]
    when time-varying (summed over G), [Bt, Dm, 1, N] when fixed (summed over Bt); those two must come
    in zeroed."""
    nb, nd, length = u.shape
    n_state = A.shape[1]
    per_group = (nd + groups - 1) // groups
    for task in prange(nb * groups):
        b = task // groups
        g = task - b * groups
        if n_state == 16:  # as in `_forward_kernel`
            _backward_task(b, g, 16, per_group, u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every, ckpt,
                           gy, du, ddelta, dz, add_dz, dA_part, dB_part, dC_part, dD_part)
        else:
            _backward_task(b, g, n_state, per_group, u, delta, A, Bk, Ck, D, z, has_z, b_fixed, c_fixed, reverse, every,
                           ckpt, gy, du, ddelta, dz, add_dz, dA_part, dB_part, dC_part, dD_part)


def _threads() -> int:
    """Follow torch's thread setting (benchmarks and the trainer set it), within numba's pool."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _bc_layout(m: torch.Tensor) -> torch.Tensor:
    """B or C for the kernels: [Bt, N, L] -> contiguous [Bt, L, N] (the N values of one step adjacent);
    fixed [Dm, N] -> [Dm, 1, N]."""
    m = m.detach()
    return m.transpose(1, 2).contiguous() if m.ndim == 3 else m.contiguous()[:, None, :]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _fresh(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape)


def scan_forward(u, delta, A, Bk, Ck, D, z, *, fixed=(False, False), reverse=False, save=True,  # noqa: N803
                 alloc=_fresh):
    """Run the forward kernel on contiguous work-dtype CPU tensors in the kernels' layout (see
    `_forward_kernel`; B / C as `_bc_layout` gives them, `fixed` says which of the two is the fixed
    [Dm, 1, N] form; D [Dm] and z [Bt, Dm, L] or None). -> (y [Bt, Dm, L], the checkpoints for
    `scan_backward`, or None when not `save`). `alloc(name, shape, like)` gives the uninitialised
    outputs ("y", "ckpt"): a caller with its own reusable buffers passes it."""
    batch, dm, length = u.shape
    n_ckpt = -(-length // CHECKPOINT_EVERY)
    ckpt = alloc("ckpt", (batch, dm, n_ckpt, A.shape[1]), u) if save else u.new_empty(1, 1, 1, 1)
    out = alloc("y", tuple(u.shape), u)
    d_w = D if D is not None else u.new_zeros(dm)
    z_w = z if z is not None else u.new_zeros(1, 1, 1)
    _threads()
    _forward_kernel(_np(u), _np(delta), _np(A), _np(Bk), _np(Ck), _np(d_w), _np(z_w), z is not None, *fixed,
                    reverse, CHECKPOINT_EVERY, save, _np(out), _np(ckpt))
    return out, (ckpt if save else None)


def scan_backward(u, delta, A, Bk, Ck, D, z, ckpt, gy, *, fixed=(False, False), reverse=False,  # noqa: N803
                  dz_into=None, alloc=_fresh):
    """Gradients of `scan_forward`'s y given gy [Bt, Dm, L] (all work dtype, contiguous; the same
    `fixed` and `reverse`). -> (du, ddelta, dz or None, dA [Dm, N], dB, dC (kernel layout: [Bt, L, N],
    or [Dm, 1, N] when fixed), dD [Dm]). `dz_into`: a [Bt, Dm, L] tensor that dz is added to (and
    returned) instead of a new one. `alloc` as in `scan_forward` ("du", "ddelta", "dz", "dB_part",
    "dC_part")."""
    batch, dm, length = u.shape
    n = A.shape[1]
    b_fixed, c_fixed = fixed
    threads = _threads()
    groups = min(dm, max(1, -(-4 * threads // batch)))  # enough tasks for every thread
    du, ddelta = alloc("du", tuple(u.shape), u), alloc("ddelta", tuple(u.shape), u)
    if z is None:
        dz = u.new_empty(1, 1, 1)
    else:
        dz = dz_into if dz_into is not None else alloc("dz", tuple(u.shape), u)
    d_w = D if D is not None else u.new_zeros(dm)
    z_w = z if z is not None else u.new_zeros(1, 1, 1)
    da_part, dd_part = u.new_empty(batch, dm, n), u.new_empty(batch, dm)
    db_part = u.new_zeros(batch, dm, 1, n) if b_fixed else alloc("dB_part", (groups, batch, length, n), u).zero_()
    dc_part = u.new_zeros(batch, dm, 1, n) if c_fixed else alloc("dC_part", (groups, batch, length, n), u).zero_()
    _backward_kernel(_np(u), _np(delta), _np(A), _np(Bk), _np(Ck), _np(d_w), _np(z_w), z is not None, b_fixed,
                     c_fixed, reverse, CHECKPOINT_EVERY, _np(ckpt), _np(gy), groups, _np(du), _np(ddelta),
                     _np(dz), dz_into is not None, _np(da_part), _np(db_part), _np(dc_part), _np(dd_part))
    return (du, ddelta, dz if z is not None else None, da_part.sum(0), db_part.sum(0), dc_part.sum(0),
            dd_part.sum(0))


class _ScanCoreNumba(torch.autograd.Function):
    """y = (scan(u, delta, A, B, C) + D u) * silu(z), all in one work dtype (float32 or float64);
    delta final (bias and softplus applied by the caller, with torch autograd)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):  # noqa: N803 (mamba_ssm's names)
        uw, dw, aw = u.detach().contiguous(), delta.detach().contiguous(), A.detach().contiguous()
        bk, ck = _bc_layout(B), _bc_layout(C)
        d_w = D.detach().contiguous() if D is not None else None
        z_w = z.detach().contiguous() if z is not None else None
        save = any(ctx.needs_input_grad)
        fixed = (B.ndim == 2, C.ndim == 2)
        out, ckpt = scan_forward(uw, dw, aw, bk, ck, d_w, z_w, fixed=fixed, save=save)
        if save:
            ctx.save_for_backward(uw, dw, aw, bk, ck, d_w, z_w, ckpt)
            ctx.fixed = fixed
        return out

    @staticmethod
    def backward(ctx, gy):
        uw, dw, aw, bk, ck, d_w, z_w, ckpt = ctx.saved_tensors
        du, ddelta, dz, da, db, dc, dd = scan_backward(uw, dw, aw, bk, ck, d_w, z_w, ckpt,
                                                       gy.detach().to(uw.dtype).contiguous(), fixed=ctx.fixed)

        def bc_grad(g, fixed):  # back to the caller's layout: [Dm, N] or [Bt, N, L]
            return g[:, 0] if fixed else g.transpose(1, 2)

        grads = (du, ddelta, da, bc_grad(db, ctx.fixed[0]), bc_grad(dc, ctx.fixed[1]), dd, dz)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


def selective_scan_numba(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,  # noqa: N803
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    D: torch.Tensor | None = None,  # noqa: N803
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """u, delta, z: [B, Dm, L]; A: [Dm, N]; B, C: [B, N, L] or [Dm, N]; D, delta_bias: [Dm] -> y [B, Dm, L]
    (CPU tensors; shapes are checked by the dispatcher `scan.selective_scan`).

    The bias and softplus of delta run in torch (vectorised there, and its autograd handles them): inside
    the kernel they were scalar libm calls per step that cost more than the 16-state update itself."""
    if u.device.type != "cpu":
        raise ValueError(f"the numba selective scan runs on CPU tensors, got {u.device}")
    dtype = u.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    dt = delta.to(work)
    if delta_bias is not None:
        dt = dt + delta_bias.to(work)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)

    def w(t):
        return t.to(work) if t is not None else None

    y = _ScanCoreNumba.apply(u.to(work), dt, A.to(work), B.to(work), C.to(work), w(D), w(z))
    return y.to(dtype)
