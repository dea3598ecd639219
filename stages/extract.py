"""Extract stage: decode videos, run CLIP, cache every frame's tokens in a sharded Zarr store.

One writer per store: the client holds `<store>.lock` (muse_pipeline.cache.lock) for the whole run;
a second `muse extract` on the same store is refused at once, and workers check before each write
that their run still owns the store.

Work is split by shard: one task owns all videos of one shard of `videos/tokens` (and the matching
chunks of `videos/mask` and `videos/done`), so no two processes ever write the same file. Texts are
split the same way by chunk of `texts/embeddings`.

Within a shard, videos are encoded in fixed groups of `videos_per_batch` consecutive videos: one
encoder forward per group (the frames of all its videos), so a GPU sees batches of hundreds of
frames. The groups depend only on the store (never on where a run resumed), so the cached bits do
not depend on interruptions: a resumed run is bit-identical to an uninterrupted one. Decoding and
preprocessing (the CPU work) run ahead of the encoder, in threads or in a pool of processes.

Resume and crash safety come from a staging folder beside the store (`<store>.staging/`):
- each finished video is staged as one small file (`<index>.npy`, `<index>.fail` or a `.warn` beside
  its `.npy`), written atomically, so an interruption loses at most the group in flight;
- when all videos of a shard are staged, the task writes the shard in one go, then its done flags,
  then removes the shard's staged tokens, keeping `ledger.json` (failures and decoder warnings) until
  the client (the only writer of the root attributes) has merged it into the store's ledger;
- before a group is decoded/encoded, the task records it in `inflight.json` with its run id and pid.
  A later task of the SAME run that finds such a record knows a worker process died on it (a crash);
  a record of an earlier run only means that run was interrupted (Ctrl-C, SIGTERM, a killed client),
  which never counts. After a crash the shard continues one video at a time, so the next crash names
  the culprit; a video in flight at MAX_CRASHES_PER_VIDEO crashes is ledgered as failed.
Failed videos are retried by a later run when their file changed (size or mtime) or with
`--retry-failed`; the ledger moves the old record to `failure_history`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from muse_pipeline import __version__
from muse_pipeline.cache.store import ROW_CHUNK as TEXT_CHUNK  # one text task per texts/* chunk
from muse_pipeline.config import preset
from muse_pipeline.data import DatasetIndex, load_dataset
from muse_pipeline.errors import InputError, UserError

log = logging.getLogger(__name__)

# A video that was being decoded/encoded when its worker died this many times is given up on.
MAX_CRASHES_PER_VIDEO = 2
TEXT_BATCH = 256
SAMPLING = "fps=1;pts<=t;linspace(0,n-1,T);upright;clip4clip"
DECODERS = ("pyav", "decord")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
# Test-only hooks (never set them in production): pause a run for good once this many videos were
# staged by the process, with the next group already marked in flight, so that a test decides
# exactly when to interrupt it; and make a dask worker die (SIGKILL) when a given video id is in flight.
PAUSE_ENV = "MUSE_TEST_PAUSE_AFTER"
CRASH_ENV = "MUSE_TEST_CRASH_ID"
PAUSED_MARKER = "paused"
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
        if self.out is not None:
            return Path(self.out)
        safe_model = self.model.replace("/", "-")
        return Path(self.cache_dir) / self.dataset / f"{safe_model}-{self.max_frames}f.zarr"


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

    @property
    def failure_rate(self) -> float:
        return self.n_failed / max(self.n_videos, 1)

    @property
    def ok(self) -> bool:
        return self.failure_rate <= self.max_failures


# --------------------------------------------------------------------------------------------------
# Validation: everything a user can get wrong, checked before anything is written.


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
    check_device(cfg.device)
    root = Path(cfg.data_root)
    if cfg.dataset != "synthetic" and not root.is_dir():  # synthetic generates a missing root
        what = "is not a folder" if root.exists() else "does not exist"
        raise InputError(f"--data-root {root} {what}; point it at the {cfg.dataset} annotations and videos")
    check_model_name(cfg.model)
    check_pretrained(cfg.model, cfg.pretrained)


def check_device(device: str) -> None:
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
    import tempfile

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


def _needed_bytes(cfg: ExtractConfig, index: DatasetIndex, num_tokens: int, dim: int, store: Path) -> int:
    """Upper bound of what this run still writes: float16 tokens of the pending videos (compression
    saves under 10% on tokens), the text embeddings, plus one staged shard."""
    per_video = cfg.max_frames * num_tokens * dim * 2
    pending = len(index.videos)
    if store.exists():
        try:
            from muse_pipeline.cache.store import FeatureCache

            pending = int((FeatureCache.open(store).read_done() == 0).sum())
        except (OSError, ValueError, KeyError):
            pass
    return pending * per_video + len(index.captions) * dim * 2


class OutputError(UserError):
    """The output disk failed under us (full, read-only): what is written stays resumable."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Worker side: one encoder per process, loaded on first use.

