"""Evaluating end-to-end runs: they fine-tune CLIP, so cached (frozen-CLIP) tokens do not describe
them. Their evaluation decodes the split's videos and runs the run's own CLIP, as its validation did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse_pipeline.evaluation.embed import Embedder


def load_end_to_end_encoder(
    run_dir: Path | str, config: dict[str, Any], which: str = "best", device: str = "cpu"
):
    """The run's fine-tuned CLIP as a ClipEncoder (weights from `<which>.safetensors`, `clip.` prefix)."""
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.models.checkpoint import load_weights

    src = config["end_to_end_source"]
    _, clip_state = load_weights(run_dir, which)
    if not clip_state:
        raise ValueError(
            f"{run_dir}/{which}.safetensors has no CLIP weights, but config.json says end-to-end"
        )
    encoder = ClipEncoder(src["model"], pretrained=src["pretrained"], device="cpu")
    encoder.model.load_state_dict(clip_state, strict=True)
    encoder.model.to(device).eval()
    encoder.device = torch.device(device)
    return encoder


@torch.inference_mode()
def embed_split_end_to_end(
    model: Embedder,
    encoder: Any,
    index: Any,
    split: str,
    frames: int,
    words: int,
    batch_size: int = 16,
    device: str = "cpu",
    decoder: str = "pyav",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """(video_emb [N, D], text_emb [M, D], caption_to_video [M], decode failures) of `split` of a
    DatasetIndex: frames decoded and encoded by `encoder`, each video and text once.

    A video that cannot be decoded becomes one black frame (as in end-to-end training) and is
    counted, so it stays in the test set and counts as a miss rather than silently vanishing.
    """
    import warnings

    from muse_pipeline.training.data import EndToEndPairDataset
    from muse_pipeline.training.modules import padded_frame_tokens

    video_rows = np.array([i for i, v in enumerate(index.videos) if v.split == split], dtype=np.int64)
    if video_rows.size == 0:
        known = sorted({v.split for v in index.videos})
        raise ValueError(
            f"split {split!r} has no videos in dataset {index.name!r}; splits: {', '.join(known)}"
        )
    position = {int(v): i for i, v in enumerate(video_rows)}
    captions = [c for c in index.captions if c.video_index in position]
    if not captions:
        raise ValueError(f"split {split!r} of dataset {index.name!r} has no captions: nothing to retrieve")
    ids = encoder.tokenize([c.text for c in captions], words)
    # Only its frame decoding (video_batch) is used: the same decode + preprocess as training.
    empty = np.zeros(0, np.int64)
    ds = EndToEndPairDataset(
        index.videos, empty, empty, empty, frames, encoder.image_size, encoder.mean, encoder.std, decoder
    )
    videos = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for lo in range(0, len(video_rows), batch_size):
            pixels, mask = ds.video_batch(video_rows[lo : lo + batch_size])
            pixels, mask = pixels.to(device), mask.to(device)
            tokens = padded_frame_tokens(encoder, pixels, mask)  # only real frames go through CLIP
            videos.append(model.embed_videos(tokens, mask).float().cpu())
    failures = sum(1 for w in caught if "using a black frame" in str(w.message))
    texts = []
    for lo in range(0, len(ids), batch_size):
        feats = encoder.text_features(torch.from_numpy(ids[lo : lo + batch_size]).to(device))
        texts.append(model.embed_texts(feats).float().cpu())
    c2v = np.array([position[c.video_index] for c in captions], dtype=np.int64)
    return torch.cat(videos), torch.cat(texts), c2v, failures
