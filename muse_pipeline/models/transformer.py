"""Self-attention blocks with key padding masks: seqTransf's Transformer and the muse-transformer mixer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse_pipeline.models.resmamba import ResidualStack


def default_heads(dim: int) -> int:
    """8 heads at width >= 512 (CLIP4Clip), else dim // 64, at least 1; always a divisor of dim."""
    h = 8 if dim >= 512 else max(1, dim // 64)
    while dim % h:
        h -= 1
    return h


class SelfAttention(nn.Module):
    """Multi-head self-attention; forward(x [B, L, D], pad_mask [B, L] True = padding) -> [B, L, D].

    Padded keys are never attended to, so real positions are independent of the padding."""

    def __init__(self, dim: int, heads: int | None = None) -> None:
        super().__init__()
        self.heads = heads or default_heads(dim)
        if dim % self.heads:
            raise ValueError(f"dim {dim} is not divisible by heads {self.heads}")
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if pad_mask is None else ~pad_mask.bool()[:, None, None, :]  # True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then + mlp(ln(x)) (CLIP's residual attention block)."""

    def __init__(self, dim: int, heads: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pad_mask)
        return x + self.mlp(self.ln_2(x))


class ResTransformer(ResidualStack):
    """The muse-transformer ablation: ResMamba's residual / zero-init out_fc / dropout structure with
    multi-head self-attention as the token mixer in place of BiMamba (both are pure token mixers;
    attention has 4*D^2 weights, BiMamba about 3.3*D^2)."""

    def __init__(self, dim: int, depth: int = 4, heads: int | None = None, drop_max: float = 0.1) -> None:
        super().__init__(dim, depth, drop_max, lambda: SelfAttention(dim, heads))