_ENCODERS: dict[tuple, object] = {}


def _encoder(model: str, pretrained: str | None, device: str, precision: str = "fp32"):
    key = (model, pretrained, device, precision)
    if key not in _ENCODERS:
        from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config

        register_tiny_config()
        _ENCODERS[key] = ClipEncoder(model, pretrained=pretrained, device=device, precision=precision)
    return _ENCODERS[key]


def _worker_device(device: str) -> str:
    """On a multi-GPU machine each dask worker takes the GPU of its own index."""
    if device != "cuda":
        return device
    import torch

    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % max(torch.cuda.device_count(), 1)}"


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to process one shard (plain data: it travels to remote workers)."""

    store: str
    staging: str
    shard: int
    lo: int
    hi: int
    paths: tuple[str, ...]  # per video of [lo, hi)
    windows: tuple[tuple[float | None, float | None], ...]
    ids: tuple[str, ...]
    model: str
    pretrained: str | None
    device: str
    decoder: str
    frames: int
    threads: int | None = None  # torch intra-op threads on the worker (None: leave as is)
    run: str = ""  # the run (lock) id: a worker writes only while its run holds the store's lock
    precision: str = "fp32"
    videos_per_batch: int = 1
    decode_workers: int = 0  # 0: decode threads in the worker; N: a pool of N processes


def _set_threads(threads: int | None) -> None:
    """dask's nanny pins OMP_NUM_THREADS=1 in every worker (its pre-spawn-environ), which would leave
    a CPU worker's encoder on one core; the client decides instead."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


class Superseded(UserError):
    """This run no longer owns the store's lock (another run took it over): stop writing."""


def _check_owner(job: ShardJob) -> None:
    if not job.run:
        return
    from muse_pipeline.cache.lock import read_owner

    owner = read_owner(job.store) or {}
    if owner.get("run") != job.run:
        raise Superseded(f"{job.store}: another run now holds the store's lock; this task stops")


def decode_video(path: str, frames: int, start: float | None, end: float | None, decoder: str,
                 image_size: int, mean, std) -> tuple[str, object, list[str]]:
    """Decode + preprocess one video -> ("ok", float32 pixels [n, 3, S, S], warnings) or
    ("fail", reason, []). Never raises for a bad video: results cross process boundaries as data."""
    from muse_pipeline.video.decode import decode_clip_report
    from muse_pipeline.video.transforms import preprocess_frames

    try:
        clip = decode_clip_report(path, frames, start=start, end=end, backend=decoder)
        pixels = preprocess_frames(clip.frames, image_size, mean, std).numpy()
        return "ok", pixels, [str(w) for w in clip.warnings]
    except Exception as exc:  # noqa: BLE001  (a bad video must never stop the shard)
        return "fail", _failure_reason(exc), []


def _init_decode_process() -> None:
    import threading

    import torch

    torch.set_num_threads(1)  # one core per decode process: the pool size is the parallelism
    # A dask worker that is killed (Ctrl-C, a crash) cannot shut its pool down: without this its
    # decode processes would live on as orphans, so each one watches its parent. (PR_SET_PDEATHSIG
    # would fire when the dask thread that spawned the pool ends, not the process: not used.)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()


_POOLS: dict[int, Executor] = {}


def _decode_pool(n: int) -> Executor:
    """n == 0: two threads (PyAV and decord release the GIL); n >= 1: n spawned processes. Kept per
    process, so a worker that runs many shard tasks starts its pool once."""
    if n not in _POOLS:
        if n == 0:
            _POOLS[n] = ThreadPoolExecutor(max_workers=2)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            if multiprocessing.current_process().daemon:
                # a dask worker started with daemon=True (remote clusters' default) cannot have
                # children (set distributed.worker.daemon: false in the workers' dask config)
                log.warning("this dask worker is daemonic: decoding in threads instead of %d processes", n)
                return _decode_pool(0)
            _POOLS[n] = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_decode_process)
    return _POOLS[n]


