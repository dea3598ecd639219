"""Fast selective scan in pure PyTorch (CPU and any device), plus dispatch to mamba_ssm's CUDA kernel.

Same signature and semantics as `scan_ref.selective_scan_ref` / mamba_ssm's `selective_scan_fn`.

How the torch path avoids one Python step per token: the linear recurrence h_t = a_t h_{t-1} + b_t
(a = exp(delta*A), b = delta*B*u, per channel and state) is split into chunks of K ~ sqrt(L) steps.
1. All chunks run their local recurrence at once from a zero state: K vectorised steps.
2. The chunk-entry states ("carries") follow from each chunk's local end state and its total decay
   (the in-chunk cumulative product of a): L/K small steps.
3. Each position adds its chunk's carry times the in-chunk cumulative product: one fused op.
Products of a in (0, 1] can only underflow towards 0; nothing is ever divided by a decay, so there is
no exp(-cumsum) overflow.
The backward is a custom autograd Function: it recomputes the states, runs the same chunked scan in
reverse time for dL/dh, and forms every gradient in closed form. Work proceeds in tiles of (channel
group x time block) whose [tb, B, g, N] temporaries stay cache-sized; the state is carried from one
time block to the next, so memory is O(tile + B*Dm*L), never O(B*Dm*L*N).
Where each path runs (`selective_scan`, env MUSE_SCAN=torch|numba|mamba_ssm forces one):
- CPU tensors: the fused numba kernel of `scan_numba.py` (state in locals, checkpointed recompute in
  the backward): 10-37x this chunked path forward + backward on 2 cores (BENCHMARKS.md), in
  O(B*Dm*L) memory.
- CUDA tensors: mamba_ssm's kernel when installed.
- Anything else (CUDA without mamba_ssm, MPS, XPU...): this chunked torch path, the only one that
  runs on any torch device; it is kept for that. On CPU it is the fallback when numba cannot import.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from muse_pipeline.models import dispatch

log = logging.getLogger(__name__)
_logged: set[str] = set()

# Elements of one [time block, B, channel group, N] tile (see scan_tiling). CPU: ~2 MB of float32, near
# the L2 cache; it also bounds memory for long sequences (B=8, Dm=512, L=16k would otherwise need GBs
# per temporary). CUDA: kernel launches, not caches, are the cost there, so tiles are large.
TILE_ELEMENTS = 1 << 19
TILE_ELEMENTS_CUDA = 1 << 26
MIN_BLOCK = 64  # time steps per tile that a channel group should leave room for


def _mamba_kernel():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # builds only with CUDA; absent or broken both mean "use torch"
        return None
    return selective_scan_fn


def _numba_scan():
    try:  # a dependency; a broken install (e.g. an llvmlite mismatch) falls back to the torch path
        from muse_pipeline.models.scan_numba import selective_scan_numba
    except Exception as exc:  # noqa: BLE001
        if "numba-missing" not in _logged:
            _logged.add("numba-missing")
            log.warning("numba selective scan unavailable (%s); using the chunked torch scan", exc)
        return None
    return selective_scan_numba


def _log_once(choice: str) -> None:
    if choice not in _logged:
        _logged.add(choice)
        log.info("selective scan backend: %s", choice)


def chunk_size(length: int) -> int:
    """K ~ sqrt(L) balances the K in-chunk steps against the L/K carry steps."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def linear_scan_(a: torch.Tensor, b: torch.Tensor, k: int, carry: torch.Tensor | None = None) -> torch.Tensor:
    """In place: b <- h with h_t = a_t * h_{t-1} + b_t along dim 0 (h_{-1} = 0).

    a, b: [Lp, ...] contiguous, time-major (so one in-chunk step touches long contiguous runs), Lp a
    multiple of k. a is overwritten by its in-chunk cumulative product. `carry` ([Lp/k, ...]) is
    optional scratch. Returns b."""
    lp, *rest = b.shape
    nc = lp // k
    av = a.view(nc, k, *rest)
    bv = b.view(nc, k, *rest)
    for i in range(1, k):  # the local recurrences of all chunks at once
        bv[:, i].addcmul_(av[:, i], bv[:, i - 1])
        if nc > 1:
            av[:, i].mul_(av[:, i - 1])  # in-chunk cumulative decay, in the same sweep (cache-warm)
    if nc == 1:
        return b
    ends, decay = bv[:, k - 1], av[:, k - 1]  # [nc, ...] local end state, decay across the chunk
    carry = torch.empty_like(ends) if carry is None else carry.view_as(ends)  # state entering each chunk
    carry[0].zero_()
    for c in range(1, nc):
        torch.addcmul(ends[c - 1], decay[c - 1], carry[c - 1], out=carry[c])
    bv.addcmul_(av, carry[:, None])
    return b


