"""Residual fusion stacks: block i is x + out_fc_i(Dropout(p_i)(mixer_i(LayerNorm(x)))) (spec section 5).

out_fc is zero-initialised, so at init the stack is the identity and the MUSE head starts as meanP.
p_i = linspace(0, drop_max, depth). The mixer is BiMamba (ResMamba) or self-attention
(`transformer.ResTransformer`, the muse-transformer ablation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from muse_pipeline.models.bimamba import BiMamba


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, drop: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop = nn.Dropout(drop)
        self.out_fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_fc.weight)
        nn.init.zeros_(self.out_fc.bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.out_fc(self.drop(self.mixer(self.norm(x), pad_mask)))


class ResidualStack(nn.Module):
    """forward(x [B, L, D], pad_mask [B, L] True = padding, or None) -> [B, L, D]."""

    def __init__(self, dim: int, depth: int, drop_max: float, make_mixer: Callable[[], nn.Module]) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        drops = torch.linspace(0, drop_max, depth).tolist()
        self.blocks = nn.ModuleList(ResidualBlock(dim, make_mixer(), p) for p in drops)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, pad_mask)
        return x


class ResMamba(ResidualStack):
    """`depth` residual BiMamba blocks (d_model = dim, expand 1)."""

    def __init__(self, dim: int, depth: int = 4, d_state: int = 16, d_conv: int = 4, drop_max: float = 0.1) -> None:
        super().__init__(dim, depth, drop_max, lambda: BiMamba(dim, d_state=d_state, d_conv=d_conv))