def _reset_pool(n: int) -> None:
    pool = _POOLS.pop(n, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if name == "DecodeError":
        return getattr(exc, "reason", None) or text or "decode failed"
    return f"{name}: {text}"[:300]


def _file_state(path: str) -> dict:
    """Size and mtime of a video file: a failed video is retried when they change."""
    try:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"size": None, "mtime_ns": None}


_STAGED_IN_PROCESS = 0


def _test_hooks(job: ShardJob, staging: Path, group: list[int]) -> None:
    """PAUSE_ENV / CRASH_ENV (tests only), called with `group` recorded in flight."""
    crash_id = os.environ.get(CRASH_ENV)
    if crash_id and _in_dask_worker() and crash_id in {job.ids[o] for o in group}:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_ENV)
    if pause and _STAGED_IN_PROCESS >= int(pause):
        _atomic_write_bytes(Path(job.staging) / PAUSED_MARKER, str(os.getpid()).encode())
        while True:  # until the test interrupts or kills this process
            time.sleep(0.05)


class _ShardState:
    """The shard's staging folder: staged videos, the in-flight record and crash counts."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.dir = Path(job.staging) / f"shard-{job.shard:06d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.inflight_path = self.dir / "inflight.json"
        self.crashes_path = self.dir / "crashes.json"
        self.crashes: dict[str, int] = _read_json(self.crashes_path, {})
        record = _read_json(self.inflight_path, None)
        if record and record.get("run") == job.run and record.get("pid") != os.getpid():
            # A worker of this very run died with these videos in flight: a crash.
            for o in record.get("offsets", []):
                self.crashes[str(o)] = self.crashes.get(str(o), 0) + 1
            _atomic_write_bytes(self.crashes_path, json.dumps(self.crashes).encode())
        # A record of another run: that run was interrupted, which is not a crash. Forget it.
        self.inflight_path.unlink(missing_ok=True)

    def npy(self, o: int) -> Path:
        return self.dir / f"{o:06d}.npy"

    def fail(self, o: int) -> Path:
        return self.dir / f"{o:06d}.fail"

    def warn(self, o: int) -> Path:
        return self.dir / f"{o:06d}.warn"

    def staged(self, o: int) -> bool:
        return self.npy(o).exists() or self.fail(o).exists()

    def set_inflight(self, offsets: list[int]) -> None:
        record = {"run": self.job.run, "pid": os.getpid(), "offsets": offsets}
        _atomic_write_bytes(self.inflight_path, json.dumps(record).encode())

    def clear_inflight(self) -> None:
        self.inflight_path.unlink(missing_ok=True)

    def stage_failure(self, o: int, reason: str) -> None:
        record = {"reason": reason, **_file_state(self.job.paths[o])}
        _atomic_write_bytes(self.fail(o), json.dumps(record).encode())

    def stage_tokens(self, o: int, array: np.ndarray, warnings: list[str]) -> None:
        if warnings:
            _atomic_write_bytes(self.warn(o), json.dumps(warnings).encode())
        _atomic_save_npy(self.npy(o), array)  # last: the .npy makes the video staged

    def video_done(self, o: int) -> None:
        if self.crashes.pop(str(o), None) is not None:
            _atomic_write_bytes(self.crashes_path, json.dumps(self.crashes).encode())


def _groups(n: int, done: np.ndarray, size: int) -> list[list[int]]:
    """Fixed groups of `size` consecutive offsets (the same in every run), keeping the pending ones."""
    groups = []
    for g in range(0, n, size):
        members = [o for o in range(g, min(g + size, n)) if done[o] == 0]
        if members:
            groups.append(members)
    return groups


def process_shard(job: ShardJob, on_video: Callable[[], None] | None = None) -> dict:
    """Extract every pending video of one shard that is not staged yet, then write the shard.

    Runs on a dask worker (or inline with --workers 0). Returns counts, this shard's failures and
    decoder warnings, and the encoder batch sizes (frames) it ran.
    """
    global _STAGED_IN_PROCESS

    from muse_pipeline.cache.store import FeatureCache

    _set_threads(job.threads)
    _check_owner(job)
    state = _ShardState(job)
    n = job.hi - job.lo
    cache = FeatureCache.open(job.store, mode="r")
    done_before = cache.read_done()[job.lo : job.hi]

    # A video in flight when a worker of this run died MAX_CRASHES_PER_VIDEO times is a failure.
    for o in range(n):
        count = state.crashes.get(str(o), 0)
        if count >= MAX_CRASHES_PER_VIDEO and done_before[o] == 0 and not state.staged(o):
            state.stage_failure(o, f"worker process died {count} times while processing this video")
            state.video_done(o)
    # Whole groups are redone when any member is missing: the encoder batch must be the same as in
    # an uninterrupted run for the bits to be the same.
    groups = [g for g in _groups(n, done_before, job.videos_per_batch)
              if any(not state.staged(o) for o in g)]
    careful = bool(state.crashes)  # after a crash: one video at a time, decoded in this process
    frames_encoded, batch_sizes = 0, []
    if groups:
        encoder = _encoder(job.model, job.pretrained, _worker_device(job.device), job.precision)
        args = (encoder.image_size, encoder.mean, encoder.std)

        def decode_args(o: int) -> tuple:
            start, end = job.windows[o]
            return (job.paths[o], job.frames, start, end, job.decoder, *args)

        results: dict[int, tuple] = {}
        if careful:
            for group in groups:
                for o in group:
                    if state.fail(o).exists():
                        continue
                    state.set_inflight([o])
                    _test_hooks(job, state, [o])
                    results[o] = decode_video(*decode_args(o))
                state.set_inflight(group)  # the encoder's turn: a crash now blames the group
                frames_encoded += _encode_group(job, state, encoder, group, results, batch_sizes, [])
                _STAGED_IN_PROCESS += len(group)
                if on_video is not None:
                    for _ in group:
                        on_video()
        else:
            pool = _decode_pool(job.decode_workers)
            ahead = max(2, 2 * job.decode_workers, 2 * job.videos_per_batch)
            queue = deque(o for g in groups for o in g if not state.fail(o).exists())
            futures: dict[int, object] = {}

            def top_up() -> None:
                while queue and len(futures) < ahead:
                    o = queue.popleft()
                    futures[o] = pool.submit(decode_video, *decode_args(o))

            for group in groups:
                _check_owner(job)
                top_up()
                state.set_inflight(sorted(set(group) | set(futures)))
                _test_hooks(job, state, group)
                for o in group:
                    if o not in futures:
                        continue  # staged as failed above
                    results[o] = _result(futures.pop(o), job, decode_args(o))
                    top_up()
                frames_encoded += _encode_group(job, state, encoder, group, results, batch_sizes,
                                                list(futures))
                _STAGED_IN_PROCESS += len(group)
                if on_video is not None:
                    for _ in group:
                        on_video()
        state.clear_inflight()

    # Every video of the shard is staged: write the shard once, then the done flags.
    _check_owner(job)
    cache = FeatureCache.open(job.store, mode="r+")
    if (done_before != 0).any():  # a retry: keep the cached rows as stored
        tokens, mask = cache.read_videos(np.arange(job.lo, job.hi))
        tokens, mask = np.array(tokens), np.array(mask)
    else:
        tokens = np.zeros((n, job.frames, cache.num_tokens, cache.dim), dtype=np.float16)
        mask = np.zeros((n, job.frames), dtype=np.uint8)
    done = done_before.copy()
    failures, warnings = [], []
    for o in range(n):
        if done_before[o] != 0:
            continue
        npy = state.npy(o)
        if npy.exists():
            video_tokens = np.load(npy)
            tokens[o] = 0
            mask[o] = 0
            tokens[o, : video_tokens.shape[0]] = video_tokens
            mask[o, : video_tokens.shape[0]] = 1
            done[o] = 1
            if state.warn(o).exists():
                warnings.append({"id": job.ids[o], "warning": "; ".join(_read_json(state.warn(o), []))})
        else:
            record = _read_json(state.fail(o), None)
            if not isinstance(record, dict):  # a .fail of an older version: the reason as text
                record = {"reason": state.fail(o).read_text()}
            failures.append({"id": job.ids[o], **record})
            done[o] = 2
    cache.write_shard_videos(job.lo, tokens, mask, done)
    _atomic_write_bytes(state.dir / "ledger.json",
                        json.dumps({"failures": failures, "warnings": warnings}).encode())
    for path in [*state.dir.glob("*.npy"), *state.dir.glob("*.warn")]:
        path.unlink()
    return {"shard": job.shard, "frames": frames_encoded, "cached": int((done == 1).sum()),
            "failures": failures, "warnings": warnings, "batch_sizes": batch_sizes}


def _result(future, job: ShardJob, args: tuple) -> tuple:
    """A decode future's result; a decode process that died is retried alone in a fresh pool, and
    if it dies again that video is the one that kills the decoder."""
    try:
        return future.result()
    except BrokenProcessPool:
        _reset_pool(job.decode_workers)
        try:
            return _decode_pool(job.decode_workers).submit(decode_video, *args).result()
        except BrokenProcessPool:
            _reset_pool(job.decode_workers)
            return "fail", "the decoder process died on this video", []


def _encode_group(job: ShardJob, state: _ShardState, encoder, group: list[int], results: dict,
                  batch_sizes: list[int], prefetched: list[int]) -> int:
    """One encoder forward over the frames of `group`'s decoded videos; stage each video."""
    import torch

    ok = [o for o in group if o in results and results[o][0] == "ok"]
    for o in group:
        if o in results and results[o][0] != "ok":
            state.stage_failure(o, str(results[o][1]))
    encoded = 0
    if ok:
        pixels = torch.from_numpy(np.concatenate([results[o][1] for o in ok]))
        counts = [len(results[o][1]) for o in ok]
        try:
            with torch.inference_mode():
                tokens = encoder.encode_frames(pixels).to(torch.float16).numpy()
            error = None
        except Exception as exc:  # noqa: BLE001  (a model error fails these videos, not the shard)
            tokens, error = None, _failure_reason(exc)
        batch_sizes.append(int(pixels.shape[0]))
        offset = 0
        for o, count in zip(ok, counts, strict=True):
            if tokens is None:
                state.stage_failure(o, error or "encoder failed")
                continue
            array = tokens[offset : offset + count]
            offset += count
            if not np.isfinite(array).all():
                state.stage_failure(o, "non-finite values in the encoder output")
                continue
            state.stage_tokens(o, array, results[o][2])  # OSError (disk full) stops the task
            encoded += count
    for o in group:
        results.pop(o, None)
        state.video_done(o)
    state.set_inflight(sorted(prefetched)) if prefetched else state.clear_inflight()
    return encoded


