"""Frozen CLIP towers that produce the cached per-frame tokens and caption embeddings.

The names below load `muse_pipeline.encoders.clip` (torch, open_clip) on first use, so that light
submodules (`weights_identity`) can be imported without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClipEncoder", "UnsupportedModelError", "register_tiny_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from muse_pipeline.encoders import clip

        return getattr(clip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
