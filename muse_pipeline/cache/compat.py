"""Fingerprint comparison: which keys of two cache fingerprints must agree, for what purpose.

A fingerprint is the JSON dict a cache stores in its root attributes (what extraction built it from:
dataset, CLIP model and weights, frames, words, annotation checksum, ...). Three comparisons use it:

- `RESUME_KEYS`: a run resumed on a cache must see the features it was trained on. A key the RUN's
  fingerprint has and the cache's lacks counts as different (an older cache cannot vouch for it).
- `CLIP_KEYS`: a run evaluated (or indexed) on another cache needs the same CLIP geometry and
  weights; a key either side lacks is not compared.
- `fingerprint_paths_differing`: reopening a cache to resume extraction compares every key, nested.

`differing_keys` returns the names, in key-set order; `describe_differences` the words for an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muse_pipeline.errors import UserError


@dataclass(frozen=True)
class KeySet:
    """Keys to compare; `absent_in_cache_differs`: a key the run has but the cache lacks differs
    (True) or is skipped (False). A key the run's fingerprint lacks is never compared."""

    keys: tuple[str, ...]
    absent_in_cache_differs: bool


RESUME_KEYS = KeySet(
    keys=("dataset", "model", "weights", "image_size", "num_tokens", "dim", "frames", "words", "sampling",
          "annotation_checksum"),
    absent_in_cache_differs=True,
)
CLIP_KEYS = KeySet(keys=("model", "weights", "dim", "num_tokens", "image_size"), absent_in_cache_differs=False)


def differing_keys(run_fp: Mapping[str, Any], cache_fp: Mapping[str, Any], key_set: KeySet) -> list[str]:
    """Keys of `key_set` on which the two fingerprints differ (see KeySet for absent keys)."""
    return [
        k for k in key_set.keys
        if k in run_fp and (k in cache_fp or key_set.absent_in_cache_differs) and run_fp.get(k) != cache_fp.get(k)
    ]


def describe_differences(run_fp: Mapping[str, Any], cache_fp: Mapping[str, Any], keys: Sequence[str]) -> str:
    """'k: run <value> vs cache <value>; ...' for an error message."""
    return "; ".join(f"{k}: run {run_fp.get(k)!r} vs cache {cache_fp.get(k)!r}" for k in keys)


def normalise(value: Any) -> Any:
    """JSON round trip: what comparing against stored attributes needs (tuples -> lists, ...)."""
    return json.loads(json.dumps(value, sort_keys=True))


def fingerprint_paths_differing(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths (`prefix` + key, nested) where two JSON values differ: keys present on one side only,
    or unequal leaves; sorted by key at each level. Equal values -> []."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{key}"
            if key not in old or key not in new:
                keys.append(name)
            else:
                keys.extend(fingerprint_paths_differing(old[key], new[key], f"{name}."))
        return keys
    return [] if old == new else [prefix.rstrip(".") or "fingerprint"]


# Keys a growing library (the folder dataset) may change between runs: its rows and their splits.
GROWING_KEYS = ("n_videos", "splits")


def check_growing_fingerprint(cache: Any, fingerprint: Mapping[str, Any]) -> None:
    """FingerprintMismatch unless `cache`'s fingerprint equals `fingerprint` on every key but
    GROWING_KEYS (`cache`: a FeatureCache)."""
    stored = {k: v for k, v in cache.fingerprint.items() if k not in GROWING_KEYS}
    wanted = {k: v for k, v in normalise(dict(fingerprint)).items() if k not in GROWING_KEYS}
    differing = fingerprint_paths_differing(stored, wanted, "fingerprint.")
    if differing:
        raise FingerprintMismatch(cache.path, differing)


class FingerprintMismatch(UserError, ValueError):
    """An existing cache was built with different settings; `keys` lists what differs."""

    def __init__(self, path: Path | str, keys: Sequence[str]) -> None:
        self.path = Path(path)
        self.keys = list(keys)
        super().__init__(
            f"{path}: the existing cache was built with a different configuration "
            f"(differs in: {', '.join(self.keys)}); pass --overwrite to delete it and extract again"
        )