@dataclass(frozen=True)
class TextJob:
    store: str
    lo: int
    hi: int
    model: str
    pretrained: str | None
    device: str
    threads: int | None = None
    run: str = ""
    precision: str = "fp32"


def process_texts(job: TextJob) -> dict:
    """Encode the texts of rows [lo, hi) from their cached token ids (one chunk, one writer)."""
    import torch

    from muse_pipeline.cache.store import FeatureCache

    _set_threads(job.threads)
    cache = FeatureCache.open(job.store, mode="r+")
    ids = cache.read_text_tokens(np.arange(job.lo, job.hi))
    encoder = _encoder(job.model, job.pretrained, _worker_device(job.device), job.precision)
    out = []
    for start in range(0, len(ids), TEXT_BATCH):
        with torch.inference_mode():
            emb = encoder.encode_texts(ids[start : start + TEXT_BATCH])
        out.append(emb.to(torch.float16).cpu().numpy())
    embeddings = np.concatenate(out) if out else np.zeros((0, cache.dim), np.float16)
    from muse_pipeline.cache.lock import read_owner

    if job.run and (read_owner(job.store) or {}).get("run") != job.run:
        raise Superseded(f"{job.store}: another run now holds the store's lock; this task stops")
    cache.write_texts(job.lo, embeddings=embeddings)
    return {"lo": job.lo, "hi": job.hi}


