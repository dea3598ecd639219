"""TrainConfig: every knob of spec section 7, with per-dataset defaults from `muse_pipeline.config.PRESETS`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from muse_pipeline.config import preset

# spec section 7: logit_scale is clamped to at most ln(100), as in CLIP.
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's recipe (spec section 7); presets fill the dataset values.

    Epochs: every epoch is a fresh seeded permutation of the n training pairs cut into global batches
    of `batch_size` with drop_last, so each epoch trains floor(n / batch_size) batches and skips the
    n mod batch_size pairs at the end of its permutation (a different set each epoch).
    Protocol: a selection run keeps the epoch with the best validation t2v R@1 (`best.safetensors`);
    a `refit` run retrains on every training video for the number of epochs selection chose and keeps
    the last epoch (no validation selects anything in it).
    """

    dataset: str = "synthetic"
    head: str = "muse"
    epochs: int = 5
    batch_size: int = 128  # GLOBAL batch, split evenly over ranks
    lr: float = 1e-4  # base lr (parameters that are neither head/adapter nor CLIP)
    head_lr_mult: float = 10.0  # fusion head and text adapter: 10x
    clip_lr: float = 1e-7  # CLIP's parameters: logit_scale always, the towers in end-to-end mode
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_fraction: float = 0.1  # linear warmup over this fraction of all steps, then cosine
    grad_clip: float = 1.0
    seed: int = 42
    val_fraction: float = 0.0  # held-out train videos when the cache has no "val" split
    refit: bool = False  # a refit run: all training videos, `epochs` = the selected count, last epoch = model
    frames: int = 12
    words: int = 32
    text_adapter: bool = True
    end_to_end: bool = False
    amp: bool = True  # bf16 autocast on CUDA; a run's config.json records whether it really ran
    num_workers: int = 2
    log_every: int = 10  # steps between "step" records in metrics.jsonl

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.head_lr_mult > 0, f"head_lr_mult must be > 0, got {self.head_lr_mult}"),
            (self.clip_lr >= 0, f"clip_lr must be >= 0, got {self.clip_lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0.0 <= self.warmup_fraction < 1.0, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (not (self.refit and self.val_fraction > 0), "a refit run trains on all training videos: val_fraction must be 0"),
            (self.frames >= 1 and self.words >= 3, f"frames >= 1 and words >= 3 needed, got {self.frames}, {self.words}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (len(self.betas) == 2, f"betas must be a pair, got {self.betas}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_preset(cls, dataset: str, **overrides: Any) -> TrainConfig:
        """The dataset's preset values, then `overrides` (None values are ignored, so CLI defaults pass through)."""
        p = preset(dataset)
        base = dict(
            dataset=dataset,
            frames=p.frames,
            words=p.words,
            batch_size=p.batch_size,
            epochs=p.epochs,
            lr=p.lr,
            val_fraction=p.val_fraction,
        )
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "betas" in base:
            base["betas"] = tuple(base["betas"])
        return cls(**base)

    def refit_note(self, n_pairs: int) -> str:
        """What a refit run does, in one line for the console (n_pairs: its training pairs)."""
        skipped = n_pairs % self.batch_size
        dropped = (f"; {skipped} of the {n_pairs} pairs are left out of each epoch by drop_last "
                   "(a different set each epoch)" if skipped else "")
        return (f"refit: training on all {n_pairs} training pairs for {self.epochs} epoch(s) (the count "
                f"validation selected); no selection, the last epoch is kept (best = last){dropped}")

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)
