"""CUDA dispatch contract, on CPU: the project's kernel calls meet the kernels' own checks.

No GPU runs here, so two stand-ins replace the CUDA kernels:
- `fake_causal_conv1d_fn`: causal-conv1d's `causal_conv1d_fn` (signature and Python-side handling of
  causal_conv1d/causal_conv1d_interface.py, checks of csrc/causal_conv1d.cpp: causal_conv1d_fwd /
  causal_conv1d_bwd), versions 1.4 - 1.6.1 (the checks are the same across that range);
- `fake_selective_scan_fn`: mamba_ssm's `selective_scan_fn` (signature and Python-side handling of
  mamba_ssm/ops/selective_scan_interface.py, checks of csrc/selective_scan/selective_scan.cpp:
  selective_scan_fwd / selective_scan_bwd), versions 2.2.2 - 2.3.1.
Each raises where the real kernel's TORCH_CHECK would (RuntimeError), and computes with the
project's reference implementation (`causal_conv1d_torch`, `selective_scan_ref`) in float32, with the
kernel's output and gradient dtypes. The `is_cuda()` checks are the only ones left out. They are
patched into `muse_pipeline.models.conv` / `.scan` with the device test patched to "yes", so the
dispatch code that runs on CUDA runs here.

`cuda_autocast()` reproduces CUDA's bf16 autocast policy on the CPU: CPU autocast already runs
matmuls / linear / conv in bf16, but keeps softplus, exp, softmax, layer_norm, sum, ... in the input
dtype, where CUDA autocast computes them in float32. The difference matters: on CUDA, softplus makes
delta float32 while u is bf16, which selective_scan_fwd refuses.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from muse_pipeline.models import conv as conv_mod
from muse_pipeline.models import dispatch
from muse_pipeline.models import scan as scan_mod
from muse_pipeline.models.bimamba import BiMamba
from muse_pipeline.models.conv import causal_conv1d, causal_conv1d_torch
from muse_pipeline.models.scan import selective_scan
from muse_pipeline.models.scan_ref import selective_scan_ref

HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------- checks
def torch_check(cond: bool, what: str) -> None:
    """TORCH_CHECK: a RuntimeError naming the failed condition."""
    if not cond:
        raise RuntimeError(f"Expected {what} to be true, but got false (stand-in of a CUDA kernel check)")


def check_shape(t: torch.Tensor, name: str, *shape: int) -> None:
    """CHECK_SHAPE(x, ...) of both sources."""
    torch_check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# -------------------------------------------------------------------------- causal-conv1d stand-in
def _conv_checks(x, weight, bias, seq_idx, dout=None):
    """csrc/causal_conv1d.cpp, causal_conv1d_fwd (and causal_conv1d_bwd when dout is given)."""
    input_type, weight_type = x.dtype, weight.dtype
    torch_check(input_type in (torch.float32, *HALF), "input_type == Float || Half || BFloat16")
    torch_check(weight_type in (torch.float32, *HALF), "weight_type == Float || Half || BFloat16")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    check_shape(x, "x", batch, dim, seqlen)
    check_shape(weight, "weight", dim, width)
    if dout is not None:
        check_shape(dout, "dout", batch, dim, seqlen)
    torch_check(x.stride(2) == 1 or x.stride(1) == 1, "x.stride(2) == 1 || x.stride(1) == 1")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        torch_check(dim % 8 == 0, "dim % 8 == 0 (channel-last layout)")
        torch_check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "x.stride(2) % 8 == 0 && x.stride(0) % 8 == 0")
        if dout is not None:  # causal_conv1d_bwd brings dout to x's layout first, then checks it
            if dout.stride(1) != 1:
                dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
            torch_check(dout.stride(2) % 8 == 0 and dout.stride(0) % 8 == 0,
                        "dout.stride(2) % 8 == 0 && dout.stride(0) % 8 == 0")
    torch_check(2 <= width <= 4, "width >= 2 && width <= 4")
    if bias is not None:
        torch_check(bias.dtype == weight_type, "bias.scalar_type() == weight_type")
        torch_check(bias.stride(-1) == 1, "bias.stride(-1) == 1")
        check_shape(bias, "bias", dim)
    if seq_idx is not None:
        torch_check(channel_last, "seq_idx is only supported for channel last layout")
        torch_check(seq_idx.dtype == torch.int32, "seq_idx.scalar_type() == kInt32")


class _FakeCausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                final_states_out=None, activation=None):
        # causal_conv1d_interface.py, CausalConv1dFn.forward, in its order
        if activation not in [None, "silu", "swish"]:
            raise NotImplementedError("activation must be None, silu, or swish")
        if x.stride(2) != 1 and x.stride(1) != 1:
            x = x.contiguous()
        bias = bias.contiguous() if bias is not None else None
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None  # a str here fails as in 1.1+
        if initial_states is not None or return_final_states:
            raise NotImplementedError("the stand-in does not model state passing (MUSE never uses it)")
        _conv_checks(x, weight, bias, seq_idx)
        ctx.silu = activation in ("silu", "swish")
        ctx.save_for_backward(x, weight, bias)
        ctx.has_bias = bias is not None
        STANDIN_CALLS["conv"] += 1
        STANDIN_CALLS["conv_layout"] = "channel-last" if x.stride(1) == 1 and x.stride(2) > 1 else "channel-first"
        with torch.no_grad():
            out = _conv_reference(x, weight, bias, ctx.silu)
        return out.to(x.dtype)  # cpp_functions.py: out = torch.empty_like(x)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        if dout.stride(2) != 1 and dout.stride(1) != 1:
            dout = dout.contiguous()
        _conv_checks(x, weight, bias, None, dout)
        with torch.enable_grad():
            xs = x.detach().float().requires_grad_()
            ws = weight.detach().float().requires_grad_()
            bs = bias.detach().float().requires_grad_() if bias is not None else None
            out = _conv_reference(xs, ws, bs, ctx.silu)
            grads = torch.autograd.grad(out, [t for t in (xs, ws, bs) if t is not None], dout.float())
        # cpp_functions.py: dx = empty_like(x); dweight, dbias = zeros_like(..., dtype=float32)
        dx, dw = grads[0].to(x.dtype), grads[1]
        db = grads[2] if bias is not None else None
        return dx, dw, db, None, None, None, None, None


def _conv_reference(x, weight, bias, silu):
    return causal_conv1d_torch(x.float(), weight.float(), None if bias is None else bias.float(),
                               "silu" if silu else None)


def fake_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                          final_states_out=None, activation=None):
    """causal_conv1d_interface.py: causal_conv1d_fn (same parameters, same order)."""
    return _FakeCausalConv1dFn.apply(x, weight, bias, seq_idx, initial_states, return_final_states,
                                     final_states_out, activation)


# ----------------------------------------------------------------------- selective-scan stand-in
def _scan_checks(u, delta, A, B, C, D, z, delta_bias, dout=None):  # noqa: N803
    """csrc/selective_scan/selective_scan.cpp, selective_scan_fwd (and _bwd when dout is given)."""
    input_type, weight_type = u.dtype, A.dtype
    torch_check(input_type in (torch.float32, *HALF), "input_type == Float || Half || BFloat16")
    torch_check(weight_type in (torch.float32, torch.complex64), "weight_type == Float || ComplexFloat")
    variable_b, variable_c = B.dim() >= 3, C.dim() >= 3
    torch_check(delta.dtype == input_type, "delta.scalar_type() == input_type")
    torch_check(B.dtype == (input_type if variable_b else weight_type),
                "B.scalar_type() == (!is_variable_B ? weight_type : input_type)")
    torch_check(C.dtype == (input_type if variable_c else weight_type),
                "C.scalar_type() == (!is_variable_C ? weight_type : input_type)")
    if dout is not None:
        torch_check(dout.dtype == input_type, "dout.scalar_type() == input_type")
        torch_check(dout.stride(-1) == 1 or dout.size(-1) == 1, "dout.stride(-1) == 1 || dout.size(-1) == 1")
    torch_check(u.stride(-1) == 1 or u.size(-1) == 1, "u.stride(-1) == 1 || u.size(-1) == 1")
    torch_check(delta.stride(-1) == 1 or delta.size(-1) == 1, "delta.stride(-1) == 1 || delta.size(-1) == 1")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_groups = B.shape[1] if variable_b else 1
    torch_check(dstate <= 256, "selective_scan only supports state dimension <= 256")
    check_shape(u, "u", batch, dim, seqlen)
    check_shape(delta, "delta", batch, dim, seqlen)
    check_shape(A, "A", dim, dstate)
    for name, m, variable in (("B", B, variable_b), ("C", C, variable_c)):
        if variable:
            check_shape(m, name, batch, n_groups, dstate, seqlen)
            torch_check(m.stride(-1) == 1 or m.size(-1) == 1, f"{name}.stride(-1) == 1 || {name}.size(-1) == 1")
        else:
            check_shape(m, name, dim, dstate)
    if dout is not None:
        check_shape(dout, "dout", batch, dim, seqlen)
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            torch_check(v.dtype == torch.float32, f"{name}.scalar_type() == Float")
            torch_check(v.stride(-1) == 1 or v.size(-1) == 1, f"{name}.stride(-1) == 1 || {name}.size(-1) == 1")
            check_shape(v, name, dim)
    if z is not None:
        torch_check(z.dtype == input_type, "z.scalar_type() == input_type")
        torch_check(z.stride(-1) == 1 or z.size(-1) == 1, "z.stride(-1) == 1 || z.size(-1) == 1")
        check_shape(z, "z", batch, dim, seqlen)


class _FakeSelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,  # noqa: N803
                return_last_state=False):
        # selective_scan_interface.py, SelectiveScanFn.forward: the layout fix-ups the wrapper makes
        if u.stride(-1) != 1:
            u = u.contiguous()
        if delta.stride(-1) != 1:
            delta = delta.contiguous()
        if D is not None:
            D = D.contiguous()  # noqa: N806
        if B.stride(-1) != 1:
            B = B.contiguous()  # noqa: N806
        if C.stride(-1) != 1:
            C = C.contiguous()  # noqa: N806
        if z is not None and z.stride(-1) != 1:
            z = z.contiguous()
        ctx.squeeze = (B.dim() == 3, C.dim() == 3)
        if B.dim() == 3:
            B = B[:, None]  # noqa: N806  ("b dstate l -> b 1 dstate l")
        if C.dim() == 3:
            C = C[:, None]  # noqa: N806
        if return_last_state:
            raise NotImplementedError("the stand-in does not model return_last_state (MUSE never uses it)")
        _scan_checks(u, delta, A, B, C, D, z, delta_bias)
        torch_check(B.dim() < 3 or B.shape[1] == 1, "stand-in: one group (the reference has no groups)")
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        STANDIN_CALLS["scan"] += 1
        STANDIN_CALLS["deltas"].append(delta.detach().clone())
        with torch.no_grad():
            y = _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        # out = empty_like(delta), out_z = empty_like(z): both input_type
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):  # noqa: N803
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors  # noqa: N806
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        _scan_checks(u, delta, A, B, C, D, z, delta_bias, dout)
        inputs = [u, delta, A, B, C, D, z, delta_bias]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().float().requires_grad_() for t in inputs]
            y = _scan_reference(*leaves, ctx.delta_softplus)
            live = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(y, live, dout.float()))
        out = [None if t is None else next(grads) for t in inputs]
        # selective_scan_bwd: du = empty_like(u), ddelta = empty_like(delta), dz = empty_like(z)
        # (input_type); dA, dD, ddelta_bias like their (float32) inputs; variable dB / dC float32.
        for i in (0, 1, 6):
            if out[i] is not None:
                out[i] = out[i].to(inputs[i].dtype)
        for i, squeeze in zip((3, 4), ctx.squeeze, strict=True):  # the group dim the wrapper added
            if squeeze:
                out[i] = out[i][:, 0]
        return (*out, None, None)


def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: N803
    b = B[:, 0] if B.dim() == 4 else B
    c = C[:, 0] if C.dim() == 4 else C
    f = [None if t is None else t.float() for t in (u, delta, A, b, c, D, z, delta_bias)]
    return selective_scan_ref(*f, delta_softplus=delta_softplus)


def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,  # noqa: N803
                           return_last_state=False):
    """selective_scan_interface.py: selective_scan_fn (same parameters, same order)."""
    return _FakeSelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


STANDIN_CALLS: dict = {"conv": 0, "scan": 0, "deltas": []}


@pytest.fixture
def kernels(monkeypatch):
    """Stand-ins patched in, the CUDA branch of the dispatch taken for CPU tensors; yields call counts."""
    STANDIN_CALLS.update(conv=0, scan=0, deltas=[])
    monkeypatch.delenv("MUSE_SCAN", raising=False)
    monkeypatch.delenv("MUSE_CONV", raising=False)
    monkeypatch.setattr(conv_mod, "_kernel", lambda: fake_causal_conv1d_fn)
    monkeypatch.setattr(scan_mod, "_mamba_kernel", lambda: fake_selective_scan_fn)
    monkeypatch.setattr(dispatch, "on_kernel_device", lambda x: True)
    yield STANDIN_CALLS


# ------------------------------------------------------------------------ CUDA's autocast policy
# CUDA autocast's float32 ops (torch.amp docs, "CUDA Ops that can autocast to float32") that the
# models use and CPU autocast leaves in bf16. Matmuls / linear / conv run in bf16 on both.
CUDA_FP32_OPS = ("softplus", "exp", "expm1", "log", "log1p", "pow.Tensor_Scalar", "rsqrt", "reciprocal",
                 "layer_norm", "_softmax", "_log_softmax", "softmax.int", "log_softmax.int", "sum",
                 "sum.dim_IntList", "cumsum", "norm.ScalarOpt_dim", "linalg_vector_norm")


@contextmanager
def cuda_autocast():
    """torch.autocast("cpu", bf16) with CUDA's float32 list: softplus & co. compute in float32."""
    lib = torch.library.Library("aten", "IMPL")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32(name: str):
        op = torch.ops.aten
        for part in name.split("."):
            op = getattr(op, part)

        def kernel(*args, **kwargs):
            cast = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t  # noqa: E731
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
            with torch._C._ExcludeDispatchKeyGuard(keys):
                return op(*args, **kwargs)

        return kernel

    for name in CUDA_FP32_OPS:
        lib.impl(name, fp32(name), "AutocastCPU")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        lib._destroy()


