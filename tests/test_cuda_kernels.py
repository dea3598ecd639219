"""The real CUDA kernels (mamba_ssm selective_scan_fn, causal_conv1d_fn) against the pure-torch paths,
in float32 and bf16, called through the project's dispatch (the calls it makes in training).

Runs only on a CUDA machine with the kernels installed (`pip install -e '.[cuda]' --no-build-isolation`);
`make gpu-check` runs it. tests/test_cuda_contract.py checks the same calls on CPU with stand-ins.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from muse_pipeline.models.bimamba import BiMamba
from muse_pipeline.models.conv import causal_conv1d, causal_conv1d_torch, conv_backend
from muse_pipeline.models.scan import scan_backend, selective_scan, selective_scan_torch

HAS_CUDA = torch.cuda.is_available()
HAS_MAMBA = importlib.util.find_spec("mamba_ssm") is not None
HAS_CONV = importlib.util.find_spec("causal_conv1d") is not None

needs_mamba = pytest.mark.skipif(not (HAS_CUDA and HAS_MAMBA),
                                 reason="needs a CUDA device and the mamba_ssm package (the `cuda` extra)")
needs_conv = pytest.mark.skipif(not (HAS_CUDA and HAS_CONV),
                                reason="needs a CUDA device and the causal_conv1d package (the `cuda` extra)")
DTYPES = [torch.float32, torch.bfloat16]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _tol(dtype, f32, bf16):
    return dict(atol=f32, rtol=f32) if dtype == torch.float32 else dict(atol=bf16, rtol=bf16)


def inputs(dtype, b=2, d=64, length=300, n=16, seed=0):
    """u, B, C, z in `dtype` (as bf16 autocast produces them), delta float32 (softplus's output),
    A, D, delta_bias float32 parameters."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(dt).cuda()

    return dict(
        u=r(b, d, length), delta=r(b, d, length, scale=0.5, dt=torch.float32),
        A=-(torch.rand(d, n, generator=g) * 2).cuda(), B=r(b, n, length), C=r(b, n, length),
        D=r(d, dt=torch.float32), z=r(b, d, length), delta_bias=r(d, scale=0.3, dt=torch.float32),
    )


def spy_kernel(monkeypatch, module: str, name: str) -> list[int]:
    """Count the calls of the kernel `module.name` (the project imports it at call time, so the
    counting wrapper is what its dispatch gets). Without this a broken build that fell back to the
    torch path would compare torch with torch and pass."""
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, counted)
    return calls


def grads(fn, x, gy):
    x = {k: v.clone().requires_grad_() for k, v in x.items()}
    y = fn(**x, delta_softplus=True)
    return y, torch.autograd.grad(y, list(x.values()), gy)


@needs_mamba
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bf16"])
@pytest.mark.parametrize("length", [1, 300, 2048])
def test_mamba_ssm_scan_matches_torch_path(monkeypatch, length, dtype):
    monkeypatch.setenv("MUSE_SCAN", "mamba_ssm")
    calls = spy_kernel(monkeypatch, "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    x = inputs(dtype, length=length)
    gy = torch.randn(2, 64, length, device="cuda").to(dtype)
    assert scan_backend(x["u"]) == "mamba_ssm"
    y_k, g_k = grads(selective_scan, x, gy)
    assert len(calls) == 1, "the mamba_ssm kernel did not run"
    y_t, g_t = grads(selective_scan_torch, {k: v.float() for k, v in x.items()}, gy.float())
    assert y_k.dtype == dtype
    torch.testing.assert_close(y_k.float(), y_t, **_tol(dtype, 2e-4, 5e-2))
    for name, a, b in zip(NAMES, g_k, g_t, strict=True):
        torch.testing.assert_close(a.float(), b, **_tol(dtype, 2e-3, 1e-1), msg=name)


@needs_conv
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bf16"])
def test_causal_conv1d_kernel_matches_torch(monkeypatch, dtype):
    monkeypatch.setenv("MUSE_CONV", "auto")
    g = torch.Generator().manual_seed(0)
    # a channel-last view, as BiMamba's in_proj chunk gives it
    x = torch.randn(2, 257, 128, generator=g).to(dtype).cuda()[..., :64].transpose(1, 2).requires_grad_()
    w = torch.randn(64, 4, generator=g).cuda().requires_grad_()
    bias = torch.randn(64, generator=g).cuda().requires_grad_()
    gy = torch.randn(2, 64, 257, device="cuda").to(dtype)
    calls = spy_kernel(monkeypatch, "causal_conv1d", "causal_conv1d_fn")
    assert conv_backend(x, w) == "causal_conv1d"
    y_k = causal_conv1d(x, w, bias, "silu")
    assert len(calls) == 1, "the causal_conv1d kernel did not run"
    gk = torch.autograd.grad(y_k, (x, w, bias), gy)
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, bias))
    y_t = causal_conv1d_torch(xf, wf, bf, "silu")
    gt = torch.autograd.grad(y_t, (xf, wf, bf), gy.float())
    assert y_k.dtype == dtype
    torch.testing.assert_close(y_k.float(), y_t, **_tol(dtype, 1e-4, 3e-2))
    for a, b in zip(gk, gt, strict=True):
        torch.testing.assert_close(a.float(), b, **_tol(dtype, 1e-3, 5e-2))


@needs_mamba
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_bimamba_kernel_path_matches_torch_path_with_padding(monkeypatch, precision):
    torch.manual_seed(0)
    m = BiMamba(64).cuda()
    x = torch.randn(2, 200, 64, device="cuda")
    pad = torch.zeros(2, 200, dtype=torch.bool, device="cuda")
    pad[1, 150:] = True
    amp = precision != "float32"

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = m(x, pad)
        return y, torch.autograd.grad(y[~pad].float().square().sum(), list(m.parameters()))

    scans = spy_kernel(monkeypatch, "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    convs = spy_kernel(monkeypatch, "causal_conv1d", "causal_conv1d_fn") if HAS_CONV else None
    monkeypatch.setenv("MUSE_SCAN", "mamba_ssm")
    monkeypatch.setenv("MUSE_CONV", "auto")
    y_k, gk = run()
    kernel_calls = (len(scans), len(convs) if convs is not None else None)
    assert kernel_calls[0] >= 2, "BiMamba's two scans did not run in the mamba_ssm kernel"
    assert convs is None or kernel_calls[1] >= 2, "BiMamba's convolutions did not run in the causal_conv1d kernel"
    monkeypatch.setenv("MUSE_SCAN", "torch")
    monkeypatch.setenv("MUSE_CONV", "torch")
    y_t, gt = run()
    assert (len(scans), len(convs) if convs is not None else None) == kernel_calls  # the reference is torch only
    if not amp:
        torch.testing.assert_close(y_k[~pad], y_t[~pad], atol=2e-4, rtol=2e-4)
        for a, b in zip(gk, gt, strict=True):
            torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)
    else:
        rel = (y_k[~pad].float() - y_t[~pad].float()).norm() / y_t[~pad].float().norm()
        assert rel < 0.02, float(rel)
        for (name, _), a, b in zip(m.named_parameters(), gk, gt, strict=True):
            r = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
            assert r < 0.05, (name, float(r))
