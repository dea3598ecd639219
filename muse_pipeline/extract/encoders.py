"""One CLIP encoder per (model, pretrained, device, precision) and process, loaded on first use.

A dask worker runs many shard and text tasks; each reuses the encoder its process loaded, and an
in-process run (`--workers 0`) shares the client's. `ENCODER_CACHE` is that process-wide cache.
"""

from __future__ import annotations

from typing import Any

EncoderKey = tuple[str, str | None, str, str]


class EncoderCache:
    """Encoders by (model, pretrained, device, precision); `put` seeds one (benchmarks put a
    stand-in with the real encoder's interface), `clear` forgets them all."""

    def __init__(self) -> None:
        self._encoders: dict[EncoderKey, Any] = {}

    def get(self, model: str, pretrained: str | None, device: str, precision: str = "fp32") -> Any:
        """The cached encoder, or a new `ClipEncoder` (built and kept) on first use."""
        key = (model, pretrained, device, precision)
        if key not in self._encoders:
            from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config

            register_tiny_config()
            self._encoders[key] = ClipEncoder(model, pretrained=pretrained, device=device, precision=precision)
        return self._encoders[key]

    def put(self, encoder: Any, model: str, pretrained: str | None, device: str, precision: str = "fp32") -> None:
        self._encoders[(model, pretrained, device, precision)] = encoder

    def clear(self) -> None:
        self._encoders.clear()


ENCODER_CACHE = EncoderCache()
