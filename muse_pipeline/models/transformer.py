"""Self-attention blocks with key padding masks: seqTransf's Transformer and the muse-transformer mixer.

`TransformerLayer` has CLIP's residual attention block layout (ln_1, attention with a fused q/k/v
projection, ln_2, MLP c_fc -> activation -> c_proj), so that seqTransf can start from copies of
CLIP's text Transformer layers (see `TransformerLayer.load_clip_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse_pipeline.models.resmamba import ResidualStack

ACTIVATIONS = ("quick_gelu", "gelu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP (and CLIP4Clip's seqTransf) was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


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
    """Pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(x)) (CLIP's residual attention block).

    `act`: "quick_gelu" (CLIP / CLIP4Clip) or "gelu"."""

    def __init__(self, dim: int, heads: int | None = None, mlp_ratio: float = 4.0, act: str = "quick_gelu") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), activation(act), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pad_mask)
        return x + self.mlp(self.ln_2(x))

    @torch.no_grad()
    def load_clip_block(self, block: nn.Module) -> None:
        """Copy an open_clip `ResidualAttentionBlock` (ln_1, attn: nn.MultiheadAttention, ln_2,
        mlp.c_fc / mlp.c_proj) into this layer. Its q/k/v rows are stacked as this layer's fused
        `qkv` and split into heads the same way, so with equal head counts and activation the two
        compute the same function. Raises ValueError on any shape or head-count mismatch."""
        attn = block.attn
        if getattr(attn, "num_heads", None) != self.attn.heads:
            raise ValueError(f"CLIP block has {getattr(attn, 'num_heads', None)} heads, this layer {self.attn.heads}")
        for name, value in (("ls_1", getattr(block, "ls_1", None)), ("ls_2", getattr(block, "ls_2", None))):
            if value is not None and not isinstance(value, nn.Identity):
                raise ValueError(f"CLIP block has layer scale {name}: not a plain CLIP residual block")
        pairs = [
            (self.ln_1.weight, block.ln_1.weight), (self.ln_1.bias, block.ln_1.bias),
            (self.attn.qkv.weight, attn.in_proj_weight), (self.attn.qkv.bias, attn.in_proj_bias),
            (self.attn.proj.weight, attn.out_proj.weight), (self.attn.proj.bias, attn.out_proj.bias),
            (self.ln_2.weight, block.ln_2.weight), (self.ln_2.bias, block.ln_2.bias),
            (self.mlp[0].weight, block.mlp.c_fc.weight), (self.mlp[0].bias, block.mlp.c_fc.bias),
            (self.mlp[2].weight, block.mlp.c_proj.weight), (self.mlp[2].bias, block.mlp.c_proj.bias),
        ]
        for mine, theirs in pairs:
            if theirs is None or mine.shape != theirs.shape:
                shape = None if theirs is None else tuple(theirs.shape)
                raise ValueError(f"CLIP block tensor of shape {shape} does not fit {tuple(mine.shape)}")
        for mine, theirs in pairs:
            mine.copy_(theirs.detach().to(mine.dtype))


class ResTransformer(ResidualStack):
    """The muse-transformer ablation: ResMamba's residual / zero-init out_fc / dropout structure with
    multi-head self-attention as the token mixer in place of BiMamba (both are pure token mixers;
    attention has 4*D^2 weights, BiMamba about 3.3*D^2)."""

    def __init__(self, dim: int, depth: int = 4, heads: int | None = None, drop_max: float = 0.1) -> None:
        super().__init__(dim, depth, drop_max, lambda: SelfAttention(dim, heads))
