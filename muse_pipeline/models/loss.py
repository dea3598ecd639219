"""Symmetric InfoNCE over the GLOBAL batch (spec section 7).

Under torch.distributed with world size W > 1 every rank holds m paired rows. The features of all
ranks are gathered with the gradient-carrying `torch.distributed.nn.functional.all_gather` (its
backward sums the incoming gradients of every rank into the owner's rows, unlike the plain
`all_gather`, which drops them). Each rank scores only its OWN rows as queries against all W*m
columns, in both directions, and returns

    loss_r = W * (sum_{local rows} CE_t2v + sum_{local rows} CE_v2t) / (2 * W * m)

so that the mean over ranks, which is what DDP's gradient averaging optimises, is exactly the
single-process loss (mean CE_t2v + mean CE_v2t) / 2 over the W*m global rows, values and gradients
alike. Every rank must hold the same number of rows (DDP with drop_last) because all_gather needs
equal shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# spec section 7: exp(logit_scale) is clamped at 100 as in CLIP.
MAX_LOGIT_SCALE = math.log(100.0)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: [m, D] on this rank -> ([W*m, D] rank-major, offset of this rank's rows); identity if W == 1."""
    rank, world = _world()
    if world == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(list(parts), dim=0), rank * x.shape[0]


def contrastive_loss(
    text_emb: torch.Tensor, video_emb: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric cross-entropy of paired rows.

    text_emb, video_emb: [m, D] L2-normalised, row i of each is a positive pair; logit_scale: the LOG
    temperature (a scalar Parameter), clamped at ln(100) here. Returns a scalar.
    """
    if text_emb.ndim != 2 or text_emb.shape != video_emb.shape:
        raise ValueError(
            f"text_emb and video_emb must both be [m, D] with equal shapes, got "
            f"{tuple(text_emb.shape)} and {tuple(video_emb.shape)}"
        )
    if text_emb.shape[0] < 1:
        raise ValueError("contrastive_loss needs at least one pair")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), dtype=text_emb.dtype, device=text_emb.device)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    _, world = _world()
    all_text, offset = gather_with_grad(text_emb)
    all_video, _ = gather_with_grad(video_emb)
    m = text_emb.shape[0]
    labels = torch.arange(offset, offset + m, device=text_emb.device)
    logits_t2v = scale * text_emb @ all_video.t()  # [m, W*m]
    logits_v2t = scale * video_emb @ all_text.t()  # [m, W*m]
    total = F.cross_entropy(logits_t2v, labels, reduction="sum") + F.cross_entropy(
        logits_v2t, labels, reduction="sum"
    )
    # world * total / (2 * global rows): the mean over ranks is the global-batch loss (see module doc).
    return total * world / (2.0 * all_text.shape[0])