# --------------------------------------------------------------------------------------------------
# Client side.


def fingerprint(cfg: ExtractConfig, index: DatasetIndex, encoder_info: dict) -> dict:
    """What must match for an existing store to be continued rather than refused."""
    return {
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


def default_workers(device: str) -> int:
    """CPU: up to 8 workers of 2 threads; CUDA: one worker per GPU."""
    if device.startswith("cuda"):
        import torch

        return 1 if ":" in device else max(torch.cuda.device_count(), 1)
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 8))


def _shard_jobs(cfg: ExtractConfig, index: DatasetIndex, cache, staging: Path, threads: int | None,
                run: str, decode_workers: int) -> list[ShardJob]:
    done = cache.read_done()
    jobs = []
    for shard in range(cache.n_shards):
        lo, hi = cache.shard_range(shard)
        if (done[lo:hi] != 0).all():
            continue
        videos = index.videos[lo:hi]
        jobs.append(ShardJob(
            store=str(cache.path), staging=str(staging), shard=shard, lo=lo, hi=hi,
            paths=tuple(str(v.path) for v in videos), windows=tuple((v.start, v.end) for v in videos),
            ids=tuple(v.id for v in videos), model=cfg.model, pretrained=cfg.pretrained,
            device=cfg.device, decoder=cfg.decoder, frames=cfg.max_frames, threads=threads, run=run,
            precision=cfg.resolved_precision, videos_per_batch=cfg.videos_per_batch,
            decode_workers=decode_workers,
        ))
    return jobs


