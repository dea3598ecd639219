"""Selective scan: the fused numba kernel (CPU) and the chunked torch path against the sequential
reference, values and all gradients; the causal conv's shifted CPU path against F.conv1d."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import muse_pipeline.models.scan as scan_mod
from muse_pipeline.models import conv as conv_mod
from muse_pipeline.models import scan_numba
from muse_pipeline.models.conv import causal_conv1d, causal_conv1d_shifted, causal_conv1d_torch
from muse_pipeline.models.scan import (
    chunk_size,
    linear_scan_,
    linear_scan_reverse_,
    scan_backend,
    selective_scan,
    selective_scan_torch,
)
from muse_pipeline.models.scan_numba import selective_scan_numba
from muse_pipeline.models.scan_ref import selective_scan_ref

FAST = {"torch": selective_scan_torch, "numba": selective_scan_numba}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, length, n, dtype=torch.float64, fixed_b=False, fixed_c=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        u=r(b, d, length),
        delta=0.5 * r(b, d, length),
        A=-2.0 * torch.rand(d, n, generator=g, dtype=dtype),
        B=r(d, n) if fixed_b else r(b, n, length),
        C=r(d, n) if fixed_c else r(b, n, length),
        D=r(d),
        z=r(b, d, length),
        delta_bias=0.3 * r(d),
    )


def run_both(inputs, softplus=True, fn=selective_scan_torch):
    """y and the gradients of every given input, for the reference and `fn`, under one random dL/dy."""
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: v.clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    new_in = {k: v.clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    y_ref = selective_scan_ref(**ref_in, delta_softplus=softplus)
    y_new = fn(**new_in, delta_softplus=softplus)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(y_ref.dtype)
    g_ref = torch.autograd.grad(y_ref, [ref_in[k] for k in names], gy)
    g_new = torch.autograd.grad(y_new, [new_in[k] for k in names], gy)
    return y_ref, y_new, dict(zip(names, g_ref, strict=True)), dict(zip(names, g_new, strict=True))


@pytest.mark.parametrize("impl", sorted(FAST))
@pytest.mark.parametrize(
    "b,d,length,n,fixed_b,fixed_c",
    [
        (2, 3, 1, 4, False, False),  # L = 1
        (2, 3, 17, 4, False, False),  # L not a multiple of the chunk (5)
        (1, 5, 64, 8, False, False),  # exact multiple (torch: of the chunk; numba: one checkpoint interval)
        (2, 3, 30, 4, True, False),  # time-invariant B
        (2, 4, 23, 3, False, True),  # time-invariant C
        (1, 3, 150, 4, True, True),  # both fixed; numba: 3 checkpoint intervals, the last one partial
        (2, 11, 129, 5, False, False),  # numba: channel groups of unequal size, one step past 2 intervals
        (2, 3, 150, 16, False, False),  # numba: d_state 16 takes the kernels' constant-trip-count branch
        (1, 4, 70, 16, True, True),  # ... with fixed B and C
    ],
)
def test_float64_values_and_grads_match_reference(impl, b, d, length, n, fixed_b, fixed_c):
    inputs = make_inputs(b, d, length, n, fixed_b=fixed_b, fixed_c=fixed_c)
    y_ref, y_new, g_ref, g_new = run_both(inputs, fn=FAST[impl])
    assert y_new.dtype == torch.float64
    torch.testing.assert_close(y_new, y_ref, atol=1e-10, rtol=1e-10)
    for name in NAMES:
        assert g_new[name].shape == inputs[name].shape
        torch.testing.assert_close(g_new[name], g_ref[name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("impl", sorted(FAST))
@pytest.mark.parametrize("n", [8, 16])
def test_float32_matches_reference_loosely(impl, n):
    inputs = make_inputs(2, 6, 150, n, dtype=torch.float32, seed=3)
    y_ref, y_new, g_ref, g_new = run_both(inputs, fn=FAST[impl])
    assert y_new.dtype == torch.float32
    torch.testing.assert_close(y_new, y_ref, atol=1e-4, rtol=1e-4)
    for name in NAMES:
        assert g_new[name].dtype == torch.float32
        torch.testing.assert_close(g_new[name], g_ref[name], atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize("impl", sorted(FAST))
def test_without_optional_inputs_and_softplus(impl):
    inputs = make_inputs(2, 3, 70, 4, seed=5)
    core = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    y_ref, y_new, g_ref, g_new = run_both(core, softplus=False, fn=FAST[impl])
    torch.testing.assert_close(y_new, y_ref, atol=1e-10, rtol=1e-10)
    for name in core:
        torch.testing.assert_close(g_new[name], g_ref[name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_numba_long_sequence(dtype, tol):
    # 3,000 steps: 47 checkpoint intervals recomputed in the backward, float32 sums over long L.
    inputs = make_inputs(1, 3, 3000, 4, dtype=dtype, seed=13)
    y_ref, y_new, g_ref, g_new = run_both(inputs, fn=selective_scan_numba)
    torch.testing.assert_close(y_new, y_ref, atol=tol, rtol=tol)
    for name in NAMES:
        torch.testing.assert_close(g_new[name], g_ref[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_extreme_decay_values_and_grads(dtype):
    # delta*A from 0 down to -1000: exp underflows to 0 (float32: the kernel's own exp, below -104),
    # and the state is cut at those steps; values and gradients stay finite and match the reference.
    inputs = make_inputs(2, 3, 90, 4, dtype=dtype, seed=17)
    inputs["A"] = -torch.logspace(-2, 2, 12, dtype=dtype).reshape(3, 4)
    inputs["delta"] = torch.rand(2, 3, 90, generator=torch.Generator().manual_seed(1), dtype=dtype) * 10
    inputs["delta_bias"] = None
    y_ref, y_new, g_ref, g_new = run_both(inputs, softplus=False, fn=selective_scan_numba)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.isfinite(y_new).all()
    torch.testing.assert_close(y_new, y_ref, atol=tol, rtol=tol)
    for name in g_ref:
        assert torch.isfinite(g_new[name]).all(), name
        torch.testing.assert_close(g_new[name], g_ref[name], atol=tol * 10, rtol=tol * 10, msg=name)


def test_numba_exp_float32_accuracy():
    # the kernel's float32 exp against float64 exp: within 1 ulp-ish everywhere it is normal, 0 / inf
    # outside the float32 range, nan through.
    import numba
    import numpy as np

    @numba.njit
    def exps(x, out):
        for i in range(x.shape[0]):
            out[i] = scan_numba.typed_exp(x[i])

    x = np.concatenate([np.linspace(-110, 95, 200_001, dtype=np.float32),
                        np.array([0, -0.0, np.nan, -np.inf, np.inf], dtype=np.float32)])
    out = np.empty_like(x)
    exps(x, out)
    exact = np.exp(x.astype(np.float64))
    normal = (exact > 1.2e-38) & (x < 88.7)
    assert np.max(np.abs(out[normal] - exact[normal]) / exact[normal]) < 1.5e-7
    assert np.all(out[x < -104] == 0) and np.all(np.isinf(out[x > 88.73]))
    assert out[-5] == 1.0 and out[-4] == 1.0 and np.isnan(out[-3]) and out[-2] == 0 and np.isinf(out[-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_padding_passes_state_through_exactly(dtype):
    # delta = 0 at padding: a = exp(0) = 1 and b = 0, so h crosses the padding unchanged. Real steps after
    # a padded stretch (inside and across checkpoint intervals) must equal the scan without it, bit for
    # bit, and so must the gradients of the real steps' inputs.
    g = torch.Generator().manual_seed(21)
    real = make_inputs(2, 3, 100, 4, dtype=dtype, seed=21)
    real["delta_bias"] = None
    pad_at = torch.zeros(100 + 70, dtype=torch.bool)
    pad_at[30:60] = True  # inside the first interval
    pad_at[120:160] = True  # spanning the interval border at 128
    keep = ~pad_at

    def widen(x):  # [.., 100] -> [.., 170] with random garbage at the padding
        out = torch.randn(*x.shape[:-1], 170, generator=g, dtype=dtype)
        out[..., keep] = x
        return out

    padded = {k: widen(v) if v is not None and v.shape[-1] == 100 else v for k, v in real.items()}
    padded["delta"][..., pad_at] = 0.0
    ins_p = {k: v.clone().requires_grad_() if v is not None else None for k, v in padded.items()}
    ins_r = {k: v.clone().requires_grad_() if v is not None else None for k, v in real.items()}
    y_p = selective_scan_numba(**ins_p)
    y_r = selective_scan_numba(**ins_r)
    assert torch.equal(y_p[..., keep], y_r)
    gy = torch.randn(y_r.shape, generator=g, dtype=dtype)
    gy_p = torch.zeros_like(y_p)
    gy_p[..., keep] = gy
    (y_p * gy_p).sum().backward()
    (y_r * gy).sum().backward()
    for name in ("u", "delta", "B", "C", "z"):
        torch.testing.assert_close(ins_p[name].grad[..., keep], ins_r[name].grad, atol=0, rtol=1e-12, msg=name)
    for name in ("A", "D"):
        torch.testing.assert_close(ins_p[name].grad, ins_r[name].grad, atol=1e-12, rtol=1e-9, msg=name)
    torch.testing.assert_close(y_p, selective_scan_ref(**padded), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_numba_half_inputs_compute_in_float32(half):
    inputs = make_inputs(1, 4, 80, 4, dtype=torch.float32, seed=2)
    half_in = {k: v.to(half).requires_grad_() for k, v in inputs.items()}
    y = selective_scan_numba(**half_in, delta_softplus=True)
    assert y.dtype == half
    f32_in = {k: v.detach().float().requires_grad_() for k, v in half_in.items()}
    y32 = selective_scan_ref(**f32_in, delta_softplus=True)
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(half)
    (y * gy).sum().backward()
    (y32 * gy.float()).sum().backward()
    for name in NAMES:
        assert half_in[name].grad.dtype == half, name
        ref = f32_in[name].grad
        torch.testing.assert_close(half_in[name].grad.float(), ref, atol=3e-2 * ref.abs().max().item() + 1e-3,
                                   rtol=3e-2, msg=name)


def test_numba_saves_no_state_sized_tensors():
    # The backward's saved tensors are O(B*D*L) (u, delta, z, checkpoints every 64 steps), not the
    # B*D*L*N states: with N = 16 the states alone would be 16x u's size.
    inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 8, 640, 16, dtype=torch.float32).items()}
    y = selective_scan_numba(**inputs, delta_softplus=True)
    node = y.grad_fn
    while node is not None and "ScanCoreNumba" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None
    saved = sum(t.numel() for t in node.saved_tensors)
    bdl, bln = 2 * 8 * 640, 2 * 640 * 16
    assert saved <= 3 * bdl + bdl * 16 // scan_numba.CHECKPOINT_EVERY + 2 * bln + 8 * 16 + 8
    with torch.no_grad():  # inference keeps no checkpoints and gives the same values
        torch.testing.assert_close(selective_scan_numba(**inputs, delta_softplus=True), y.detach(), atol=0, rtol=0)


def test_numba_threads_follow_torch():
    # one thread or two: the same values and gradients (the per-group partial sums just change shape)
    import numba

    inputs = make_inputs(1, 10, 70, 4, seed=8)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            torch.set_num_threads(threads)
            results.append(run_both(inputs, fn=selective_scan_numba)[1:])
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    (y1, _, g1), (y2, _, g2) = results
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-12)
    for name in NAMES:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("tile", [1, 96])
def test_several_tiles(monkeypatch, tile):
    # Small tiles force several channel groups and time blocks (the state crossing block borders both
    # ways): tile 1 -> one channel x one step per tile; 96 -> one channel x 12 steps (3 chunks of 4).
    monkeypatch.setattr(scan_mod, "TILE_ELEMENTS", tile)
    assert scan_mod.scan_tiling(2, 5, 21, 4, torch.device("cpu"))[1:] == ((1, 1) if tile == 1 else (12, 4))
    y_ref, y_new, g_ref, g_new = run_both(make_inputs(2, 5, 21, 4, seed=7))
    torch.testing.assert_close(y_new, y_ref, atol=1e-10, rtol=1e-10)
    for name in NAMES:
        torch.testing.assert_close(g_new[name], g_ref[name], atol=1e-10, rtol=1e-10, msg=name)


def test_stable_under_strong_decay_over_long_sequence():
    # exp(delta*A) ~ e^-80 per step: any exp(-cumsum) formulation would overflow; ours must stay finite.
    inputs = make_inputs(1, 2, 400, 4, dtype=torch.float32, seed=11)
    inputs["delta"] = torch.full_like(inputs["delta"], 5.0)
    inputs["A"] = torch.full_like(inputs["A"], -16.0)
    inputs["delta_bias"] = None
    y_ref = selective_scan_ref(**inputs)
    y_new = selective_scan_torch(**inputs)
    assert torch.isfinite(y_new).all()
    torch.testing.assert_close(y_new, y_ref, atol=1e-4, rtol=1e-4)


def test_half_inputs_compute_in_float32_and_return_half():
    inputs = make_inputs(1, 3, 12, 4, dtype=torch.float32, seed=2)
    half = {k: v.half() for k, v in inputs.items()}
    y = selective_scan_torch(**half, delta_softplus=True)
    assert y.dtype == torch.float16
    y32 = selective_scan_ref(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)


def loop_scan(a, b):
    h, out = torch.zeros_like(b[0]), []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out)


def loop_scan_reverse(a, g):
    r, out = torch.zeros_like(g[0]), []
    for t in range(a.shape[0] - 1, -1, -1):
        nxt = a[t + 1] if t + 1 < a.shape[0] else torch.zeros_like(a[0])
        r = g[t] + nxt * r
        out.append(r)
    return torch.stack(out[::-1])


@pytest.mark.parametrize("length,k", [(12, 4), (12, 1), (12, 12), (7, 7)])
def test_linear_scans_match_loops(length, k):
    g = torch.Generator().manual_seed(length * 31 + k)
    a = torch.rand(length, 2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(length, 2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_scan_(a.clone(), b.clone(), k), loop_scan(a, b))
    a_before = a.clone()
    torch.testing.assert_close(linear_scan_reverse_(a, b.clone(), k), loop_scan_reverse(a, b))
    assert torch.equal(a, a_before)  # the reverse scan leaves a intact


def test_chunk_size_is_about_sqrt():
    assert chunk_size(1) == 1
    assert chunk_size(16) == 4
    assert chunk_size(17) == 5
    assert chunk_size(3060) == 56


def test_bad_shapes_raise_clear_errors():
    inputs = make_inputs(2, 3, 8, 4)
    inputs["B"] = inputs["B"][:, :, :5]
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_torch(**inputs)


def test_dispatch_env(monkeypatch, caplog):
    x = torch.zeros(1, 1, 1)
    monkeypatch.setenv("MUSE_SCAN", "torch")
    assert scan_backend(x) == "torch"
    monkeypatch.setenv("MUSE_SCAN", "mamba_ssm")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        scan_backend(x)  # CPU tensors can never use the CUDA kernel
    monkeypatch.setenv("MUSE_SCAN", "numba")
    assert scan_backend(x) == "numba"
    with pytest.raises(RuntimeError, match="numba"):
        scan_backend(torch.zeros(1, 1, 1, device="meta"))  # numba runs on CPU tensors only
    monkeypatch.setenv("MUSE_SCAN", "bogus")
    with pytest.raises(ValueError, match="MUSE_SCAN"):
        scan_backend(x)
    monkeypatch.delenv("MUSE_SCAN")
    assert scan_backend(x) == "numba"  # the CPU default
    assert scan_backend(torch.zeros(1, 1, 1, device="meta")) == "torch"  # any other non-CUDA device
    monkeypatch.setattr(scan_mod, "_logged", set())
    inputs = make_inputs(1, 2, 3, 2)
    with caplog.at_level(logging.INFO, logger="muse_pipeline.models.scan"):
        y = selective_scan(**inputs)
        selective_scan(**inputs)
    assert [r.getMessage() for r in caplog.records].count("selective scan backend: numba") == 1
    torch.testing.assert_close(y, selective_scan_ref(**inputs), atol=1e-12, rtol=1e-12)
    monkeypatch.setenv("MUSE_SCAN", "torch")
    torch.testing.assert_close(selective_scan(**inputs), y, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="B must be"):  # the numba path checks shapes too
        monkeypatch.delenv("MUSE_SCAN")
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :2]})


def test_causal_conv1d_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    expected = torch.empty_like(x)
    for t in range(9):
        acc = bias.clone()[None].expand(2, 3).clone()
        for j in range(4):  # weight[:, j] multiplies x[t - (k-1) + j]; earlier than 0 is zero padding
            src = t - 3 + j
            if src >= 0:
                acc += w[:, j] * x[:, :, src]
        expected[:, :, t] = acc
    torch.testing.assert_close(causal_conv1d_torch(x, w, bias, activation=None), expected)
    torch.testing.assert_close(causal_conv1d(x, w, bias, "silu"), F.silu(expected))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("length,k,bias", [(50, 4, True), (3, 4, True), (1, 4, False), (20, 2, True)])
def test_causal_conv1d_shifted_matches_conv1d(dtype, tol, length, k, bias):
    # the CPU path (k shifted multiply-adds, own backward) against grouped F.conv1d: values and gradients
    g = torch.Generator().manual_seed(length + k)
    x = torch.randn(2, 5, length, generator=g, dtype=dtype)
    w = torch.randn(5, k, generator=g, dtype=dtype)
    b = torch.randn(5, generator=g, dtype=dtype) if bias else None
    gy = torch.randn(2, 5, length, generator=g, dtype=dtype)
    outs, grads = [], []
    for fn in (causal_conv1d_torch, causal_conv1d_shifted):
        ins = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        y = fn(*ins, activation="silu")
        outs.append(y)
        grads.append(torch.autograd.grad(y, [t for t in ins if t is not None], gy))
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
    for g_new, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_new, g_ref, atol=tol, rtol=tol)


def test_causal_conv1d_cpu_dispatch_uses_shifted_path(monkeypatch):
    calls = []
    monkeypatch.setattr(conv_mod, "causal_conv1d_shifted", lambda *a: calls.append(a) or causal_conv1d_torch(*a))
    x = torch.randn(1, 2, 6)
    causal_conv1d(x, torch.randn(2, 4), None, "silu")
    assert len(calls) == 1


# ------------------------------------------------------------ building blocks of the fused CPU mixer


def _flipped_reference(inp: dict) -> torch.Tensor:
    """flip(scan(flip(.))) with the sequential reference: what a reverse scan must equal."""
    f = {k: (v.flip(-1) if k in ("u", "delta", "z") or (k in ("B", "C") and v.ndim == 3) else v) for k, v in inp.items()}
    return selective_scan_ref(**f, delta_softplus=False).flip(-1)


@pytest.mark.parametrize("length, n", [(7, 4), (64, 4), (150, 4), (150, 16)])
def test_numba_reverse_scan_is_the_flipped_scan_with_grads(length, n):
    # the kernels' `reverse` flag (BiMamba's backward direction without flip copies), values and all
    # gradients, against flip(reference(flip(.))); lengths around the 64-step checkpoint interval; n = 16
    # is the kernels' specialised branch
    inputs = make_inputs(2, 5, length, n)
    inputs["delta"] = F.softplus(inputs["delta"])
    inputs.pop("delta_bias")
    names = list(inputs)
    ref_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y_ref = _flipped_reference(ref_in)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g_ref = dict(zip(names, torch.autograd.grad(y_ref, [ref_in[k] for k in names], gy), strict=True))

    u, delta, z = (inputs[k].contiguous() for k in ("u", "delta", "z"))
    bk, ck = (inputs[k].transpose(1, 2).contiguous() for k in ("B", "C"))
    y, ckpt = scan_numba.scan_forward(u, delta, inputs["A"], bk, ck, inputs["D"], z, reverse=True)
    torch.testing.assert_close(y, y_ref.detach(), atol=1e-12, rtol=1e-12)
    dz_acc = torch.ones_like(z)  # dz_into adds to what is there
    du, ddelta, dz, d_a, d_b, d_c, d_d = scan_numba.scan_backward(
        u, delta, inputs["A"], bk, ck, inputs["D"], z, ckpt, gy, reverse=True, dz_into=dz_acc)
    got = dict(u=du, delta=ddelta, z=dz - 1, A=d_a, B=d_b.transpose(1, 2), C=d_c.transpose(1, 2), D=d_d)
    for k, v in got.items():
        torch.testing.assert_close(v, g_ref[k], atol=1e-11, rtol=1e-11, msg=k)


@pytest.mark.parametrize("length,k", [(9, 4), (3, 4), (1, 4), (12, 2)])
def test_shifted_conv_reverse_is_the_flipped_conv_with_grads(length, k):
    # the anti-causal conv of BiMamba's backward direction equals flip(conv(flip(x))), gradients included
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, 3, length, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 3, length, generator=g, dtype=torch.float64)
    expected = causal_conv1d_torch(x.flip(-1), w, b, activation=None).flip(-1)
    want = torch.autograd.grad(expected, (x, w, b), gy)
    y = conv_mod.shifted_conv(x.detach(), w.detach(), b.detach(), reverse=True)
    torch.testing.assert_close(y, expected.detach(), atol=1e-12, rtol=1e-12)
    scratch = torch.full((2, 3, length), float("nan"), dtype=torch.float64)  # must be overwritten, not read
    got = conv_mod.shifted_conv_backward(gy, x.detach(), w.detach(), True, reverse=True, scratch=scratch)
    for a, e, name in zip(got, want, ("x", "w", "b"), strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12, msg=name)
