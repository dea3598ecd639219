"""Frozen configuration dataclasses and the per-dataset presets of MUSE_SPEC sections 1 and 7."""

from __future__ import annotations

from dataclasses import dataclass

# CLIP's normalisation constants (MUSE_SPEC section 1); open_clip uses the same values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DatasetPreset:
    """Defaults of one dataset; every value can be overridden on the command line."""

    frames: int  # max_frames T sampled at 1 fps
    words: int  # max_words W of a caption, <sot> and <eot> included
    batch_size: int = 128  # global batch
    epochs: int = 5
    lr: float = 1e-4  # base lr; the fusion head gets 10x, CLIP towers 1e-3x
    val_fraction: float = 0.0  # held-out slice of train for model selection when no val split exists


PRESETS: dict[str, DatasetPreset] = {
    "msrvtt": DatasetPreset(frames=12, words=32, val_fraction=0.05),
    "didemo": DatasetPreset(frames=64, words=64),
    "activitynet": DatasetPreset(frames=64, words=64, val_fraction=0.05),
    # A user's own videos: the MSR-VTT setting, which suits short clips.
    "folder": DatasetPreset(frames=12, words=32, val_fraction=0.1),
    # Built-in synthetic default for the demo and tests: small so that 2 CPU cores suffice. Clips last
    # 0.6-6 s (at most 6 frames at 1 fps). lr 1e-3 (the muse head at 1e-2) for 10 epochs, measured on the
    # demo's cache: the paper-size muse head learned the same (test t2v R@1 16.7, three runs with
    # different allocation patterns) where 3e-3 swung from 4.2 to 18.8 between runs, amplifying
    # last-bit run-to-run differences of CPU gradients (README, demo); seqTransf: RSum 303 vs 264.
    "synthetic": DatasetPreset(frames=4, words=32, batch_size=16, epochs=10, lr=1e-3, val_fraction=0.0),
}


def preset(dataset: str) -> DatasetPreset:
    try:
        return PRESETS[dataset]
    except KeyError:
        raise KeyError(f"no preset for dataset {dataset!r}; known: {', '.join(sorted(PRESETS))}") from None
