"""Extract stage: decode videos, run CLIP, cache every frame's tokens in a sharded Zarr store.

Work is split by shard: one task owns all videos of one shard of `videos/tokens` (and the matching
chunks of `videos/mask` and `videos/done`), so no two processes ever write the same file. Texts are
split the same way by chunk of `texts/embeddings`.

Resume and crash safety come from a staging folder beside the store (`<store>.staging/`):
- each finished video is staged as one small file (`<index>.npy` or `<index>.fail`), written
  atomically, so an interruption (Ctrl-C, SIGKILL, a lost worker) loses at most the video in flight;
- when all videos of a shard are staged, the task writes the shard in one go, then its done flags,
  then removes the shard's staged tokens, keeping `failures.json` until the client (the only writer
  of the root attributes) has merged it into the failure ledger;
- before decoding a video the task records it in `inflight.json`. A video that was in flight when a
  worker died twice is recorded as a failure instead of being tried a third time, so one video that
  crashes the decoder cannot stall the run.
Every video is encoded in its own forward pass, so the cached bits do not depend on which other
videos shared a batch: a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from muse_pipeline import __version__
from muse_pipeline.cache.store import ROW_CHUNK as TEXT_CHUNK  # one text task per texts/* chunk
from muse_pipeline.config import preset
from muse_pipeline.data import DatasetIndex, load_dataset
from muse_pipeline.errors import UserError

log = logging.getLogger(__name__)

# A video that was being decoded/encoded when its worker died this many times is given up on.
MAX_CRASHES_PER_VIDEO = 2
TEXT_BATCH = 256
SAMPLING = "fps=1;linspace(0,n-1,T);clip4clip"


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

    @property
    def max_frames(self) -> int:
        return self.frames or preset(self.dataset).frames

    @property
    def max_words(self) -> int:
        return self.words or preset(self.dataset).words

    def store_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        safe_model = self.model.replace("/", "-")
        return Path(self.cache_dir) / self.dataset / f"{safe_model}-{self.max_frames}f.zarr"


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

    @property
    def failure_rate(self) -> float:
        return self.n_failed / max(self.n_videos, 1)

    @property
    def ok(self) -> bool:
        return self.failure_rate <= self.max_failures


# --------------------------------------------------------------------------------------------------
# Worker side: one encoder per process, loaded on first use.

_ENCODERS: dict[tuple, object] = {}


def _encoder(model: str, pretrained: str | None, device: str):
    key = (model, pretrained, device)
    if key not in _ENCODERS:
        from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config

        register_tiny_config()
        _ENCODERS[key] = ClipEncoder(model, pretrained=pretrained, device=device)
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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


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


def _set_threads(threads: int | None) -> None:
    """dask's nanny pins OMP_NUM_THREADS=1 in every worker (its pre-spawn-environ), which would leave
    a CPU worker's encoder on one core; the client decides instead."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _decode_and_preprocess(job: ShardJob, offset: int, image_size: int, mean, std):
    from muse_pipeline.video.decode import decode_clip
    from muse_pipeline.video.transforms import preprocess_frames

    start, end = job.windows[offset]
    frames = decode_clip(job.paths[offset], job.frames, start=start, end=end, backend=job.decoder)
    return preprocess_frames(frames, image_size, mean, std)


def _iter_decoded(job: ShardJob, offsets: list[int], encoder) -> Iterator[tuple[int, object]]:
    """Yields (offset, pixels or exception) in order, decoding ahead on threads while the caller
    encodes: PyAV and decord release the GIL, so decode overlaps the encoder."""
    if not offsets:
        return
    ahead = 2
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        args = (encoder.image_size, encoder.mean, encoder.std)
        pending = [(o, pool.submit(_decode_and_preprocess, job, o, *args)) for o in offsets[:ahead]]
        next_i = ahead
        while pending:
            offset, future = pending.pop(0)
            if next_i < len(offsets):
                o = offsets[next_i]
                pending.append((o, pool.submit(_decode_and_preprocess, job, o, *args)))
                next_i += 1
            try:
                yield offset, future.result()
            except Exception as exc:  # noqa: BLE001  (a bad video must never stop the shard)
                yield offset, exc


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if name == "DecodeError":
        return text or "decode failed"
    return f"{name}: {text}"[:300]


