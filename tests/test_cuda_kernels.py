"""CUDA kernels (mamba_ssm selective_scan_fn, causal_conv1d_fn) against the pure-torch paths.

Runs only on a CUDA machine with the kernels installed (`pip install .[cuda]`); `make gpu-check` runs it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from muse_pipeline.models.bimamba import BiMamba
from muse_pipeline.models.conv import causal_conv1d_torch
from muse_pipeline.models.scan import selective_scan_torch

HAS_CUDA = torch.cuda.is_available()
HAS_MAMBA = importlib.util.find_spec("mamba_ssm") is not None
HAS_CONV = importlib.util.find_spec("causal_conv1d") is not None

needs_mamba = pytest.mark.skipif(not (HAS_CUDA and HAS_MAMBA), reason="needs CUDA and the mamba_ssm package")
needs_conv = pytest.mark.skipif(not (HAS_CUDA and HAS_CONV), reason="needs CUDA and the causal_conv1d package")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def inputs(b=2, d=64, length=300, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).cuda()

    return dict(
        u=r(b, d, length), delta=r(b, d, length, scale=0.5), A=-(torch.rand(d, n, generator=g) * 2).cuda(),
        B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d, scale=0.3),
    )


def grads(fn, x, gy):
    x = {k: v.clone().requires_grad_() for k, v in x.items()}
    y = fn(**x, delta_softplus=True)
    return y, torch.autograd.grad(y, list(x.values()), gy)


@needs_mamba
@pytest.mark.parametrize("length", [1, 300, 2048])
def test_mamba_ssm_scan_matches_torch_path(length):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    x = inputs(length=length)
    gy = torch.randn(2, 64, length, device="cuda")
    y_k, g_k = grads(selective_scan_fn, x, gy)
    y_t, g_t = grads(selective_scan_torch, x, gy)
    torch.testing.assert_close(y_k, y_t, atol=2e-4, rtol=2e-4)
    for name, a, b in zip(NAMES, g_k, g_t, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=name)


@needs_conv
def test_causal_conv1d_kernel_matches_torch():
    from causal_conv1d import causal_conv1d_fn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 257, generator=g).cuda().requires_grad_()
    w = torch.randn(64, 4, generator=g).cuda().requires_grad_()
    bias = torch.randn(64, generator=g).cuda().requires_grad_()
    gy = torch.randn(2, 64, 257, device="cuda")
    y_k = causal_conv1d_fn(x, w, bias, "silu")
    gk = torch.autograd.grad(y_k, (x, w, bias), gy)
    y_t = causal_conv1d_torch(x, w, bias, "silu")
    gt = torch.autograd.grad(y_t, (x, w, bias), gy)
    torch.testing.assert_close(y_k, y_t, atol=1e-4, rtol=1e-4)
    for a, b in zip(gk, gt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@needs_mamba
def test_bimamba_kernel_path_matches_torch_path_with_padding(monkeypatch):
    torch.manual_seed(0)
    m = BiMamba(64).cuda()
    x = torch.randn(2, 200, 64, device="cuda")
    pad = torch.zeros(2, 200, dtype=torch.bool, device="cuda")
    pad[1, 150:] = True
    monkeypatch.setenv("MUSE_SCAN", "mamba_ssm")
    y_k = m(x, pad)
    gk = torch.autograd.grad(y_k[~pad].sum(), list(m.parameters()))
    monkeypatch.setenv("MUSE_SCAN", "torch")
    monkeypatch.setenv("MUSE_CONV", "torch")
    y_t = m(x, pad)
    gt = torch.autograd.grad(y_t[~pad].sum(), list(m.parameters()))
    torch.testing.assert_close(y_k[~pad], y_t[~pad], atol=2e-4, rtol=2e-4)
    for a, b in zip(gk, gt, strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)
