"""The fingerprint of a feature cache: what must match for a store to be continued or reused.

`build_fingerprint` returns the dict stored in the store's root attribute `fingerprint` (and in a
run's config.json). Its keys and values are part of the cache format: changing them makes every
existing store refuse to resume. `SAMPLING` names the frame sampling protocol the tokens were made
with (1 fps at presentation times, linspace subsample to T frames, upright, CLIP4Clip preprocessing).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from muse_pipeline import __version__

if TYPE_CHECKING:
    from muse_pipeline.data import DatasetIndex
    from muse_pipeline.extract.config import ExtractConfig

SAMPLING = "fps=1;pts<=t;linspace(0,n-1,T);upright;clip4clip"


def build_fingerprint(cfg: ExtractConfig, index: DatasetIndex, encoder_info: dict) -> dict:
    """The fingerprint of a cache of `index` made with `cfg` and the encoder `encoder_info`
    (`ClipEncoder.describe()`: weights_id, image_size, num_tokens, dim, ...)."""
    fingerprint = {
        "dataset": cfg.dataset,
        "splits": sorted({v.split for v in index.videos}),
        "model": cfg.model,
        "pretrained": None if cfg.pretrained is None else str(cfg.pretrained),  # to rebuild the text tower
        "weights": encoder_info["weights_id"],
        "image_size": encoder_info["image_size"],
        "num_tokens": encoder_info["num_tokens"],
        "dim": encoder_info["dim"],
        "frames": cfg.max_frames,
        "words": cfg.max_words,
        "sampling": SAMPLING,
        "decoder": cfg.decoder,
        # the encoder's numbers: its precision and how many videos share a forward pass
        "precision": cfg.resolved_precision,
        "videos_per_batch": cfg.videos_per_batch,
        "annotation_checksum": index.annotation_checksum,
        "n_videos": len(index.videos),
        "n_texts": len(index.captions),
        "code_version": __version__,
        "encoder": encoder_info,
    }
    if cfg.dataset == "folder":
        # the auto-window grid decides which rows exist and how their frames are sampled
        fingerprint["windows"] = cfg.window_spec.describe()
        fingerprint["data_root"] = str(Path(cfg.data_root).resolve())  # one store per library
        # the files a run may retire are those of the selected splits: the selection must not change
        fingerprint["split_selection"] = sorted(cfg.splits) if cfg.splits else None
    return fingerprint
