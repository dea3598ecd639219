"""Training data: the split plan, the batch sampler, and the datasets (from the cache, or end to end).

A training sample is one text plus its video (spec section 7): the cache's `texts/*` arrays hold
exactly the training texts with their `video_index`, so MSR-VTT videos appear once per caption.

Datasets here are BATCH datasets: `dataset[list_of_positions]` returns a whole collated batch, so
the cache is read with one `read_videos` call per batch (whole Zarr chunks, sorted, each video
once) inside a DataLoader worker, instead of one small read per sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from muse_pipeline.errors import UserError

# videos/done values (docs/ARCHITECTURE.md)
PENDING, CACHED, FAILED = 0, 1, 2


class CacheError(UserError, RuntimeError):
    """The cache cannot be trained from (missing, incomplete, or empty training split)."""


# --------------------------------------------------------------------------------------------------
# Split plan


@dataclass(frozen=True)
class SplitPlan:
    """Which texts train and which videos/texts select the model. Indices are cache rows.

    train_texts: [n] text rows; val_videos: [v] video rows; val_texts: [m] text rows of val videos.
    """

    train_texts: np.ndarray
    val_videos: np.ndarray
    val_texts: np.ndarray
    val_source: str  # "val split", "held-out train videos (fraction f)", or "none"

    @property
    def has_val(self) -> bool:
        return len(self.val_videos) > 0 and len(self.val_texts) > 0


def _stable_key(video_id: str) -> str:
    # Hash of the id, not its position: the held-out slice does not move when videos are added/reordered.
    return hashlib.sha1(str(video_id).encode()).hexdigest()


def plan_splits(
    video_ids: Sequence[str],
    video_split: Sequence[str],
    video_done: np.ndarray,
    text_video: np.ndarray,
    val_fraction: float,
) -> SplitPlan:
    """Train texts and validation set; the test split is never used.

    Validation: the "val" split when it has cached videos; else the `val_fraction` of cached train
    videos with the smallest sha1(id) (all captions of a held-out video go to val); else none.
    """
    split = np.asarray([str(s) for s in video_split])
    done = np.asarray(video_done)
    text_video = np.asarray(text_video, dtype=np.int64)
    cached = done == CACHED
    train_v = np.flatnonzero((split == "train") & cached)
    val_v = np.flatnonzero((split == "val") & cached)
    source = "val split"
    if len(val_v) == 0:
        if val_fraction > 0 and len(train_v) > 1:
            n_val = min(len(train_v) - 1, max(1, int(round(val_fraction * len(train_v)))))
            order = sorted(train_v.tolist(), key=lambda i: _stable_key(video_ids[i]))
            val_v = np.sort(np.asarray(order[:n_val], dtype=np.int64))
            train_v = np.setdiff1d(train_v, val_v)
            source = f"held-out train videos (fraction {val_fraction:g})"
        else:
            source = "none"
    is_train = np.zeros(len(split), dtype=bool)
    is_train[train_v] = True
    is_val = np.zeros(len(split), dtype=bool)
    is_val[val_v] = True
    train_t = np.flatnonzero(is_train[text_video])
    val_t = np.flatnonzero(is_val[text_video])
    return SplitPlan(train_t.astype(np.int64), val_v.astype(np.int64), val_t.astype(np.int64), source)


# --------------------------------------------------------------------------------------------------
# Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's share of each GLOBAL batch of one epoch, reproducible from (seed, epoch).

    A DistributedSampler (shuffle, drop_last) deals a per-epoch permutation round-robin to the ranks,
    then a BatchSampler cuts it into local batches of global_batch / world_size. Global batch b is
    then the same SET of samples for any world size (positions [b*G, (b+1)*G) of the permutation),
    which is what makes a 2-process run equal a 1-process run. `skip` drops the first batches of an
    epoch, for an exact mid-epoch resume.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 42) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if n < global_batch:
            raise ValueError(
                f"only {n} training samples for a global batch of {global_batch}: lower --batch-size"
            )
        self.n = n
        self.local_batch = global_batch // world_size
        self._dist = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self._batches = BatchSampler(self._dist, self.local_batch, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self._dist.set_epoch(epoch)
        self.skip = skip

    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def __len__(self) -> int:
        return len(self._batches) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self._batches):
            if i >= self.skip:
                yield batch


# --------------------------------------------------------------------------------------------------
# Cache data


@dataclass
class CacheArrays:
    """The small arrays of a cache, read once in the main process (texts are [M, D] float16)."""

    path: Path
    video_ids: np.ndarray  # [N] object (str)
    video_split: np.ndarray  # [N] object (str)
    video_done: np.ndarray  # [N] uint8
    text_video: np.ndarray  # [M] int64
    text_emb: np.ndarray  # [M, D] float16
    text_done: np.ndarray  # [M] uint8
    fingerprint: dict
    frames: int
    num_tokens: int
    dim: int


def open_cache_arrays(path: Path | str) -> CacheArrays:
    """Open a cache for training; CacheError if it is missing or not finished."""
    from muse_pipeline.cache.store import FeatureCache

    path = Path(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}: run `muse extract` first (or pass the right --from-cache path)")
    try:
        cache = FeatureCache.open(path, mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure to open means "not a usable cache"
        raise CacheError(f"{path} is not a readable MUSE cache: {exc}") from exc
    done = np.asarray(cache.read_done())
    pending = int((done == PENDING).sum())
    if pending:
        raise CacheError(
            f"cache {path} is incomplete: {pending} of {len(done)} videos are still pending. "
            "Re-run the same `muse extract` command to finish it (it resumes where it stopped)."
        )
    text_done = np.asarray(cache.read_text_done())
    if not text_done.all():
        missing = int((text_done == 0).sum())
        raise CacheError(
            f"cache {path} is incomplete: {missing} of {len(text_done)} text embeddings are missing. "
            "Re-run the same `muse extract` command to finish it."
        )
    return CacheArrays(
        path=path,
        video_ids=np.asarray([str(v) for v in cache.video_ids], dtype=object),
        video_split=np.asarray([str(s) for s in cache.video_splits], dtype=object),
        video_done=done,
        text_video=np.asarray(cache.text_video_index, dtype=np.int64),
        text_emb=np.asarray(cache.read_text_embeddings()),
        text_done=text_done,
        fingerprint=dict(cache.fingerprint),
        frames=int(cache.frames),
        num_tokens=int(cache.num_tokens),
        dim=int(cache.dim),
    )


class CachePairDataset(Dataset):
    """Batch dataset over training pairs from the cache.

    `dataset[positions]` -> {"tokens": [B,T,L,D] f16, "mask": [B,T] bool, "text_emb": [B,D] f16}
    where positions index `text_rows` (the plan's train texts).
    """

    def __init__(self, arrays: CacheArrays, text_rows: np.ndarray) -> None:
        self.path = arrays.path
        self.text_rows = np.asarray(text_rows, dtype=np.int64)
        self.text_video = arrays.text_video
        self.text_emb = arrays.text_emb
        self._cache = None  # opened lazily: each DataLoader worker gets its own handle

    def __len__(self) -> int:
        return len(self.text_rows)

    def _reader(self):
        if self._cache is None:
            from muse_pipeline.cache.store import FeatureCache

            self._cache = FeatureCache.open(self.path, mode="r")
        return self._cache

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def read_videos(self, videos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [b,T,L,D] f16 and mask [b,T] bool of cache rows `videos` (any order, repeats ok)."""
        unique, inverse = np.unique(videos, return_inverse=True)
        tokens, mask = self._reader().read_videos(unique)
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))[torch.from_numpy(inverse)]
        mask = torch.from_numpy(np.asarray(mask)).bool()[torch.from_numpy(inverse)]
        return tokens, mask

    def __getitem__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.text_rows[np.asarray(positions, dtype=np.int64)]
        tokens, mask = self.read_videos(self.text_video[rows])
        return {"tokens": tokens, "mask": mask, "text_emb": torch.from_numpy(self.text_emb[rows])}


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """One batch per sampler item; a private generator so that creating an iterator never draws from
    the global torch RNG (which would shift dropout masks and break an exact resume)."""
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if num_workers > 0 else None,
    )


