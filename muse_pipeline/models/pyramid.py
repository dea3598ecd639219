"""Learned multi-scale feature pyramid of one frame's patch grid (spec section 3).

Scale 0.5: MaxPool2d(2, 2); 1.0: identity; 2.0: ConvTranspose2d(D, D/2, k=2, s=2); each followed by
tail(c) = Conv1x1(c -> D, no bias), LayerNorm(channels), GELU, Conv3x3(D -> D, pad 1, no bias),
LayerNorm(channels). The grid side g comes from the input (7 -> 3, 7, 14 for ViT-B/32; 14 -> 7, 14,
28 for ViT-B/16). Branches are registered submodules, so they train, save and load.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_SCALES = (0.5, 1.0, 2.0)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of [N, C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _tail(c_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, dim, 1, bias=False),
        LayerNorm2d(dim),
        nn.GELU(),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False),
        LayerNorm2d(dim),
    )


class MultiScalePyramid(nn.Module):
    """forward(patches [N, g, g, D] (or [N, D, g, g] with channels_last=False)) -> list of [N, g_s*g_s, D],
    one per scale in `scales` order."""

    def __init__(self, dim: int, scales: tuple[float, ...] = SUPPORTED_SCALES) -> None:
        super().__init__()
        bad = [s for s in scales if float(s) not in SUPPORTED_SCALES]
        if bad or not scales:
            raise ValueError(f"pyramid scales must be a non-empty subset of {SUPPORTED_SCALES}, got {scales}")
        self.dim = dim
        self.scales = tuple(float(s) for s in scales)
        self.branches = nn.ModuleList()
        for s in self.scales:
            if s == 0.5:
                self.branches.append(nn.Sequential(nn.MaxPool2d(2, 2), _tail(dim, dim)))
            elif s == 1.0:
                self.branches.append(_tail(dim, dim))
            else:
                half = max(1, dim // 2)
                self.branches.append(nn.Sequential(nn.ConvTranspose2d(dim, half, 2, stride=2), _tail(half, dim)))

    def grids(self, g: int) -> list[int]:
        """Output grid side per scale for an input grid side g."""
        return [g // 2 if s == 0.5 else (g if s == 1.0 else 2 * g) for s in self.scales]

    def forward(self, patches: torch.Tensor, channels_last: bool = True) -> list[torch.Tensor]:
        if patches.ndim != 4:
            raise ValueError(f"pyramid input must be 4-D [N, g, g, D], got {tuple(patches.shape)}")
        x = patches.permute(0, 3, 1, 2) if channels_last else patches  # [N, D, g, g]
        if x.shape[1] != self.dim or x.shape[2] != x.shape[3]:
            raise ValueError(f"pyramid expects a square grid with {self.dim} channels, got {tuple(patches.shape)}")
        if 0.5 in self.scales and x.shape[2] < 2:
            raise ValueError(f"grid side {x.shape[2]} is too small for the 0.5 scale")
        outs = []
        for branch in self.branches:
            y = branch(x)  # [N, D, g_s, g_s]
            outs.append(y.flatten(2).transpose(1, 2))  # row-major tokens [N, g_s*g_s, D]
        return outs
