"""Validation for model selection (spec section 7): t2v/v2t metrics on the val videos, never the test split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from muse_pipeline.training.data import SplitPlan
from muse_pipeline.training.modules import padded_frame_tokens

Validator = Callable[[nn.Module], "dict | None"]


def caption_columns(plan: SplitPlan, text_video: np.ndarray) -> np.ndarray:
    """[m] column (position in plan.val_videos) of each val text's video."""
    position = {int(v): i for i, v in enumerate(plan.val_videos)}
    return np.asarray([position[int(v)] for v in text_video[plan.val_texts]], dtype=np.int64)


def metrics_of(text: torch.Tensor, video: torch.Tensor, columns: np.ndarray) -> dict:
    """text [m, D], video [v, D] unit rows -> {"t2v": {...}, "v2t": {...}}."""
    from muse_pipeline.metrics import retrieval_metrics

    sim = text.float() @ video.float().t()
    return retrieval_metrics(sim, columns)


class _SplitValidator:
    """Shared frame of both validators: None without a validation set, else metrics of the embeddings
    `_embed(pair)` returns ((texts [M, D], videos [N, D]) on the CPU), computed in eval mode with the
    module's training flag restored afterwards."""

    plan: SplitPlan
    columns: np.ndarray

    def _module(self, pair: nn.Module) -> nn.Module:
        """The module whose train/eval flag the validation toggles."""
        return pair

    def _embed(self, pair: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, pair: nn.Module) -> dict | None:
        if not self.plan.has_val:
            return None
        module = self._module(pair)
        was_training = module.training
        module.eval()
        try:
            return metrics_of(*self._embed(pair), self.columns)
        finally:
            module.train(was_training)


class CacheValidator(_SplitValidator):
    """Embeds every val video once (batched cache reads) and every val text once, then one sim matrix."""

    def __init__(self, dataset, plan: SplitPlan, text_video: np.ndarray, text_emb: np.ndarray,
                 device: torch.device, batch_size: int = 64) -> None:
        self.dataset = dataset  # a CachePairDataset: its read_videos does the batched reads
        self.plan = plan
        self.columns = caption_columns(plan, text_video) if plan.has_val else np.zeros(0, np.int64)
        self.text_emb = text_emb
        self.device = device
        self.batch_size = batch_size

    def _module(self, pair: nn.Module) -> nn.Module:
        return pair.model  # pair: the (unwrapped) CachePairModel

    def _embed(self, pair: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        model = pair.model
        videos = []
        for lo in range(0, len(self.plan.val_videos), self.batch_size):
            tokens, mask = self.dataset.read_videos(self.plan.val_videos[lo : lo + self.batch_size])
            videos.append(model.embed_videos(tokens.to(self.device).float(), mask.to(self.device)).cpu())
        texts = torch.from_numpy(self.text_emb[self.plan.val_texts]).to(self.device).float()
        return model.embed_texts(texts).cpu(), torch.cat(videos)


class EndToEndValidator(_SplitValidator):
    """Val videos decoded and run through the (fine-tuned) CLIP of the pair model, then the head."""

    def __init__(self, dataset, plan: SplitPlan, text_video: np.ndarray, device: torch.device,
                 batch_size: int = 16) -> None:
        self.dataset = dataset  # an EndToEndPairDataset: video_batch / text_batch
        self.plan = plan
        self.columns = caption_columns(plan, text_video) if plan.has_val else np.zeros(0, np.int64)
        self.device = device
        self.batch_size = batch_size

    def _embed(self, pair: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        enc, model = pair.encoder, pair.model
        videos = []
        for lo in range(0, len(self.plan.val_videos), self.batch_size):
            pixels, mask = self.dataset.video_batch(self.plan.val_videos[lo : lo + self.batch_size])
            pixels, mask = pixels.to(self.device), mask.to(self.device)
            tokens = padded_frame_tokens(enc, pixels, mask)
            videos.append(model.embed_videos(tokens.float(), mask).cpu())
        texts = []
        for lo in range(0, len(self.plan.val_texts), 256):
            ids = self.dataset.text_ids[self.plan.val_texts[lo : lo + 256]]
            feats = enc.text_features(torch.from_numpy(ids).to(self.device))
            texts.append(model.embed_texts(feats.float()).cpu())
        return torch.cat(texts), torch.cat(videos)
