"""What an extraction run is asked to do, its defaults, its summary, and the checks of its inputs.

Every check here runs before anything is written: a bad option value, device, data root or output
folder raises `InputError` (one `error:` line in the CLI). `DECODERS` and `PRECISION_CHOICES` are
the only lists of those choices (the CLI builds its option enums from them).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from muse_pipeline.config import preset
from muse_pipeline.errors import InputError, UserError
from muse_pipeline.extract.windows import WindowSpec, window_spec

if TYPE_CHECKING:
    from muse_pipeline.data import DatasetIndex

DECODERS = ("pyav", "decord")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
# errno values that mean "the output disk cannot take it": a user problem, never a failed video.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what lands in the cache (and how the work is spread)."""

    dataset: str
    data_root: Path
    splits: tuple[str, ...] | None = None
    model: str = "ViT-B-32"
    pretrained: str | None = None
    frames: int | None = None  # None: the dataset preset
    words: int | None = None
    decoder: str = "pyav"
    device: str = "cpu"
    workers: int | None = None  # None: sized to the machine; 0: in this process, no dask
    scheduler: str | None = None  # address of an existing dask scheduler
    cache_dir: Path = Path("cache")
    out: Path | None = None
    overwrite: bool = False
    videos_per_shard: int | None = None
    max_failures: float = 0.01
    quiet: bool = False
    retry_failed: bool = False
    batch_frames: int | None = None  # None: sized to the device (see default_batch_frames)
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    decode_workers: int | None = None  # None: threads on CPU, a process pool on CUDA; 0: threads
    dashboard: bool = False
    window: int | None = None  # folder: auto-window length (s); None: 2 s per frame; 0: whole files
    stride: int | None = None  # folder: seconds between window starts; None: half a window

    @property
    def window_spec(self) -> WindowSpec:
        """The auto windows of the folder dataset (disabled for annotated datasets: their clips are given)."""
        if self.dataset != "folder":
            return WindowSpec(0, 0, self.max_frames)
        return window_spec(self.window, self.stride, self.max_frames)

    @property
    def max_frames(self) -> int:
        return self.frames or preset(self.dataset).frames

    @property
    def max_words(self) -> int:
        return self.words or preset(self.dataset).words

    @property
    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "fp16" if self.device.startswith("cuda") else "fp32"
        return self.precision

    @property
    def videos_per_batch(self) -> int:
        """Videos per encoder forward: --batch-frames // frames (at least 1)."""
        frames = self.batch_frames or default_batch_frames(self.device, self.max_frames)
        return max(1, frames // self.max_frames)

    def store_path(self) -> Path:
        """--out, else `<cache-dir>/<dataset>/<model>-<frames>f.zarr`; a folder library's store goes
        under a folder named after its data root (`library_name`): two libraries never share one."""
        if self.out is not None:
            return Path(self.out)
        safe_model = self.model.replace("/", "-")
        base = Path(self.cache_dir) / self.dataset
        if self.dataset == "folder":
            base = base / library_name(self.data_root)
        return base / f"{safe_model}-{self.max_frames}f.zarr"


def library_name(data_root: Path | str) -> str:
    """`<root folder name>-<8 hex of sha256 of the resolved root>`: readable, and unique per folder."""
    import hashlib

    root = Path(data_root).resolve()
    name = re.sub(r"[^\w.-]+", "_", root.name).strip("._") or "root"
    return f"{name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def check_library_root(cfg: ExtractConfig, store: Path) -> None:
    """InputError when `store` holds the library of another data root (folder dataset, without
    --overwrite): one store per library; the fix is another --out, never deleting the other one."""
    if cfg.dataset != "folder" or cfg.overwrite or not (Path(store) / "zarr.json").is_file():
        return
    try:
        from muse_pipeline.cache.store import FeatureCache

        stored = FeatureCache.open(store).fingerprint.get("data_root")
    except (OSError, ValueError, KeyError):
        return
    root = str(Path(cfg.data_root).resolve())
    if stored is not None and stored != root:
        raise InputError(
            f"{store} holds the library of {stored}, not {root}; give this folder its own store: "
            "pass another --out (or leave --out out: the default store is named after the folder)"
        )


@dataclass
class ExtractSummary:
    store: Path
    n_videos: int
    n_cached: int
    n_failed: int
    n_texts: int
    frames_encoded: int
    seconds: float
    failures: list[dict] = field(default_factory=list)
    max_failures: float = 0.01
    warnings: list[dict] = field(default_factory=list)
    retried: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # frames per encoder forward, this run
    library: str | None = None  # a folder library's update: "3 new, 1 changed, 1 removed, 11 unchanged"
    path_taken: str = ""  # where the work ran: in this process or on dask, and why

    @property
    def failure_rate(self) -> float:
        return self.n_failed / max(self.n_videos, 1)

    @property
    def ok(self) -> bool:
        return self.failure_rate <= self.max_failures


class OutputError(UserError):
    """The output disk failed under us (full, read-only): what is written stays resumable."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Defaults sized to the machine.


def default_batch_frames(device: str, frames: int) -> int:
    """Frames per encoder forward. CPU: one video (a bigger batch gains nothing on a few cores).
    CUDA: ~16 frames per GiB of the card (2048 on an 80 GB H100; ViT-B/32 in fp16 needs well under
    1 GB of activations for that), at least 64."""
    if not device.startswith("cuda"):
        return frames
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    gib = torch.cuda.get_device_properties(index).total_memory / 2**30
    return int(min(2048, max(64, 16 * gib)))


def default_decode_workers(device: str, n_workers: int) -> int:
    """CPU: 0 (decode threads; the encoder needs the cores). CUDA: the CPU cores per GPU worker,
    less one for the worker itself."""
    if not device.startswith("cuda"):
        return 0
    return max(1, (os.cpu_count() or 1) // max(n_workers, 1) - 1)


@dataclass(frozen=True)
class WorkPlan:
    """Where the shard tasks run: `in_process` (no dask), else `local_workers` dask workers of a
    LocalCluster (None with a --scheduler); `reason`: one line for the user."""

    in_process: bool
    local_workers: int | None
    reason: str


def choose_work_plan(cfg: ExtractConfig) -> WorkPlan:
    """--scheduler: that cluster. --workers 0: this process. --workers N: a LocalCluster of N.
    Default: a LocalCluster sized to the machine, except on a CPU where it would get one worker:
    then this process, which does the same work without dask's start-up and transfers (measured
    faster: BENCHMARKS.md, Extraction)."""
    if cfg.scheduler is not None:
        return WorkPlan(False, None, f"running on the dask scheduler at {cfg.scheduler}")
    if cfg.workers == 0:
        return WorkPlan(True, None, "running in this process (--workers 0)")
    if cfg.workers is not None:
        return WorkPlan(False, cfg.workers, f"running on a local dask cluster of {cfg.workers} worker(s) (--workers)")
    n = default_workers(cfg.device)
    if n == 1 and not cfg.device.startswith("cuda"):
        return WorkPlan(True, None, f"running in this process: {os.cpu_count() or 1} CPU core(s) would give a "
                                    "dask cluster one worker, which only adds overhead (--workers N to force dask)")
    return WorkPlan(False, n, f"running on a local dask cluster of {n} worker(s) (sized to this machine)")


def default_workers(device: str) -> int:
    """CPU: up to 8 workers of 2 threads; CUDA: one worker per GPU."""
    if device.startswith("cuda"):
        import torch

        return 1 if ":" in device else max(torch.cuda.device_count(), 1)
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 8))


# --------------------------------------------------------------------------------------------------
# Checks: everything a user can get wrong, before anything is written.


def check_config(cfg: ExtractConfig) -> None:
    """InputError for a bad option value or a missing input (nothing is created before this)."""
    from muse_pipeline.data import DATASETS
    from muse_pipeline.encoders.clip import check_model_name, check_pretrained

    if cfg.dataset not in DATASETS.names():
        raise InputError(f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASETS.names())}")
    if cfg.decoder not in DECODERS:
        raise InputError(f"unknown decoder {cfg.decoder!r}; choose one of: {', '.join(DECODERS)}")
    if cfg.precision not in PRECISION_CHOICES:
        raise InputError(f"unknown precision {cfg.precision!r}; choose one of: {', '.join(PRECISION_CHOICES)}")
    for flag, value, low in (("--frames", cfg.frames, 1), ("--words", cfg.words, 3),
                             ("--videos-per-shard", cfg.videos_per_shard, 1),
                             ("--batch-frames", cfg.batch_frames, 1), ("--workers", cfg.workers, 0),
                             ("--decode-workers", cfg.decode_workers, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if not (0.0 <= cfg.max_failures <= 1.0):  # also refuses NaN
        raise InputError(f"--max-failures is a fraction of the videos, in [0, 1]; got {cfg.max_failures}")
    from muse_pipeline.data import SPLITS

    unknown = [s for s in cfg.splits or () if s not in SPLITS]
    if unknown:
        raise InputError(f"unknown split(s) {', '.join(unknown)}; choose from: {', '.join(SPLITS)}")
    if cfg.dataset != "folder" and (cfg.window is not None or cfg.stride is not None):
        raise InputError(f"--window / --stride cut the files of --dataset folder; {cfg.dataset} clips are given "
                         "by its annotations")
    if cfg.stride is not None and cfg.stride < 1:
        raise InputError(f"--stride must be >= 1 second, got {cfg.stride}")
    cfg.window_spec  # noqa: B018  (InputError for a window the frames do not divide)
    check_device(cfg.device)
    root = Path(cfg.data_root)
    if cfg.dataset != "synthetic" and not root.is_dir():  # synthetic generates a missing root
        what = "is not a folder" if root.exists() else "does not exist"
        raise InputError(f"--data-root {root} {what}; point it at the {cfg.dataset} annotations and videos")
    check_model_name(cfg.model)
    check_pretrained(cfg.model, cfg.pretrained)


def check_device(device: str) -> None:
    """InputError unless `device` is cpu, cuda or cuda:N and that GPU is visible to torch."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(store: Path, needed_bytes: int = 0) -> None:
    """InputError unless the store's folder can be written and has room for `needed_bytes`.
    Probes with a temporary file (permissions alone do not show a read-only mount)."""
    store = Path(store)
    if store.exists() and not store.is_dir():
        raise InputError(f"output {store} exists and is not a folder; choose another --out")
    anchor = _existing_ancestor(store.parent)
    if not anchor.is_dir():
        raise InputError(f"cannot create {store}: {anchor} is a file, not a folder; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".muse-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"cannot write to {anchor} ({err.strerror}); choose another --out / --cache-dir") from None
    free = shutil.disk_usage(anchor).free
    if needed_bytes > free:
        raise InputError(
            f"not enough space for {store}: about {needed_bytes / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free on {anchor}; free some space or choose another --out"
        )


def needed_bytes(cfg: ExtractConfig, index: DatasetIndex, num_tokens: int, dim: int, store: Path,
                 extra_rows: int = 0) -> int:
    """Bytes this run still writes: float16 tokens of the pending rows of `index` (compression saves
    under 10% on tokens) and the text embeddings; the staged copy of the shard being written is not
    counted. `extra_rows`: rows this run appends to an existing store (a growing library)."""
    per_video = cfg.max_frames * num_tokens * dim * 2
    pending = len(index.videos)
    if store.exists():
        try:
            from muse_pipeline.cache.store import FeatureCache

            pending = int((FeatureCache.open(store).read_done() == 0).sum()) + extra_rows
        except (OSError, ValueError, KeyError):
            pass
    return pending * per_video + len(index.captions) * dim * 2