def linear_scan_reverse_(
    a: torch.Tensor, g: torch.Tensor, k: int, work: torch.Tensor | None = None, carry: torch.Tensor | None = None
) -> torch.Tensor:
    """In place: g <- r with r_t = g_t + a_{t+1} * r_{t+1} along dim 0 (r_{Lp} = 0); a is unchanged.

    The adjoint of `linear_scan_`. Same layout rules; `work` (a's shape) is optional scratch. Returns g."""
    lp, *rest = g.shape
    nc = lp // k
    av = a.view(nc, k, *rest)
    gv = g.view(nc, k, *rest)
    for i in range(k - 2, -1, -1):
        gv[:, i].addcmul_(av[:, i + 1], gv[:, i + 1])
    if nc == 1:
        return g
    q = (torch.empty_like(a) if work is None else work).view_as(av)  # q[:, i] = prod_{j > i in chunk} a_j
    q[:, k - 1] = 1.0
    for i in range(k - 2, -1, -1):
        torch.mul(q[:, i + 1], av[:, i + 1], out=q[:, i])
    # what the next chunk adds at this chunk's last step
    carry = torch.empty_like(gv[:, 0]) if carry is None else carry.view_as(gv[:, 0])
    carry[nc - 1].zero_()
    for c in range(nc - 1, 0, -1):
        torch.mul(av[c, 0], torch.addcmul(gv[c, 0], q[c, 0], carry[c]), out=carry[c - 1])
    gv.addcmul_(q, carry[:, None])
    return g