def _text_jobs(cfg: ExtractConfig, cache, threads: int | None, run: str) -> list[TextJob]:
    done = cache.read_text_done()
    jobs = []
    for lo in range(0, cache.n_texts, TEXT_CHUNK):
        hi = min(lo + TEXT_CHUNK, cache.n_texts)
        if not done[lo:hi].all():
            jobs.append(TextJob(str(cache.path), lo, hi, cfg.model, cfg.pretrained, cfg.device, threads,
                                run, cfg.resolved_precision))
    return jobs


def _merge_staged(cache, staging: Path) -> None:
    """Move the ledgers (failures, warnings) of written shards into the store; drop their staging."""
    if not staging.exists():
        return
    done = cache.read_done()
    known = {json.dumps(f, sort_keys=True) for f in cache.failures}
    failures, warnings = [], []
    for folder in sorted(staging.glob("shard-*")):
        shard = int(folder.name.split("-")[1])
        lo, hi = cache.shard_range(shard)
        record = folder / "ledger.json"
        if not record.exists() or (done[lo:hi] == 0).any():
            continue
        ledger = json.loads(record.read_text())
        failures.extend(f for f in ledger["failures"] if json.dumps(f, sort_keys=True) not in known)
        warnings.extend(ledger["warnings"])
        shutil.rmtree(folder)
    if failures:
        cache.add_failures(failures)
    if warnings:
        cache.add_warnings(warnings)


def _retry_failed(cfg: ExtractConfig, index: DatasetIndex, cache, staging: Path) -> int:
    """Set failed videos back to pending when their file changed since it failed (size or mtime),
    or all of them with --retry-failed. Their ledger records move to `failure_history`."""
    done = cache.read_done()
    records = {f["id"]: f for f in cache.failures}
    retry = []
    for i in np.flatnonzero(done == 2):
        video = index.videos[int(i)]
        record = records.get(video.id, {})
        changed = "size" in record and (
            (record.get("size"), record.get("mtime_ns")) != tuple(_file_state(str(video.path)).values())
        )
        if cfg.retry_failed or changed:
            retry.append(int(i))
    if retry:
        cache.retire_failures(index.videos[i].id for i in retry)
        cache.mark_pending(retry)
    if cfg.retry_failed and staging.exists():  # failures staged by an unfinished shard, too
        for path in [*staging.glob("shard-*/*.fail"), *staging.glob("shard-*/crashes.json")]:
            path.unlink()
    return len(retry)


def open_store(cfg: ExtractConfig, index: DatasetIndex, encoder=None):
    """Create the store, or reopen it when its fingerprint matches (FingerprintMismatch otherwise)."""
    from muse_pipeline.cache.store import FeatureCache

    # The client needs the model's geometry and weights identity, and the tokenizer for the texts.
    # The same cached instance serves the in-process run (--workers 0) on the CPU: CLIP loads once.
    if encoder is None:
        encoder = _encoder(cfg.model, cfg.pretrained, "cpu")
    info = encoder.describe()
    path = cfg.store_path()
    staging = Path(str(path) + ".staging")
    if cfg.overwrite and staging.exists():
        shutil.rmtree(staging)
    # Token ids are written when the store is created; a resumed store already has them.
    fresh = cfg.overwrite or not path.exists()
    text_tokens = encoder.tokenize([c.text for c in index.captions], cfg.max_words) if fresh else None
    cache = FeatureCache.open_or_create(
        path, index, frames=cfg.max_frames, num_tokens=encoder.num_tokens, dim=encoder.dim,
        words=cfg.max_words, fingerprint=fingerprint(cfg, index, info),
        videos_per_shard=cfg.videos_per_shard, overwrite=cfg.overwrite, text_tokens=text_tokens,
    )
    return cache, staging


