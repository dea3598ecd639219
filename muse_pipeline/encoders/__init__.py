"""Frozen CLIP towers that produce the cached per-frame tokens and caption embeddings."""

from muse_pipeline.encoders.clip import ClipEncoder, UnsupportedModelError, register_tiny_config

__all__ = ["ClipEncoder", "UnsupportedModelError", "register_tiny_config"]
