"""The module the trainer optimises (and DDP wraps): batch in, (text_emb, video_emb) out.

Two forms, one interface:
- `CachePairModel`: cached CLIP tokens and text EOT embeddings -> RetrievalModel (CLIP not loaded).
- `EndToEndPairModel`: pixels and token ids -> CLIP towers (trainable, lr 1e-7) -> RetrievalModel.
The loss is computed outside `forward`, on the gathered global batch (spec section 7).
"""

from __future__ import annotations

import torch
from torch import nn


def padded_frame_tokens(encoder, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLIP tokens [B, T, L, D] of frames pixels [B, T, 3, S, S] where mask [B, T] is set: only the real
    frames go through `encoder.frame_tokens`; padded slots are zeros (the heads mask them out)."""
    mask = mask.bool()
    real = encoder.frame_tokens(pixels[mask])  # [n_real, L, D]
    tokens = real.new_zeros((*mask.shape, *real.shape[1:]))
    tokens[mask] = real
    return tokens


class CachePairModel(nn.Module):
    """batch {"tokens": [B,T,L,D], "mask": [B,T], "text_emb": [B,D]} -> (text [B,D], video [B,D]), both L2-normalised."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        video = self.model.embed_videos(batch["tokens"].float(), batch["mask"])
        text = self.model.embed_texts(batch["text_emb"].float())
        return text, video


class EndToEndPairModel(nn.Module):
    """batch {"pixels": [B,T,3,S,S], "mask": [B,T], "text_ids": [B,W]} -> (text [B,D], video [B,D]).

    `encoder` is a ClipEncoder; its `model` becomes a registered submodule (so DDP and the optimizer
    see the CLIP weights), and its differentiable `frame_tokens` / `text_features` run in the loop.
    Padded frames are not encoded: only real frames go through CLIP, then tokens are scattered back
    into the [B, T, L, D] layout with zeros at padding (which the heads mask out anyway).
    """

    def __init__(self, encoder, model: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.clip = encoder.model
        self.model = model
        self.clip.requires_grad_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["mask"].bool()
        tokens = padded_frame_tokens(self.encoder, batch["pixels"], mask)
        video = self.model.embed_videos(tokens.float(), mask)
        text_emb = self.encoder.text_features(batch["text_ids"])
        text = self.model.embed_texts(text_emb.float())
        return text, video