# --------------------------------------------------------------------------------------------------
# End-to-end data (frames decoded in the loop, no cache)


class EndToEndPairDataset(Dataset):
    """Batch dataset that decodes videos: `dataset[positions]` ->
    {"pixels": [B,T,3,S,S] f32, "mask": [B,T] bool, "text_ids": [B,W] int64}.

    positions index `text_rows`; `videos` are the dataset's VideoItems (paths, clip windows).
    A video that fails to decode mid-training becomes one black frame (mask 1 frame) and a warning,
    so one bad file cannot kill a long run; `muse extract` is where bad files get reported.
    """

    def __init__(self, videos: Sequence, text_video: np.ndarray, text_ids: np.ndarray, text_rows: np.ndarray,
                 frames: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                 decoder: str = "pyav") -> None:
        self.videos = list(videos)
        self.text_video = np.asarray(text_video, dtype=np.int64)
        self.text_ids = np.asarray(text_ids)
        self.text_rows = np.asarray(text_rows, dtype=np.int64)
        self.frames = frames
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.text_rows)

    def _one_video(self, row: int) -> tuple[torch.Tensor, int]:
        from muse_pipeline.video.decode import DecodeError, decode_clip
        from muse_pipeline.video.transforms import preprocess_frames

        item = self.videos[row]
        try:
            frames = decode_clip(item.path, self.frames, start=item.start, end=item.end, backend=self.decoder)
            return preprocess_frames(frames, self.image_size, self.mean, self.std), len(frames)
        except DecodeError as exc:
            import warnings

            warnings.warn(f"video {item.id}: {exc}; using a black frame", RuntimeWarning, stacklevel=2)
            return torch.zeros(1, 3, self.image_size, self.image_size), 1

    def video_batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [b,T,3,S,S] (zeros at padding) and mask [b,T] bool of video rows `rows`."""
        s = self.image_size
        pixels = torch.zeros(len(rows), self.frames, 3, s, s)
        mask = torch.zeros(len(rows), self.frames, dtype=torch.bool)
        for i, row in enumerate(rows):
            px, n = self._one_video(int(row))
            pixels[i, :n] = px[: self.frames]
            mask[i, :n] = True
        return pixels, mask

    def __getitem__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.text_rows[np.asarray(positions, dtype=np.int64)]
        pixels, mask = self.video_batch(self.text_video[rows])
        return {"pixels": pixels, "mask": mask, "text_ids": torch.from_numpy(self.text_ids[rows].astype(np.int64))}
