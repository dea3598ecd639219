"""ModelConfig and RetrievalModel: a similarity head for videos, an optional text adapter, the temperature.

Tokens arrive as float16 from the feature cache ([B, T, L, D]); text embeddings are CLIP's EOT
features ([M, D]). Both are cast to the model's dtype inside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muse_pipeline.models.heads import HEADS, build_head
from muse_pipeline.models.loss import MAX_LOGIT_SCALE, contrastive_loss
from muse_pipeline.models.transformer import ACTIVATIONS

LOGIT_SCALE_PRETRAINED = math.log(100.0)  # spec section 7, CLIP pretrained
LOGIT_SCALE_SCRATCH = math.log(1.0 / 0.07)


def initial_logit_scale(clip_info: dict[str, Any] | None, random_init: bool) -> float:
    """Where a new run's logit_scale starts (spec section 7: CLIP's own, clamped <= ln 100).

    clip_info: the encoder's `describe()` (a cache fingerprint's "encoder"); its "logit_scale" is the
    value in the CLIP weights the features came from. Caches extracted before that was recorded keep
    the spec's defaults: ln(100) for pretrained CLIP, ln(1/0.07) for random init."""
    recorded = (clip_info or {}).get("logit_scale")
    if recorded is None:
        return LOGIT_SCALE_SCRATCH if random_init else LOGIT_SCALE_PRETRAINED
    return min(float(recorded), MAX_LOGIT_SCALE)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a RetrievalModel (saved in runs/<name>/config.json)."""

    head: str = "muse"
    dim: int = 512  # D, CLIP embed dim
    grid: int = 7  # g, patch-grid side (7 for ViT-B/32 at 224, 14 for ViT-B/16)
    max_frames: int = 12  # T
    depth: int = 4  # ResMamba / fusion Transformer blocks
    d_state: int = 16
    d_conv: int = 4
    drop_max: float = 0.1  # block dropout p = linspace(0, drop_max, depth)
    order: str = "scale"  # "scale" (paper) or "frame" sequence order
    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    transformer_layers: int = 4  # seqTransf
    transformer_heads: int = 0  # seqTransf; 0: 8 at width >= 512, else width // 64 (set to CLIP's when copied)
    transformer_act: str = "quick_gelu"  # seqTransf MLP activation: CLIP's ("gelu" for non-OpenAI weights)
    text_adapter: bool = True
    logit_scale_init: float = LOGIT_SCALE_PRETRAINED

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; known: {', '.join(HEADS.names())}")
        for key in ("dim", "grid", "max_frames", "depth", "d_state", "d_conv", "transformer_layers"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"ModelConfig.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.drop_max < 1.0:
            raise ValueError(f"ModelConfig.drop_max must be in [0, 1), got {self.drop_max}")
        if self.order not in ("scale", "frame"):
            raise ValueError(f"ModelConfig.order must be 'scale' or 'frame', got {self.order!r}")
        if self.transformer_act not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.transformer_act must be one of {ACTIVATIONS}, got {self.transformer_act!r}")
        if self.transformer_heads < 0 or (self.transformer_heads and self.dim % self.transformer_heads):
            raise ValueError(f"ModelConfig.transformer_heads {self.transformer_heads} must be 0 or divide dim {self.dim}")
        if self.logit_scale_init > MAX_LOGIT_SCALE + 1e-9:
            raise ValueError(f"logit_scale_init must be <= ln(100), got {self.logit_scale_init}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        if d.get("head") == "seqTransf" and "transformer_act" not in d:
            d["transformer_act"] = "gelu"  # runs saved before QuickGELU was the default were built with GELU
        if "scales" in d:
            d["scales"] = tuple(d["scales"])
        return cls(**d)

    def head_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `build_head` for this config's head."""
        if self.head in ("muse", "muse-transformer"):
            kw: dict[str, Any] = dict(depth=self.depth, drop_max=self.drop_max, order=self.order, scales=self.scales)
            if self.head == "muse":
                kw.update(d_state=self.d_state, d_conv=self.d_conv)
            return kw
        if self.head == "seqTransf":
            return dict(layers=self.transformer_layers, heads=self.transformer_heads or None, act=self.transformer_act)
        return {}


class TextAdapter(nn.Module):
    """t + Linear(t), zero-initialised so that training starts from CLIP's text embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class RetrievalModel(nn.Module):
    """Video head + optional text adapter + learnable log temperature."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = build_head(cfg.head, cfg.dim, cfg.grid, cfg.max_frames, **cfg.head_kwargs())
        self.text_adapter: nn.Module | None = TextAdapter(cfg.dim) if cfg.text_adapter else None
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, L, D] (any float dtype, e.g. float16 from the cache), mask [B, T] -> [B, D] unit rows."""
        if tokens.ndim != 4 or tokens.shape[-1] != self.cfg.dim:
            raise ValueError(f"tokens must be [B, T, L, {self.cfg.dim}], got {tuple(tokens.shape)}")
        return self.head(tokens.to(self.dtype), mask.to(tokens.device).bool())

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        """text_emb [M, D] (CLIP EOT features) -> [M, D] unit rows."""
        if text_emb.ndim != 2 or text_emb.shape[-1] != self.cfg.dim:
            raise ValueError(f"text_emb must be [M, {self.cfg.dim}], got {tuple(text_emb.shape)}")
        x = text_emb.to(self.dtype)
        if self.text_adapter is not None:
            x = self.text_adapter(x)
        return F.normalize(x, dim=-1)

    def clamped_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Paired batch (row i of tokens matches row i of text_emb) -> scalar contrastive loss."""
        video = self.embed_videos(tokens, mask)
        text = self.embed_texts(text_emb)
        return contrastive_loss(text, video, self.logit_scale)
