"""Video similarity heads (spec sections 5 and 6), all with the same interface:

    forward(tokens [B, T, L, D] float, mask [B, T] bool/0-1) -> video_emb [B, D], L2-normalised

L = 1 + g*g (CLS first, then the g x g patch grid row-major). Every sample needs >= 1 real frame.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muse_pipeline.models.pyramid import MultiScalePyramid
from muse_pipeline.models.resmamba import ResMamba
from muse_pipeline.models.sequence import pack_sequence, real_frames
from muse_pipeline.models.transformer import ResTransformer, TransformerLayer, default_heads
from muse_pipeline.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


def _check_tokens(tokens: torch.Tensor, mask: torch.Tensor, dim: int) -> None:
    if tokens.ndim != 4 or tokens.shape[-1] != dim:
        raise ValueError(f"tokens must be [B, T, L, {dim}], got {tuple(tokens.shape)}")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask must be [B, T]={tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")


def pool_frames(frame_emb: torch.Tensor, b_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """frame_emb [n_real, D] of the real frames, b_idx [n_real] their video -> [B, D]:
    L2-normalise per frame, mean per video, L2-normalise."""
    f = F.normalize(frame_emb, dim=-1)
    total = f.new_zeros(batch, f.shape[-1]).index_add(0, b_idx, f)
    counts = torch.bincount(b_idx, minlength=batch).clamp(min=1).to(f.dtype)
    return F.normalize(total / counts[:, None], dim=-1)


def masked_mean_normalized(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """frames [B, T, D], mask [B, T] -> [B, D] (meanP pooling over the real frames)."""
    b_idx, t_idx = real_frames(mask)
    return pool_frames(frames[b_idx, t_idx], b_idx, frames.shape[0])


@HEADS.register("meanP")
class MeanPHead(nn.Module):
    """Masked mean of L2-normalised CLS features; no parameters (also the zero-shot baseline)."""

    LR_GROUP = "fusion"

    def __init__(self, dim: int, grid: int, max_frames: int) -> None:
        super().__init__()
        self.dim, self.grid, self.max_frames = dim, grid, max_frames

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_tokens(tokens, mask, self.dim)
        return masked_mean_normalized(tokens[:, :, 0], mask)


@HEADS.register("seqTransf")
class SeqTransfHead(nn.Module):
    """CLIP4Clip seqTransf (spec section 6): CLS + frame position embedding -> Transformer (key padding
    mask, QuickGELU) -> + the input CLS (residual) -> meanP.

    With pretrained CLIP the trainer calls `load_clip_text` (CLIP4Clip's initialisation: text layers
    0..layers-1 and the text positional embedding); it trains at the base lr (`LR_GROUP`).
    """

    # Which learning rate the trainer gives this head: "base" (1x, CLIP4Clip) or "fusion" (10x).
    LR_GROUP = "base"

    def __init__(self, dim: int, grid: int, max_frames: int, layers: int = 4, heads: int | None = None,
                 act: str = "quick_gelu") -> None:
        super().__init__()
        self.dim, self.grid, self.max_frames = dim, grid, max_frames
        self.frame_position_embeddings = nn.Embedding(max_frames, dim)
        nn.init.normal_(self.frame_position_embeddings.weight, std=0.01)
        self.transformer = nn.ModuleList(
            TransformerLayer(dim, heads or default_heads(dim), act=act) for _ in range(layers)
        )

    @torch.no_grad()
    def load_clip_text(self, clip_model: nn.Module) -> int:
        """Start from an open_clip CLIP's text tower: layer i <- `transformer.resblocks[i]` for the
        layers both have (CLIP4Clip copies text layers < its layer count; a shorter text tower leaves
        the last layers as they are), and `frame_position_embeddings` <- `positional_embedding[:max_frames]`.
        Returns the number of layers copied. ValueError if it does not fit (width, head count, positions)."""
        blocks = clip_model.transformer.resblocks
        pos = clip_model.positional_embedding
        if pos.shape[0] < self.max_frames or pos.shape[1] != self.dim:
            raise ValueError(
                f"CLIP's text positional embedding {tuple(pos.shape)} cannot give {self.max_frames} x {self.dim}"
            )
        copied = 0
        for layer, block in zip(self.transformer, blocks, strict=False):
            layer.load_clip_block(block)
            copied += 1
        weight = self.frame_position_embeddings.weight
        weight.copy_(pos[: self.max_frames].detach().to(weight.dtype))
        return copied

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_tokens(tokens, mask, self.dim)
        t = tokens.shape[1]
        if t > self.max_frames:
            raise ValueError(f"seqTransf was built for max_frames={self.max_frames}, got T={t}")
        mask = mask.bool()
        real_frames(mask)  # validates: >= 1 real frame per video
        cls = tokens[:, :, 0]
        x = cls + self.frame_position_embeddings.weight[:t]
        for layer in self.transformer:
            x = layer(x, ~mask)
        return masked_mean_normalized(x + cls, mask)


class _MultiScaleHead(nn.Module):
    """pyramid -> scale-wise sequence of the real frames -> residual fusion -> CLS outputs -> pooled."""

    LR_GROUP = "fusion"  # spec section 7: the fusion head trains at 10x the base lr

    def __init__(self, dim: int, grid: int, max_frames: int, fusion: nn.Module, order: str = "scale",
                 scales: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        super().__init__()
        self.dim, self.grid, self.max_frames, self.order = dim, grid, max_frames, order
        self.pyramid = MultiScalePyramid(dim, scales)
        self.fusion = fusion

    def build_sequence(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (seq [B, Lmax, D], pad_mask [B, Lmax], cls_index [B, T], b_idx, t_idx)."""
        _check_tokens(tokens, mask, self.dim)
        g = math.isqrt(tokens.shape[2] - 1)
        if g * g + 1 != tokens.shape[2]:
            raise ValueError(f"tokens per frame must be 1 + g*g (CLS + square grid), got L={tokens.shape[2]}")
        mask = mask.bool()
        b_idx, t_idx = real_frames(mask)
        frames = tokens[b_idx, t_idx]  # [n_real, L, D]: the pyramid never sees padded frames
        patches = frames[:, 1:].reshape(-1, g, g, self.dim)
        seq, pad_mask, cls_index = pack_sequence([frames[:, :1], *self.pyramid(patches)], mask, self.order)
        return seq, pad_mask, cls_index, b_idx, t_idx

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seq, pad_mask, cls_index, b_idx, t_idx = self.build_sequence(tokens, mask)
        out = self.fusion(seq, pad_mask if bool(pad_mask.any()) else None)
        return pool_frames(out[b_idx, cls_index[b_idx, t_idx]], b_idx, tokens.shape[0])


@HEADS.register("muse")
class MuseHead(_MultiScaleHead):
    """MUSE: the multi-scale sequence fused by ResMamba (spec sections 3-5)."""

    def __init__(self, dim: int, grid: int, max_frames: int, depth: int = 4, d_state: int = 16, d_conv: int = 4,
                 drop_max: float = 0.1, order: str = "scale", scales: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        super().__init__(dim, grid, max_frames, ResMamba(dim, depth, d_state, d_conv, drop_max), order, scales)


@HEADS.register("muse-transformer")
class MuseTransformerHead(_MultiScaleHead):
    """Ablation: the same sequence fused by self-attention blocks (same residual / zero-init structure)."""

    def __init__(self, dim: int, grid: int, max_frames: int, depth: int = 4, heads: int | None = None,
                 drop_max: float = 0.1, order: str = "scale", scales: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        super().__init__(dim, grid, max_frames, ResTransformer(dim, depth, heads, drop_max), order, scales)


def build_head(name: str, dim: int, grid: int, max_frames: int, **kw: Any) -> nn.Module:
    """Instantiate a registered head; unknown names list the known ones."""
    return HEADS.get(name)(dim=dim, grid=grid, max_frames=max_frames, **kw)
