"""Depthwise causal Conv1d (Mamba's short convolution), with the causal-conv1d CUDA kernel when present."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _kernel():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # the package builds only with CUDA; absent or broken both mean "use torch"
        return None
    return causal_conv1d_fn


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """x: [B, Dm, L], weight: [Dm, k], bias: [Dm] -> [B, Dm, L]; output t sees inputs t-k+1..t (zero left pad)."""
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: x [B, Dm, L] and weight [Dm, k] expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    k = weight.shape[1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(y) if activation is not None else y


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """Same as `causal_conv1d_torch`; on CUDA uses `causal_conv1d.causal_conv1d_fn` when installed
    (env MUSE_CONV=torch forces the torch path)."""
    from muse_pipeline.models.scan import _env_choice

    fn = _kernel() if x.is_cuda and _env_choice("MUSE_CONV") != "torch" else None
    choice = "causal_conv1d" if fn is not None else "torch"
    if choice not in _logged:
        _logged.add(choice)
        log.info("causal conv1d backend: %s", choice)
    if fn is None:
        return causal_conv1d_torch(x, weight, bias, activation)
    return fn(x, weight, bias, activation)