def test_cuda_autocast_policy_reproduces_cuda_dtypes():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with cuda_autocast():
        y = F.linear(x, w)
        assert y.dtype == torch.bfloat16
        assert F.softplus(y).dtype == torch.float32
        assert F.layer_norm(y, (8,)).dtype == torch.float32
        assert F.log_softmax(y, -1).dtype == torch.float32
        assert F.conv1d(torch.randn(1, 8, 10), torch.randn(8, 1, 4), groups=8).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.softplus(F.linear(x, w)).dtype == torch.bfloat16  # policy removed again


# ------------------------------------------------------------------- the stand-ins are faithful
def test_standins_reject_what_the_kernels_reject():
    x, w, b = torch.randn(2, 16, 9), torch.randn(16, 4), torch.randn(16)
    # the call conv.py made before: since causal-conv1d 1.1 the 4th positional is seq_idx
    with pytest.raises(AttributeError):
        fake_causal_conv1d_fn(x, w, b, "silu")
    with pytest.raises(RuntimeError, match="width"):
        fake_causal_conv1d_fn(x, torch.randn(16, 5), activation="silu")
    with pytest.raises(RuntimeError, match="bias.scalar_type"):
        fake_causal_conv1d_fn(x, w, b.bfloat16(), activation="silu")
    # the call bimamba made under bf16 autocast: delta float32, u bf16
    u = torch.randn(2, 16, 9).bfloat16()
    a = -torch.rand(16, 4)
    bm, cm = torch.randn(2, 4, 9).bfloat16(), torch.randn(2, 4, 9).bfloat16()
    with pytest.raises(RuntimeError, match="delta.scalar_type"):
        fake_selective_scan_fn(u, torch.rand(2, 16, 9), a, bm, cm)
    with pytest.raises(RuntimeError, match="D.scalar_type"):
        fake_selective_scan_fn(u, torch.rand(2, 16, 9).bfloat16(), a, bm, cm, D=torch.ones(16).bfloat16())
    with pytest.raises(RuntimeError, match="B.scalar_type"):
        fake_selective_scan_fn(u, torch.rand(2, 16, 9).bfloat16(), a, bm.float(), cm)