def process_shard(job: ShardJob, on_video: Callable[[], None] | None = None) -> dict:
    """Extract every video of one shard that is not staged yet, then write the shard.

    Runs on a dask worker (or inline with --workers 0). Returns counts and this shard's failures.
    """
    import torch

    from muse_pipeline.cache.store import FeatureCache

    _set_threads(job.threads)
    staging = Path(job.staging) / f"shard-{job.shard:06d}"
    staging.mkdir(parents=True, exist_ok=True)
    inflight_path = staging / "inflight.json"
    crashes: dict[str, int] = json.loads(inflight_path.read_text()) if inflight_path.exists() else {}

    def staged(offset: int) -> bool:
        return (staging / f"{offset:06d}.npy").exists() or (staging / f"{offset:06d}.fail").exists()

    todo = [o for o in range(job.hi - job.lo) if not staged(o)]
    # A video in flight when a worker died MAX_CRASHES_PER_VIDEO times is a failure, not a retry.
    for o in list(todo):
        if crashes.get(str(o), 0) >= MAX_CRASHES_PER_VIDEO:
            reason = f"worker crashed {crashes[str(o)]} times while processing this video"
            _atomic_write_bytes(staging / f"{o:06d}.fail", reason.encode())
            todo.remove(o)

    frames_encoded = 0
    if todo:
        encoder = _encoder(job.model, job.pretrained, _worker_device(job.device))
        for offset, pixels in _iter_decoded(job, todo, encoder):
            crashes[str(offset)] = crashes.get(str(offset), 0) + 1
            _atomic_write_bytes(inflight_path, json.dumps(crashes).encode())
            if isinstance(pixels, BaseException):
                _atomic_write_bytes(staging / f"{offset:06d}.fail", _failure_reason(pixels).encode())
            else:
                try:
                    with torch.inference_mode():
                        tokens = encoder.encode_frames(pixels)
                    array = tokens.to(torch.float16).cpu().numpy()
                    if not np.isfinite(array).all():
                        raise ValueError("non-finite values in the encoder output")
                    _atomic_save_npy(staging / f"{offset:06d}.npy", array)
                    frames_encoded += array.shape[0]
                except Exception as exc:  # noqa: BLE001
                    _atomic_write_bytes(staging / f"{offset:06d}.fail", _failure_reason(exc).encode())
            crashes.pop(str(offset), None)
            _atomic_write_bytes(inflight_path, json.dumps(crashes).encode())
            if on_video is not None:
                on_video()

    # Every video of the shard is staged: write the shard once, then the done flags.
    cache = FeatureCache.open(job.store, mode="r+")
    n = job.hi - job.lo
    tokens = np.zeros((n, job.frames, cache.num_tokens, cache.dim), dtype=np.float16)
    mask = np.zeros((n, job.frames), dtype=np.uint8)
    done = np.zeros((n,), dtype=np.uint8)
    failures = []
    for o in range(n):
        npy = staging / f"{o:06d}.npy"
        if npy.exists():
            video_tokens = np.load(npy)
            tokens[o, : video_tokens.shape[0]] = video_tokens
            mask[o, : video_tokens.shape[0]] = 1
            done[o] = 1
        else:
            reason = (staging / f"{o:06d}.fail").read_text()
            failures.append({"id": job.ids[o], "reason": reason})
            done[o] = 2
    cache.write_shard_videos(job.lo, tokens, mask, done)
    _atomic_write_bytes(staging / "failures.json", json.dumps(failures).encode())
    for path in staging.glob("*.npy"):
        path.unlink()
    return {"shard": job.shard, "frames": frames_encoded, "cached": int((done == 1).sum()),
            "failures": failures}


@dataclass(frozen=True)
class TextJob:
    store: str
    lo: int
    hi: int
    model: str
    pretrained: str | None
    device: str
    threads: int | None = None


def process_texts(job: TextJob) -> dict:
    """Encode the texts of rows [lo, hi) from their cached token ids (one chunk, one writer)."""
    import torch

    from muse_pipeline.cache.store import FeatureCache

    _set_threads(job.threads)
    cache = FeatureCache.open(job.store, mode="r+")
    ids = cache.read_text_tokens(np.arange(job.lo, job.hi))
    encoder = _encoder(job.model, job.pretrained, _worker_device(job.device))
    out = []
    for start in range(0, len(ids), TEXT_BATCH):
        with torch.inference_mode():
            emb = encoder.encode_texts(ids[start : start + TEXT_BATCH])
        out.append(emb.to(torch.float16).cpu().numpy())
    embeddings = np.concatenate(out) if out else np.zeros((0, cache.dim), np.float16)
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
        "annotation_checksum": index.annotation_checksum,
        "n_videos": len(index.videos),
        "n_texts": len(index.captions),
        "code_version": __version__,
        "encoder": encoder_info,
    }


def default_workers(device: str) -> int:
    """CPU: up to 8 workers of 2 threads; CUDA: one worker per GPU."""
    if device == "cuda":
        import torch

        return max(torch.cuda.device_count(), 1)
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 8))


