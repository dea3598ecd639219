"""Training data: the split plan, the batch sampler, and the datasets (from the cache, or end to end).

A training sample is one text plus its video (spec section 7): the cache's `texts/*` arrays hold
exactly the training texts with their `video_index`, so MSR-VTT videos appear once per caption.

Datasets here are BATCH datasets: `dataset[list_of_positions]` returns a whole collated batch, so
the cache is read with one `read_videos` call per batch (whole Zarr chunks, sorted, each video
once) inside a DataLoader worker, instead of one small read per sample.
"""

from __future__ import annotations

import hashlib
import os
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


# --------------------------------------------------------------------------------------------------
# Training tokens held in memory (`--cache-memory`)

CACHE_MEMORY_MODES = ("auto", "ram", "device", "off")
# `auto` keeps tokens on the GPU when they take at most this fraction of its free memory (the rest is
# for activations: the paper-size muse head at batch 128 needs a few GB), else in RAM when they take
# at most RAM_FRACTION of the available RAM (per process on this machine), else reads the cache.
DEVICE_FRACTION = 0.4
RAM_FRACTION = 0.5


@dataclass(frozen=True)
class CacheMemory:
    """Where the training tokens live: "device" (GPU), "ram" (pinned on CUDA) or "off" (cache reads)."""

    mode: str
    requested: str
    token_bytes: int  # training videos' tokens + masks, per process
    reason: str

    def describe(self) -> str:
        return f"cache memory: {self.mode} ({self.token_bytes / 2**30:.2f} GiB of training tokens; {self.reason})"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "requested": self.requested, "token_bytes": self.token_bytes,
                "reason": self.reason}


def available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or total RAM if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_device_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device (0 for other devices)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def choose_cache_memory(requested: str, token_bytes: int, device: torch.device, processes: int = 1, *,
                        free_device: int | None = None, free_ram: int | None = None) -> CacheMemory:
    """Decide where training tokens live. `processes`: ranks on this machine, each holding a copy.
    An explicit mode that cannot work (device without CUDA, more than the free memory) is an InputError."""
    from muse_pipeline.errors import InputError

    if requested not in CACHE_MEMORY_MODES:
        raise InputError(f"--cache-memory must be one of {', '.join(CACHE_MEMORY_MODES)}, got {requested!r}")
    gib = 2**30
    ram = available_ram() if free_ram is None else free_ram
    is_cuda = device.type == "cuda"
    gpu = (free_device_memory(device) if free_device is None else free_device) if is_cuda else 0
    if requested == "off":
        return CacheMemory("off", requested, token_bytes, "asked for: batches are read from the cache")
    if requested == "device":
        if not is_cuda:
            raise InputError(f"--cache-memory device needs a CUDA device, this run uses {device}; use ram or auto")
        if token_bytes > gpu:
            raise InputError(f"--cache-memory device: {token_bytes / gib:.2f} GiB of training tokens do not fit "
                             f"in the {gpu / gib:.2f} GiB free on {device}; use ram or auto")
        return CacheMemory("device", requested, token_bytes, f"asked for; {gpu / gib:.1f} GiB free on {device}")
    if requested == "ram":
        if token_bytes * processes > ram:
            raise InputError(f"--cache-memory ram: {processes} x {token_bytes / gib:.2f} GiB of training tokens "
                             f"exceed the {ram / gib:.2f} GiB of available RAM; use off or auto")
        return CacheMemory("ram", requested, token_bytes, f"asked for; {ram / gib:.1f} GiB RAM available")
    if is_cuda and token_bytes <= DEVICE_FRACTION * gpu:
        why = f"auto: fits in {DEVICE_FRACTION:.0%} of the {gpu / gib:.1f} GiB free on {device}"
        return CacheMemory("device", requested, token_bytes, why)
    if token_bytes * processes <= RAM_FRACTION * ram:
        why = (f"auto: {processes} cop{'y' if processes == 1 else 'ies'} fit in {RAM_FRACTION:.0%} of the "
               f"{ram / gib:.1f} GiB of available RAM")
        return CacheMemory("ram", requested, token_bytes, why)
    return CacheMemory("off", requested, token_bytes,
                       f"auto: too large for {RAM_FRACTION:.0%} of the {ram / gib:.1f} GiB of available RAM")