def _stored_batching(cfg: ExtractConfig) -> ExtractConfig:
    """Without an explicit --batch-frames, a resumed store keeps the grouping it was started with
    (the default depends on the card, and the groups decide the cached bits)."""
    if cfg.batch_frames is not None or cfg.overwrite:
        return cfg
    try:
        from muse_pipeline.cache.store import FeatureCache

        stored = FeatureCache.open(cfg.store_path()).fingerprint.get("videos_per_batch")
    except (OSError, ValueError, KeyError):
        return cfg
    if not stored:
        return cfg
    from dataclasses import replace

    return replace(cfg, batch_frames=int(stored) * cfg.max_frames)


def run_extract(cfg: ExtractConfig | None = None, **kwargs) -> ExtractSummary:
    """Run (or resume) an extraction. Keyword arguments are ExtractConfig fields.

    Order: validate every option and input, check the output folder, refuse if another run holds
    the store, load the dataset and CLIP; only then lock and create/open the store."""
    if cfg is None:
        cfg = ExtractConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either an ExtractConfig or keyword arguments, not both")
    from muse_pipeline.cache.lock import StoreLock, ensure_unlocked

    t0 = time.perf_counter()
    check_config(cfg)
    path = cfg.store_path()
    check_output(path)
    ensure_unlocked(path)
    cfg = _stored_batching(cfg)
    # absolute paths in the store, so that search thumbnails work from any directory
    index = load_dataset(cfg.dataset, Path(cfg.data_root).resolve(), cfg.splits)
    if not index.videos:
        raise InputError(f"no videos found for {cfg.dataset} under {cfg.data_root}; nothing to extract")
    encoder = _encoder(cfg.model, cfg.pretrained, "cpu")
    if cfg.max_words > encoder.context_length:
        raise InputError(f"--words must be <= {encoder.context_length} for {cfg.model}, got {cfg.max_words}")
    check_output(path, _needed_bytes(cfg, index, encoder.num_tokens, encoder.dim, path))
    try:
        with StoreLock(path) as lock:
            return _run_locked(cfg, index, encoder, lock.run, t0)
    except OSError as err:
        if err.errno in DISK_ERRNOS:
            raise OutputError(
                f"writing {path} failed ({err.strerror}); what was written is kept: free space or "
                "fix permissions, then run the same command again to resume"
            ) from err
        raise