def _shard_jobs(cfg: ExtractConfig, index: DatasetIndex, cache, staging: Path,
                threads: int | None) -> list[ShardJob]:
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
            device=cfg.device, decoder=cfg.decoder, frames=cfg.max_frames, threads=threads,
        ))
    return jobs


def _text_jobs(cfg: ExtractConfig, cache, threads: int | None) -> list[TextJob]:
    done = cache.read_text_done()
    jobs = []
    for lo in range(0, cache.n_texts, TEXT_CHUNK):
        hi = min(lo + TEXT_CHUNK, cache.n_texts)
        if not done[lo:hi].all():
            jobs.append(TextJob(str(cache.path), lo, hi, cfg.model, cfg.pretrained, cfg.device, threads))
    return jobs


def _merge_staged_failures(cache, staging: Path) -> None:
    """Move failure records of finished shards into the ledger; then drop their staging folders."""
    if not staging.exists():
        return
    done = cache.read_done()
    known = {f["id"] for f in cache.failures}
    new = []
    for folder in sorted(staging.glob("shard-*")):
        shard = int(folder.name.split("-")[1])
        lo, hi = cache.shard_range(shard)
        record = folder / "failures.json"
        if not record.exists() or (done[lo:hi] == 0).any():
            continue
        new.extend(f for f in json.loads(record.read_text()) if f["id"] not in known)
        shutil.rmtree(folder)
    if new:
        cache.add_failures(new)


def open_store(cfg: ExtractConfig, index: DatasetIndex):
    """Create the store, or reopen it when its fingerprint matches (FingerprintMismatch otherwise)."""
    from muse_pipeline.cache.store import FeatureCache
    # The client needs the model's geometry and weights identity, and the tokenizer for the texts.
    # The same cached instance serves the in-process run (--workers 0): CLIP is loaded once.
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


def run_extract(cfg: ExtractConfig | None = None, **kwargs) -> ExtractSummary:
    """Run (or resume) an extraction. Keyword arguments are ExtractConfig fields."""
    if cfg is None:
        cfg = ExtractConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either an ExtractConfig or keyword arguments, not both")
    t0 = time.perf_counter()
    # absolute paths in the store, so that search thumbnails work from any directory
    index = load_dataset(cfg.dataset, Path(cfg.data_root).resolve(), cfg.splits)
    cache, staging = open_store(cfg, index)
    _merge_staged_failures(cache, staging)
    in_process = cfg.workers == 0 and cfg.scheduler is None
    n_local = None if in_process or cfg.scheduler else (cfg.workers or default_workers(cfg.device))
    # CPU cores shared out between the local workers; remote workers keep their own settings
    threads = max(1, (os.cpu_count() or 1) // n_local) if n_local and cfg.device == "cpu" else None
    shard_jobs = _shard_jobs(cfg, index, cache, staging, threads)
    text_jobs = _text_jobs(cfg, cache, threads)
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
                _merge_staged_failures(cache, staging)
        else:
            results = _run_on_dask(cfg, n_local, shard_jobs, text_jobs, progress, staging, cache)

    cache = type(cache).open(cache.path, mode="r+")
    _merge_staged_failures(cache, staging)
    done = cache.read_done()
    if (done != 0).all() and cache.read_text_done().all() and staging.exists():
        shutil.rmtree(staging)
    failures = cache.failures
    return ExtractSummary(
        store=Path(cache.path), n_videos=len(done), n_cached=int((done == 1).sum()),
        n_failed=int((done == 2).sum()), n_texts=cache.n_texts,
        frames_encoded=sum(r["frames"] for r in results), seconds=time.perf_counter() - t0,
        failures=failures, max_failures=cfg.max_failures,
    )


def _run_on_dask(cfg, n_workers, shard_jobs, text_jobs, progress, staging, cache) -> list[dict]:
    from distributed import Client, LocalCluster

    cluster = None
    if cfg.scheduler:
        client = Client(cfg.scheduler)
    else:
        # One task at a time per worker process: its torch thread pool (ShardJob.threads) uses the cores.
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
        )
        client = Client(cluster)
    results: list[dict] = []
    errors: list[str] = []
    try:
        # dask retries a task whose worker died; process_shard then skips a video that crashed twice.
        futures = [client.submit(process_texts, job, pure=False) for job in text_jobs]
        futures += [client.submit(process_shard, job, pure=False) for job in shard_jobs]
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
                _merge_staged_failures(cache, staging)
            progress.update(_progress_count(cache, staging))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if errors:
        raise ExtractIncomplete(
            f"{len(errors)} task(s) failed; finished work is kept, run the same command again to "
            "resume:\n  " + "\n  ".join(errors[:10])
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
