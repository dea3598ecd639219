"""The Zarr v3 feature cache (layout in docs/ARCHITECTURE.md) and its HDF5 export."""

from muse_pipeline.cache.export import cache_info, export_hdf5
from muse_pipeline.cache.store import (
    CACHED,
    FAILED,
    PENDING,
    FeatureCache,
    FingerprintMismatch,
    default_videos_per_shard,
)

__all__ = [
    "CACHED",
    "FAILED",
    "PENDING",
    "FeatureCache",
    "FingerprintMismatch",
    "cache_info",
    "default_videos_per_shard",
    "export_hdf5",
]