class _ScanCore(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; inputs already in work dtype.

    Work is tiled over (channel group, time block). Tiles are read straight from the [Bt, Dm, L]
    inputs through strided views (a transposing copy of whole inputs costs more than it saves) into
    time-major [tb, Bt, g, N] scratch; the last block is padded in scratch with identity steps
    (a = 1, b = 0). The state leaving one time block enters the next, folded into its first step
    (b_0 += a_0 * h_in). The forward saves each block's entering state ([n_blocks, Bt, Dm, N], small)
    so that the backward can recompute any block on its own, last block first."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # noqa: N803 (mamba_ssm's names)
        batch, dm, length = u.shape
        n = A.shape[1]
        g, tb, k = scan_tiling(batch, dm, length, n, u.device)
        blocks = range(0, length, tb)
        y = torch.empty_like(u)
        starts = u.new_zeros(len(blocks), batch, dm, n)  # state entering each time block
        ws = _Workspace(u)
        for lo in range(0, dm, g):
            sl = slice(lo, min(dm, lo + g))
            for j, t0 in enumerate(blocks):
                ts = slice(t0, min(length, t0 + tb))
                dl, ul = _tm(delta, sl, ts), _tm(u, sl, ts)
                a, b = _tile(ws, tb, dl, ul, A[sl], _bc_tile(B, sl, ts))
                if j:
                    b[0].addcmul_(a[0], starts[j, :, sl])
                h = linear_scan_(a, b, k, ws.get("carry", (tb // k, *a.shape[1:])))
                r = dl.shape[0]
                y[:, sl, ts] = _dot_n(ws, h[:r], _bc_tile(C, sl, ts)).permute(1, 2, 0)
                if j + 1 < len(blocks):
                    starts[j + 1, :, sl] = h[r - 1]
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.tiling = (g, tb, k)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: N803
        u, delta, A, B, C, starts = ctx.saved_tensors
        g, tb, k = ctx.tiling
        batch, dm, length = u.shape
        gy = gy.to(u.dtype)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        ws = _Workspace(u)
        blocks = list(range(0, length, tb))
        for lo in range(0, dm, g):
            sl = slice(lo, min(dm, lo + g))
            tail = None  # a_{t+1} dL/dh_{t+1} flowing back from the next time block
            for j in range(len(blocks) - 1, -1, -1):
                ts = slice(blocks[j], min(length, blocks[j] + tb))
                dl, ul, gl = _tm(delta, sl, ts), _tm(u, sl, ts), _tm(gy, sl, ts)
                r = dl.shape[0]
                Bg, Cg = _bc_tile(B, sl, ts), _bc_tile(C, sl, ts)
                h_in = starts[j, :, sl]
                a, h = _tile(ws, tb, dl, ul, A[sl], Bg)
                shape = a.shape
                if j:
                    h[0].addcmul_(a[0], h_in)
                carry = ws.get("carry", (tb // k, *shape[1:]))
                h = linear_scan_(ws.get("cumprod", shape).copy_(a), h, k, carry)  # the states h_t, recomputed
                dh = ws.get("dh", shape)
                torch.mul(gl[..., None], Cg, out=dh[:r])
                dh[r:] = 0.0
                if tail is not None:
                    dh[-1] += tail
                dh = linear_scan_reverse_(a, dh, k, ws.get("cumprod", shape), carry)  # dL/dh_t
                tail = a[0] * dh[0]
                dh, hr = dh[:r], h[:r]
                # through b_t = delta_t u_t B_t
                s = _dot_n(ws, dh, Bg)  # [r, Bt, g]
                du[:, sl, ts] = (s * dl).permute(1, 2, 0)
                dd = s * ul
                # through a_t = exp(delta_t A): dL/d(delta_t A) = dh_t * h_{t-1} * a_t
                x = ws.get("cumprod", shape)[:r]
                torch.mul(dh[1:], hr[:-1], out=x[1:])
                torch.mul(dh[0], h_in, out=x[0])
                x.mul_(a[:r])
                dd += _dot_n(ws, x, A[sl])
                ddelta[:, sl, ts] = dd.permute(1, 2, 0)
                # (an einsum here would permute-copy x; an in-place scale and an outer-dim sum do not)
                dA[sl] += x.mul_(dl[..., None]).sum((0, 1))
                _accumulate(ws, dB, sl, ts, dh, dl * ul)
                _accumulate(ws, dC, sl, ts, hr, gl)
        return du, ddelta, dA, dB, dC


def _tm(x: torch.Tensor, sl: slice, ts: slice) -> torch.Tensor:
    """Tile of u / delta / gy [Bt, Dm, L] as a time-major view [r, Bt, g] (no copy)."""
    return x[:, sl, ts].permute(2, 0, 1)


def _bc_tile(m: torch.Tensor, sl: slice, ts: slice) -> torch.Tensor:
    """Tile of B or C: [Bt, N, L] -> view [r, Bt, 1, N] (shared by all channels); [Dm, N] -> [g, N]."""
    return m[sl] if m.ndim == 2 else m[:, :, ts].permute(2, 0, 1)[:, :, None, :]


def _tile(ws: _Workspace, tb: int, dl: torch.Tensor, ul: torch.Tensor, a_mat: torch.Tensor,
          b_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = exp(delta A), b = delta u B as contiguous [tb, Bt, g, N] scratch; rows past r = len(dl) are
    identity steps (a = 1, b = 0)."""
    r = dl.shape[0]
    shape = (tb, *dl.shape[1:], a_mat.shape[-1])
    a, b = ws.get("a", shape), ws.get("b", shape)
    torch.mul(dl[..., None], a_mat, out=a[:r]).exp_()
    torch.mul((dl * ul)[..., None], b_mat, out=b[:r])
    if r < tb:
        a[r:] = 1.0
        b[r:] = 0.0
    return a, b


def scan_tiling(batch: int, dm: int, length: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(channels per group g, time-block length tb, in-block chunk k) so that one [tb, Bt, g, N] tile
    holds about TILE_ELEMENTS: small enough to stay in the CPU caches across the ~10 passes made over
    it, large enough that per-op overhead stays small. On CUDA one big tile (launches dominate)."""
    budget = TILE_ELEMENTS_CUDA if device.type == "cuda" else TILE_ELEMENTS
    g = min(dm, max(1, budget // max(1, batch * n * MIN_BLOCK)))
    tb = min(length, max(1, budget // max(1, batch * g * n)))
    k = chunk_size(tb)
    return g, -(-tb // k) * k, k


class _Workspace:
    """Named scratch tensors reused across channel groups: fresh multi-MB allocations each group would
    be returned to the OS and page-faulted in again, which costs as much as the arithmetic."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like = like
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.store[name] = self.like.new_empty(numel)
        return buf[:numel].view(shape)


def _dot_n(ws: _Workspace, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum over the state dim: h [Lp, Bt, g, N] . c ([Lp, Bt, 1, N] or [g, N]) -> [Lp, Bt, g].

    A product into scratch plus a last-dim sum: einsum/matmul would run thousands of tiny matmuls."""
    return torch.mul(h, c, out=ws.get("tmp", h.shape)).sum(-1)


def _accumulate(ws: _Workspace, acc: torch.Tensor, sl: slice, ts: slice, d: torch.Tensor, w: torch.Tensor) -> None:
    """Gradient of B or C: acc[:, :, ts] ([Bt, N, L]) += sum_g d*w, or acc[sl] ([Dm, N]) += sum_{t,b} d*w;
    d [r, Bt, g, N], w [r, Bt, g]."""
    prod = torch.mul(d, w[..., None], out=ws.get("tmp", d.shape))
    if acc.ndim == 3:
        acc[:, :, ts] += prod.sum(2).permute(1, 2, 0)
    else:
        acc[sl] += prod.sum((0, 1))


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:  # noqa: N803
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be [B, Dm, L] with equal shapes, got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, dm, length = u.shape
    if A.ndim != 2 or A.shape[0] != dm:
        raise ValueError(f"A must be [Dm={dm}, N], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.shape not in ((batch, n, length), (dm, n)):
            raise ValueError(f"{name} must be [B, N, L]={[batch, n, length]} or [Dm, N]={[dm, n]}, got {tuple(m.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dm,):
            raise ValueError(f"{name} must be [Dm={dm}], got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def selective_scan_torch(
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
    """The chunked pure-torch path (see module doc). Half inputs compute in float32."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    uw = u.to(work)
    dw = delta.to(work)
    if delta_bias is not None:
        dw = dw + delta_bias.to(work)[:, None]
    if delta_softplus:
        dw = F.softplus(dw)
    y = _ScanCore.apply(uw.contiguous(), dw.contiguous(), A.to(work).contiguous(), B.to(work), C.to(work))
    if D is not None:
        y = y + D.to(work)[:, None] * uw
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)


def scan_backend(x: torch.Tensor) -> str:
    """'mamba_ssm', 'numba' or 'torch' for a tensor on x's device (MUSE_SCAN overrides the automatic
    choice: mamba_ssm on CUDA when installed, numba on CPU, the chunked torch path elsewhere)."""
    forced = dispatch.env_choice("MUSE_SCAN")
    if forced == "torch":
        return "torch"
    if forced == "mamba_ssm":
        if _mamba_kernel() is None or not dispatch.on_kernel_device(x):
            raise RuntimeError("MUSE_SCAN=mamba_ssm needs the mamba_ssm package and CUDA tensors")
        return "mamba_ssm"
    if forced == "numba":
        if x.device.type != "cpu" or _numba_scan() is None:
            raise RuntimeError("MUSE_SCAN=numba needs CPU tensors and an importable numba")
        return "numba"
    if dispatch.on_kernel_device(x):  # CUDA: the fused kernel, else the chunked torch scan (never numba)
        return "mamba_ssm" if _mamba_kernel() is not None else "torch"
    if x.device.type == "cpu" and _numba_scan() is not None:
        return "numba"
    return "torch"


# dtypes selective_scan_cuda accepts for u (csrc/selective_scan/selective_scan.cpp, selective_scan_fwd:
# TORCH_CHECK(input_type == Float || Half || BFloat16)).
KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_arguments(u, delta, A, B, C, D=None, z=None, delta_bias=None):  # noqa: N803
    """The scan's tensors cast / laid out as mamba_ssm's selective_scan_fwd checks them (mamba-ssm
    2.2.2 - 2.3.1, pinned in the `cuda` extra; csrc/selective_scan/selective_scan.cpp):
    - input_type = u's dtype (float32, float16 or bfloat16); delta.scalar_type() == input_type and
      z.scalar_type() == input_type. Under bf16 autocast u and z come out of bf16 matmuls while
      softplus (on CUDA autocast's float32 list) makes delta float32: delta and z are cast to u's
      dtype. A zero delta stays exactly zero in any float dtype, so padding stays exact;
    - weight_type = A's dtype, float32 (or complex64); A is cast to float32;
    - time-varying B / C ([B, N, L], or [B, G, N, L]): dtype == input_type; fixed ones ([Dm, N]):
      dtype == weight_type;
    - D and delta_bias: float32;
    - u, delta, z, B, C: stride(-1) == 1 (the Python wrapper in mamba_ssm/ops/selective_scan_interface.py
      makes them so; doing it here keeps the copies visible);
    - the kernel computes in float32 internally and returns u's dtype.
    Returns the same 8 tensors (None where given None)."""
    if u.dtype not in KERNEL_INPUT_DTYPES:
        u = u.float()
    itype = u.dtype

    def last_contig(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()

    u = last_contig(u)
    delta = last_contig(delta.to(itype))
    A = A.float()  # noqa: N806
    B, C = (last_contig(m.to(itype if m.ndim >= 3 else torch.float32)) for m in (B, C))  # noqa: N806
    if D is not None:
        D = D.float().contiguous()  # noqa: N806
    if z is not None:
        z = last_contig(z.to(itype))
    if delta_bias is not None:
        delta_bias = delta_bias.float().contiguous()
    return u, delta, A, B, C, D, z, delta_bias


def selective_scan(
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
    """u, delta, z: [B, Dm, L]; A: [Dm, N]; B, C: [B, N, L] or [Dm, N]; D, delta_bias: [Dm] -> y [B, Dm, L]."""
    backend = scan_backend(u)
    _log_once(backend)
    if backend == "mamba_ssm":
        fn = _mamba_kernel()
        u, delta, A, B, C, D, z, delta_bias = kernel_arguments(u, delta, A, B, C, D, z, delta_bias)  # noqa: N806
        return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if backend == "numba":
        _check(u, delta, A, B, C, D, z, delta_bias)
        return _numba_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
