"""Depthwise causal Conv1d (Mamba's short convolution), with the causal-conv1d CUDA kernel when present."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from muse_pipeline.models import dispatch

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _kernel():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # the package builds only with CUDA; absent or broken both mean "use torch"
        return None
    return causal_conv1d_fn


def _check_args(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> None:
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: x [B, Dm, L] and weight [Dm, k] expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """x: [B, Dm, L], weight: [Dm, k], bias: [Dm] -> [B, Dm, L]; output t sees inputs t-k+1..t (zero left pad)."""
    _check_args(x, weight, activation)
    k = weight.shape[1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(y) if activation is not None else y


def shifted_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 reverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv as k shifted multiply-adds over the last dim (no activation):
    y[..., t] = bias + sum_j w[:, j] x[..., t-k+1+j]. x: [B, Dm, L], weight [Dm, k], bias [Dm] -> [B, Dm, L].

    `reverse`: the anti-causal conv y[..., t] = bias + sum_j w[:, j] x[..., t+k-1-j], which is
    flip(conv(flip(x))) without the two flips' copies (BiMamba's backward direction). `out`: a buffer
    of x's shape to write y into."""
    length, k = x.shape[-1], weight.shape[1]
    y = torch.mul(x, weight[:, k - 1, None], out=out) if out is not None else x * weight[:, k - 1, None]
    for j in range(k - 1):
        s = k - 1 - j  # how far tap j looks back (ahead when reverse)
        if s < length:
            if reverse:
                y[..., : length - s].addcmul_(x[..., s:], weight[:, j, None])
            else:
                y[..., s:].addcmul_(x[..., : length - s], weight[:, j, None])
    if bias is not None:
        y += bias[:, None]
    return y


def shifted_conv_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                          reverse: bool = False, dx: torch.Tensor | None = None,
                          scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias or None) of `shifted_conv` given gy [B, Dm, L] (contiguous). `dx`: a buffer
    to write dx into; `scratch`: one of x's shape for the weight gradient's products."""
    length, k = x.shape[-1], weight.shape[1]
    dx = torch.mul(gy, weight[:, k - 1, None], out=dx) if dx is not None else gy * weight[:, k - 1, None]
    dw = torch.empty_like(weight)

    def tap_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # sum over batch and time of a * b
        prod = torch.mul(a, b, out=scratch[..., : a.shape[-1]]) if scratch is not None else a * b
        return prod.sum((0, 2))

    dw[:, k - 1] = tap_sum(gy, x)
    for j in range(k - 1):
        s = k - 1 - j
        if s >= length:
            dw[:, j] = 0.0
            continue
        out_part, in_part = (slice(None, length - s), slice(s, None)) if reverse else (slice(s, None), slice(None, length - s))
        dx[..., in_part].addcmul_(gy[..., out_part], weight[:, j, None])
        dw[:, j] = tap_sum(gy[..., out_part], x[..., in_part])
    db = gy.sum((0, 2)) if has_bias else None
    return dx, dw, db


class _ShiftedConv(torch.autograd.Function):
    """`shifted_conv` with its own backward. On CPU, grouped F.conv1d's backward (one tiny convolution
    per channel) cost 15% of the paper-size muse head's training step; k full-width elementwise passes
    give the same values (to float rounding) with a backward several times faster. Saves only x and
    weight."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return shifted_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        return shifted_conv_backward(gy.contiguous(), x, weight, ctx.has_bias)


def causal_conv1d_shifted(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """Same contract as `causal_conv1d_torch`, computed by `_ShiftedConv` (the CPU path)."""
    _check_args(x, weight, activation)
    y = _ShiftedConv.apply(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    return F.silu(y) if activation is not None else y


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """Same as `causal_conv1d_torch`; on CUDA uses `causal_conv1d.causal_conv1d_fn` when installed
    (env MUSE_CONV=torch forces the torch path); on CPU the shifted multiply-adds of
    `causal_conv1d_shifted`."""

    choice = conv_backend(x, weight)
    shifted = choice == "torch" and x.device.type == "cpu"
    shown = "torch (shifted multiply-adds)" if shifted else choice
    if shown not in _logged:
        _logged.add(shown)
        log.info("causal conv1d backend: %s", shown)
    if shifted:
        return causal_conv1d_shifted(x, weight, bias, activation)
    if choice == "torch":
        return causal_conv1d_torch(x, weight, bias, activation)
    return _call_kernel(_kernel(), x, weight, bias, activation)


# Widths the kernel is built for (csrc/causal_conv1d.cpp, causal_conv1d_fwd:
# TORCH_CHECK(width >= 2 && width <= 4)); other widths take the torch path.
KERNEL_WIDTHS = (2, 3, 4)


def conv_backend(x: torch.Tensor, weight: torch.Tensor | None = None) -> str:
    """'causal_conv1d' or 'torch' for x (env MUSE_CONV=torch forces torch)."""
    if dispatch.env_choice("MUSE_CONV") == "torch" or not dispatch.on_kernel_device(x) or _kernel() is None:
        return "torch"
    if weight is not None and weight.shape[-1] not in KERNEL_WIDTHS:
        return "torch"
    return "causal_conv1d"


def _call_kernel(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None) -> torch.Tensor:
    """causal_conv1d_fn with the arguments its checks demand (causal-conv1d 1.4 - 1.6, pinned in the
    `cuda` extra). Facts from causal_conv1d/causal_conv1d_interface.py and csrc/causal_conv1d.cpp:
    - signature (x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
      final_states_out=None, activation=None): since 1.1 the 4th positional is seq_idx, so
      `activation` must be a keyword;
    - x: [B, D, L] float32/float16/bfloat16 with stride(2) == 1 or stride(1) == 1; the channel-last
      case further needs D % 8 == 0 and strides that are multiples of 8: an aligned channel-last view
      (BiMamba's in_proj chunk at D % 8 == 0) goes in as it is, anything else is made channel-first
      contiguous (accepted for any D);
    - weight: [D, width] float32/float16/bfloat16, any dtype relative to x (under bf16 autocast x is
      bf16 and the weight stays float32, which the kernel accepts); bias: [D], same dtype as weight,
      stride(-1) == 1;
    - output: x's dtype (out = torch.empty_like(x)), as F.conv1d gives under autocast."""
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    aligned = x.shape[1] % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
    if x.stride(2) != 1 and not (channel_last and aligned):
        x = x.contiguous()
    weight = weight.contiguous()
    if bias is not None:
        bias = bias.to(weight.dtype).contiguous()
    return fn(x, weight, bias=bias, activation=activation)
