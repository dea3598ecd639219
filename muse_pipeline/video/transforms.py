"""Frames -> CLIP input pixels, batched in torch (spec section 1).

Matches open_clip's eval preprocess (torchvision Resize(S) on a PIL image with bicubic, CenterCrop,
ToTensor, Normalize) while running on a whole clip at once, with no PIL round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from muse_pipeline.config import CLIP_MEAN, CLIP_STD


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to `short`, with torchvision's rounding (truncation)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's center crop of `size` (round-half-even, as it uses round())."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def preprocess_frames(
    frames: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 frames [n, H, W, 3] (RGB) -> float32 [n, 3, S, S] normalised CLIP pixels.

    Short side -> S with bicubic + antialias, center crop S x S, /255, clamp to [0, 1] (bicubic
    overshoots), then (x - mean) / std per channel. `frames` may also be a sequence of n uint8
    arrays [H_i, W_i, 3] of different sizes (a video whose frame size changes, see
    `decode.DecodedClip`): each is preprocessed on its own, exactly as it would be alone.
    """
    if isinstance(frames, (list, tuple)):
        sizes = {tuple(np.shape(frame)) for frame in frames}
        if len(sizes) > 1:
            for frame in frames:
                if np.ndim(frame) != 3:
                    raise ValueError(f"each frame must have shape [H, W, 3], got {list(np.shape(frame))}")
            return torch.cat([preprocess_frames(np.asarray(f)[None], image_size, mean, std) for f in frames])
        frames = np.stack([np.asarray(f) for f in frames]) if frames else np.zeros((0, 1, 1, 3), np.uint8)
    pixels = torch.as_tensor(frames)
    if pixels.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {pixels.dtype}")
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"frames must have shape [n, H, W, 3], got {list(pixels.shape)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    n, height, width, _ = pixels.shape
    if n == 0:
        return torch.empty(0, 3, image_size, image_size)
    x = pixels.permute(0, 3, 1, 2).float()  # [n, 3, H, W], still 0..255
    new_h, new_w = resized_size(height, width, image_size)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = center_crop_box(new_h, new_w, image_size)
    x = x[:, :, top : top + image_size, left : left + image_size]
    x = (x / 255.0).clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