def _run_locked(cfg: ExtractConfig, index: DatasetIndex, encoder, run: str, t0: float) -> ExtractSummary:
    cache, staging = open_store(cfg, index, encoder)
    _merge_staged(cache, staging)
    retried = _retry_failed(cfg, index, cache, staging)
    in_process = cfg.workers == 0 and cfg.scheduler is None
    n_local = None if in_process or cfg.scheduler else (cfg.workers or default_workers(cfg.device))
    # CPU cores shared out between the local workers; remote workers keep their own settings
    threads = max(1, (os.cpu_count() or 1) // n_local) if n_local and cfg.device == "cpu" else None
    decode_workers = cfg.decode_workers
    if decode_workers is None:
        decode_workers = default_decode_workers(cfg.device, n_local or 1)
    shard_jobs = _shard_jobs(cfg, index, cache, staging, threads, run, decode_workers)
    text_jobs = _text_jobs(cfg, cache, threads, run)
    done_before = _progress_count(cache, staging)

    from muse_pipeline.stages.progress import ExtractProgress

    progress = ExtractProgress(total=len(index.videos), completed=done_before, quiet=cfg.quiet)
    results: list[dict] = []
    with progress:
        if in_process:
            for job in text_jobs:
                process_texts(job)
            for job in shard_jobs:
                results.append(process_shard(job, on_video=progress.advance))
                _merge_staged(cache, staging)
        else:
            results = _run_on_dask(cfg, n_local, shard_jobs, text_jobs, progress, staging, cache,
                                   decode_workers)

    cache = type(cache).open(cache.path, mode="r+")
    _merge_staged(cache, staging)
    done = cache.read_done()
    if (done != 0).all() and cache.read_text_done().all() and staging.exists():
        shutil.rmtree(staging)
    return ExtractSummary(
        store=Path(cache.path), n_videos=len(done), n_cached=int((done == 1).sum()),
        n_failed=int((done == 2).sum()), n_texts=cache.n_texts,
        frames_encoded=sum(r["frames"] for r in results), seconds=time.perf_counter() - t0,
        failures=cache.failures, max_failures=cfg.max_failures, warnings=cache.warnings,
        retried=retried, batch_sizes=[b for r in results for b in r.get("batch_sizes", [])],
    )


def quiet_dask_logging(level: int = logging.ERROR) -> None:
    """distributed logs at INFO in the client and in every worker (nanny chatter, "killed by
    signal 9", dashboard address): keep only `level` and up. Workers read the same levels from the
    dask config, which LocalCluster hands to the processes it spawns."""
    import dask

    name = logging.getLevelName(level).lower()
    dask.config.set({"logging": {"distributed": name, "distributed.client": name,
                                 "distributed.nanny": name, "distributed.scheduler": name,
                                 "distributed.worker": name, "distributed.core": name,
                                 "bokeh": name, "tornado": "critical"}})
    for logger in ("distributed", "distributed.client", "distributed.nanny", "distributed.scheduler",
                   "distributed.worker", "distributed.core", "distributed.comm", "tornado", "bokeh"):
        logging.getLogger(logger).setLevel(max(level, logging.getLogger(logger).level))


def _run_on_dask(cfg, n_workers, shard_jobs, text_jobs, progress, staging, cache,
                 decode_workers: int) -> list[dict]:
    import dask
    from distributed import Client, LocalCluster

    level = logging.ERROR if cfg.quiet else logging.WARNING
    quiet_dask_logging(level)
    cluster = None
    gpu = cfg.device.startswith("cuda")
    resources = None
    with dask.config.set({"distributed.worker.daemon": decode_workers == 0}):
        if cfg.scheduler:
            client = Client(cfg.scheduler)
            workers = client.scheduler_info().get("workers", {}).values()
            if gpu and any("GPU" in (w.get("resources") or {}) for w in workers):
                resources = {"GPU": 1}
        else:
            # One task at a time per worker process: its torch thread pool (ShardJob.threads) uses the
            # cores; on CUDA one worker per GPU, holding the GPU as a dask resource.
            cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True,
                dashboard_address=":0" if cfg.dashboard else None, silence_logs=level,
                resources={"GPU": 1} if gpu else None,
                # the scheduler serves a few HTTP routes even without the dashboard, by default on
                # 8787: a random free port avoids "Port 8787 is already in use" warnings
                scheduler_kwargs={"dashboard_address": ":0"},
            )
            resources = {"GPU": 1} if gpu else None
            client = Client(cluster)
            if cfg.dashboard:
                log.warning("dask dashboard: %s", client.dashboard_link)
    results: list[dict] = []
    errors: list[str] = []
    try:
        # dask retries a task whose worker died; process_shard then counts the crash.
        futures = [client.submit(process_texts, job, pure=False, resources=resources) for job in text_jobs]
        futures += [client.submit(process_shard, job, pure=False, resources=resources) for job in shard_jobs]
        pending = set(futures)
        while pending:
            finished = {f for f in pending if f.done()}
            pending -= finished
            if not finished:
                time.sleep(0.25)
            for future in finished:
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001  (KilledWorker: the shard stays resumable)
                    errors.append(f"{future.key}: {type(exc).__name__}: {exc}")
                    log.error("task %s failed: %s", future.key, exc)
                    continue
                if "shard" in result:
                    results.append(result)
            if finished:
                _merge_staged(cache, staging)
            progress.update(_progress_count(cache, staging))
    finally:
        # closing on Ctrl-C / SIGTERM kills the workers: their in-flight records name this run,
        # which has ended, so the next run does not count them as crashes
        quiet_dask_logging(logging.CRITICAL)
        client.close()
        if cluster is not None:
            cluster.close()
    if errors:
        raise ExtractIncomplete(
            f"{len(errors)} task(s) failed; finished work is kept, run the same command again to "
            "resume. First: " + errors[0][:300]
        )
    return results


class ExtractIncomplete(UserError, RuntimeError):
    """Some shards could not be finished in this run; rerunning resumes them."""

    exit_code = 1


def _progress_count(cache, staging: Path) -> int:
    """Videos finished so far: flagged in the store, plus staged in shards not yet written."""
    done = cache.read_done()
    count = int((done != 0).sum())
    if staging.exists():
        for folder in staging.glob("shard-*"):
            lo, hi = cache.shard_range(int(folder.name.split("-")[1]))
            if (done[lo:hi] == 0).all():
                count += sum(1 for p in folder.iterdir() if p.suffix in (".npy", ".fail"))
    return count
