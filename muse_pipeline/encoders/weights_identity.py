"""How CLIP weights are named in caches and indexes, without importing torch or open_clip.

A weights identity is an open_clip pretrained tag ("openai"), the sha256 of a local weights file,
or RANDOM_INIT (the seeded random initialisation of `ClipEncoder(pretrained=None)`).
"""

from __future__ import annotations

import hashlib
import os

RANDOM_INIT = "random-init"


def file_sha256(path: str | os.PathLike[str], block_size: int = 1 << 20) -> str:
    """The hex sha256 of a file (the identity of local weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