class InMemoryCachePairDataset(CachePairDataset):
    """CachePairDataset whose training videos are read once into one tensor, in (pinned) RAM or on
    the GPU; each batch is then one gather there (`index_select`), in the main process.

    Batches are identical to CachePairDataset's (same float16 tokens, same masks). Videos outside the
    training set (validation) are still read from the cache."""

    in_memory = True  # make_loader: no worker processes (they would copy the tensor), no pin_memory

    def __init__(self, arrays: CacheArrays, text_rows: np.ndarray, device: torch.device, pin: bool,
                 read_rows: int = 64) -> None:
        super().__init__(arrays, text_rows)
        videos = np.unique(self.text_video[self.text_rows])
        self.slot = np.full(len(arrays.video_ids), -1, dtype=np.int64)
        self.slot[videos] = np.arange(len(videos))
        shape = (len(videos), arrays.frames, arrays.num_tokens, arrays.dim)
        on_device = device.type != "cpu"
        self.device = device if on_device else torch.device("cpu")
        self.pin = pin and not on_device
        self.tokens = torch.empty(shape, dtype=torch.float16, device=self.device, pin_memory=self.pin)
        self.mask = torch.empty(shape[:2], dtype=torch.bool, device=self.device)
        reader = self._reader()
        # RAM: read straight into the tensor; GPU: through one pinned staging buffer of `read_rows` videos
        stage = None if not on_device else torch.empty((read_rows, *shape[1:]), dtype=torch.float16,
                                                        pin_memory=torch.cuda.is_available())
        mask_np = np.empty(shape[:2], np.uint8)
        for lo in range(0, len(videos), read_rows):
            rows = videos[lo : lo + read_rows]
            if stage is None:
                reader.read_videos_into(rows, self.tokens[lo : lo + len(rows)].numpy(), mask_np[lo : lo + len(rows)])
            else:
                buf = stage[: len(rows)]
                reader.read_videos_into(rows, buf.numpy(), mask_np[lo : lo + len(rows)])
                self.tokens[lo : lo + len(rows)].copy_(buf)  # synchronous: the buffer is reused next
        self.mask.copy_(torch.from_numpy(mask_np).bool())

    def __getstate__(self) -> dict:
        raise TypeError("InMemoryCachePairDataset is used in the main process only (make_loader: no workers)")

    def gather_rows(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(slots).to(self.device)
        if self.device.type != "cpu":
            return self.tokens.index_select(0, index), self.mask.index_select(0, index)
        # One memcpy per video (rows are ~0.6 MB): several times torch's float16 index_select and numpy's
        # take on one CPU thread. Into pinned memory on CUDA machines, so that the trainer's
        # non_blocking copy to the GPU is asynchronous.
        tokens = torch.empty((len(slots), *self.tokens.shape[1:]), dtype=torch.float16, pin_memory=self.pin)
        src, dst = self.tokens.numpy(), tokens.numpy()
        for j, slot in enumerate(slots.tolist()):
            dst[j] = src[slot]
        return tokens, self.mask.index_select(0, index)

    def read_videos(self, videos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slot[np.asarray(videos, dtype=np.int64)]
        if (slots < 0).any():
            return super().read_videos(videos)
        return self.gather_rows(slots)

    def __getitem__(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.text_rows[np.asarray(positions, dtype=np.int64)]
        tokens, mask = self.gather_rows(self.slot[self.text_video[rows]])
        return {"tokens": tokens, "mask": mask, "text_emb": torch.from_numpy(self.text_emb[rows])}


def training_token_bytes(arrays: CacheArrays, text_rows: np.ndarray) -> int:
    n = len(np.unique(arrays.text_video[np.asarray(text_rows, dtype=np.int64)]))
    return n * arrays.frames * (arrays.num_tokens * arrays.dim * 2 + 1)


def cache_dataset(arrays: CacheArrays, text_rows: np.ndarray, requested: str, device: torch.device,
                  processes: int = 1) -> tuple[CachePairDataset, CacheMemory]:
    """The training dataset for `--cache-memory requested` on `device`, and the decision taken."""
    memory = choose_cache_memory(requested, training_token_bytes(arrays, text_rows), device, processes)
    if memory.mode == "off":
        return CachePairDataset(arrays, text_rows), memory
    where = device if memory.mode == "device" else torch.device("cpu")
    return InMemoryCachePairDataset(arrays, text_rows, where, pin=device.type == "cuda"), memory


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """One batch per sampler item; a private generator so that creating an iterator never draws from
    the global torch RNG (which would shift dropout masks and break an exact resume). Datasets held
    in memory are gathered in the main process (already pinned or on the device)."""
    if getattr(dataset, "in_memory", False):
        num_workers, pin_memory = 0, False
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