def test_standins_compute_the_reference():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64).float() for s in ((2, 16, 9), (16, 4), (16,)))
    torch.testing.assert_close(fake_causal_conv1d_fn(x, w, b, activation="silu"), causal_conv1d_torch(x, w, b))
    u, d, z = (torch.randn(2, 16, 9, generator=g) for _ in range(3))
    a, bm, cm = -torch.rand(16, 4, generator=g), torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    torch.testing.assert_close(fake_selective_scan_fn(u, d, a, bm, cm, z=z, delta_softplus=True),
                               selective_scan_ref(u, d, a, bm, cm, z=z, delta_softplus=True))


# ------------------------------------------------------------------------- the dispatch contract
def _inputs(dtype, b=2, d=16, length=37, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    return dict(u=r(b, d, length), delta=torch.rand(b, d, length, generator=g).float() * 0.5,
                A=-(torch.rand(d, n, generator=g) * 2), B=r(b, n, length), C=r(b, n, length),
                D=torch.randn(d, generator=g), z=r(b, d, length), delta_bias=0.3 * torch.randn(d, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_dispatch_meets_kernel_checks_and_matches_reference(kernels, dtype):
    """Mixed dtypes as autocast produces them (delta float32, u bf16; A, D, delta_bias float32) and
    non-contiguous views: the dispatch must hand the kernel what it accepts; values and gradients
    equal the reference's."""
    x = _inputs(dtype)
    x["u"] = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) != 1
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    y = selective_scan(**leaves, delta_softplus=True)
    assert kernels["scan"] == 1 and y.dtype == dtype
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), gy)
    ref_leaves = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    y_ref = selective_scan_ref(**ref_leaves, delta_softplus=True)
    ref_grads = torch.autograd.grad(y_ref, list(ref_leaves.values()), gy.float())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    for name, a, b in zip(leaves, grads, ref_grads, strict=True):
        assert a.dtype == leaves[name].dtype, name
        torch.testing.assert_close(a.float(), b, **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channel-last view", "odd-width channel-last"])
def test_conv_dispatch_meets_kernel_checks_and_matches_reference(kernels, dtype, layout):
    """The conv sees [B, D, L] views of a [B, L, 2D] projection (channel-last, any D): the dispatch
    passes activation by keyword and a layout the kernel accepts."""
    d = 13 if layout.startswith("odd") else 16
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(2, 21, 2 * d, generator=g).to(dtype)
    x = proj[..., :d].transpose(1, 2) if layout != "contiguous" else proj[..., :d].transpose(1, 2).contiguous()
    x = x.detach().requires_grad_()
    w = torch.randn(d, 4, generator=g).requires_grad_()
    b = torch.randn(d, generator=g).requires_grad_()
    y = causal_conv1d(x, w, b, "silu")
    assert kernels["conv"] == 1 and y.dtype == dtype
    # an aligned channel-last view goes to the kernel as it is (no copy); others channel-first
    assert kernels["conv_layout"] == ("channel-last" if layout == "channel-last view" else "channel-first")
    gy = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    y_ref = causal_conv1d_torch(xr, wr, br, "silu")
    ref = torch.autograd.grad(y_ref, (xr, wr, br), gy.float())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    for a, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(a.float(), r, **tol)


def _bimamba_case(seed=0):
    torch.manual_seed(seed)
    m = BiMamba(32, d_state=4)
    x = torch.randn(3, 20, 32)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[1, 14:] = True
    pad[2, 7:] = True
    return m, x, pad


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast"])
def test_bimamba_cuda_path_matches_reference_with_exact_padding(kernels, precision):
    """BiMamba through the CUDA dispatch (stand-in kernels) against its reference path: values and
    gradients at real tokens, delta exactly 0 at every pad, in float32 and under CUDA's bf16 policy."""
    m, x, pad = _bimamba_case()
    ctx = cuda_autocast() if precision != "float32" else torch.autocast("cpu", enabled=False)
    with ctx:
        y = m(x, pad)
    assert kernels["scan"] == 2 and kernels["conv"] == 2  # both directions took the kernels
    grads = torch.autograd.grad(y[~pad].float().square().sum(), list(m.parameters()))
    # delta handed to the kernel: u's dtype, exactly 0 at the pads (forward direction, then flipped)
    d_fwd, d_bwd = kernels["deltas"]
    want = torch.float32 if precision == "float32" else torch.bfloat16
    assert d_fwd.dtype == want and d_bwd.dtype == want
    assert (d_fwd.permute(0, 2, 1)[pad] == 0).all()
    assert (d_bwd.permute(0, 2, 1)[pad.flip(-1)] == 0).all()
    assert (d_fwd.permute(0, 2, 1)[~pad] > 0).all()

    y_ref = m(x, pad, reference=True)
    ref = torch.autograd.grad(y_ref[~pad].square().sum(), list(m.parameters()))
    if precision == "float32":
        torch.testing.assert_close(y[~pad], y_ref[~pad], atol=1e-5, rtol=1e-5)
        for (name, _), a, b in zip(m.named_parameters(), grads, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    else:
        assert y.dtype == torch.bfloat16
        err = (y[~pad].float() - y_ref[~pad]).norm() / y_ref[~pad].norm()
        assert err < 0.02, err
        for (name, _), a, b in zip(m.named_parameters(), grads, ref, strict=True):
            rel = (a.float() - b).norm() / b.norm().clamp_min(1e-12)
            assert rel < 0.05, (name, float(rel))


def test_bimamba_cuda_path_padding_changes_nothing(kernels):
    """Real tokens of a right-padded sequence equal the unpadded sequence's, through the kernels."""
    m, x, _ = _bimamba_case()
    pad = torch.zeros(1, 20, dtype=torch.bool)
    pad[0, 12:] = True
    padded = x[:1].clone()
    padded[0, 12:] = 1e3  # garbage at the pads must not leak in
    y_pad = m(padded, pad)[0, :12]
    y_short = m(x[:1, :12], None)[0]
    torch.testing.assert_close(y_pad, y_short, atol=1e-5, rtol=1e-5)


def test_muse_head_trains_under_cuda_policy(kernels):
    """A tiny muse head's step under CUDA's bf16 policy with the stand-in kernels: the loss in
    float32 as the trainer computes it, finite gradients, close to the float32 step."""
    from muse_pipeline.models.loss import contrastive_loss
    from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel

    torch.manual_seed(0)
    model = RetrievalModel(ModelConfig(head="muse", dim=32, grid=2, max_frames=3, d_state=4, depth=1,
                                       drop_max=0.0, scales=(1.0,)))
    g = torch.Generator().manual_seed(0)
    tokens, text = torch.randn(4, 3, 5, 32, generator=g), torch.randn(4, 32, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)

    def step(ctx):
        with ctx:
            v = model.embed_videos(tokens, mask)
            t = model.embed_texts(text)
        loss = contrastive_loss(t.float(), v.float(), model.logit_scale)
        return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    loss32, g32 = step(torch.autocast("cpu", enabled=False))
    calls = kernels["scan"]
    loss16, g16 = step(cuda_autocast())
    assert kernels["scan"] > calls
    assert torch.isfinite(loss16) and all(torch.isfinite(x).all() for x in g16)
    assert abs(float(loss16) - float(loss32)) < 0.05 * abs(float(loss32)) + 1e-3
    flat32, flat16 = torch.cat([x.flatten() for x in g32]), torch.cat([x.float().flatten() for x in g16])
    assert float((flat16 - flat32).norm() / flat32.norm()) < 0.1


# ------------------------------------------------------------------------------ backend report
def test_kernel_backends_warn_record_and_require(kernels, monkeypatch, caplog):
    from muse_pipeline.errors import UserError
    from muse_pipeline.models.backends import KernelsMissing, check_kernels

    assert check_kernels("cpu") == {"scan": "mamba_ssm", "conv": "causal_conv1d", "mixer": "autograd",
                                    "device": "cuda"}
    monkeypatch.setattr(scan_mod, "_mamba_kernel", lambda: None)
    monkeypatch.setattr(conv_mod, "_kernel", lambda: None)
    with caplog.at_level(logging.WARNING, logger="muse_pipeline.models.backends"):
        got = check_kernels("cpu")
    assert got["scan"] == "torch" and got["conv"] == "torch"
    assert "plain PyTorch" in caplog.text and "slower" in caplog.text
    with pytest.raises(KernelsMissing, match="--require-kernels") as info:
        check_kernels("cpu", require=True)
    assert isinstance(info.value, UserError)


def test_require_kernels_on_cpu_is_a_user_error():
    from muse_pipeline.models.backends import KernelsMissing, check_kernels

    assert check_kernels("cpu")["device"] == "cpu"
    assert check_kernels("cpu")["mixer"] == "fused-cpu"  # numba is a dependency
    with pytest.raises(KernelsMissing, match="CUDA device"):
        check_kernels("cpu", require=True)
