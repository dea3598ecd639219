"""The staging folder beside a store (`<store>.staging/`): resume and crash safety of extraction.

Layout, one folder per shard being worked on (`shard-NNNNNN/`, offsets within the shard):
- `<offset>.npy` float16 tokens [n, L, D] of a finished video (`<offset>.warn` beside it: the
  decoder's warnings, a JSON list), or `<offset>.fail` (JSON {reason, size, mtime_ns}); each
  written atomically, the `.npy` last, so an interruption loses at most the group in flight;
- `inflight.json` {run, pid, offsets}: the videos being decoded/encoded. A later task of the SAME
  run that finds it knows a worker process died on them (a crash); a record of an earlier run only
  means that run was interrupted (Ctrl-C, SIGTERM, a killed client), which never counts;
- `crashes.json` {offset: count}. After a crash the shard continues one video at a time, so the
  next crash names the culprit; a video in flight at MAX_CRASHES_PER_VIDEO crashes is failed;
- `ledger.json` {failures, warnings}: left when the shard is written (tokens, then done flags, then
  the staged tokens removed) until the client, the only writer of the store's root attributes,
  merges it into the store's ledger (`merge_staged_ledgers`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from muse_pipeline.atomic import atomic_save_npy, atomic_write_text, read_json

if TYPE_CHECKING:
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.extract.jobs import ShardJob

# A video that was being decoded/encoded when its worker died this many times is given up on.
MAX_CRASHES_PER_VIDEO = 2


def file_state(path: str) -> dict:
    """Size and mtime of a video file: a failed video is retried when they change."""
    try:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"size": None, "mtime_ns": None}


class ShardStaging:
    """One shard's staging folder: staged videos, the in-flight record and crash counts.

    Opening it counts a crash for every video that a dead worker of the same run left in flight."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.dir = Path(job.staging) / f"shard-{job.shard:06d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.inflight_path = self.dir / "inflight.json"
        self.crashes_path = self.dir / "crashes.json"
        self.crashes: dict[str, int] = read_json(self.crashes_path, {})
        record = read_json(self.inflight_path, None)
        if record and record.get("run") == job.run and record.get("pid") != os.getpid():
            # A worker of this very run died with these videos in flight: a crash.
            for offset in record.get("offsets", []):
                self.crashes[str(offset)] = self.crashes.get(str(offset), 0) + 1
            atomic_write_text(self.crashes_path, json.dumps(self.crashes))
        # A record of another run: that run was interrupted, which is not a crash. Forget it.
        self.inflight_path.unlink(missing_ok=True)

    def npy(self, offset: int) -> Path:
        return self.dir / f"{offset:06d}.npy"

    def fail(self, offset: int) -> Path:
        return self.dir / f"{offset:06d}.fail"

    def warn(self, offset: int) -> Path:
        return self.dir / f"{offset:06d}.warn"

    def staged(self, offset: int) -> bool:
        return self.npy(offset).exists() or self.fail(offset).exists()

    def set_inflight(self, offsets: list[int]) -> None:
        record = {"run": self.job.run, "pid": os.getpid(), "offsets": offsets}
        atomic_write_text(self.inflight_path, json.dumps(record))

    def clear_inflight(self) -> None:
        self.inflight_path.unlink(missing_ok=True)

    def stage_failure(self, offset: int, reason: str) -> None:
        record = {"reason": reason, **file_state(self.job.paths[offset])}
        atomic_write_text(self.fail(offset), json.dumps(record))

    def stage_tokens(self, offset: int, array: np.ndarray, warnings: tuple[str, ...] | list[str]) -> None:
        if warnings:
            atomic_write_text(self.warn(offset), json.dumps(list(warnings)))
        atomic_save_npy(self.npy(offset), array)  # last: the .npy makes the video staged

    def video_done(self, offset: int) -> None:
        if self.crashes.pop(str(offset), None) is not None:
            atomic_write_text(self.crashes_path, json.dumps(self.crashes))

    def fail_repeat_crashers(self, done_before: np.ndarray) -> None:
        """Stage as failed each pending, unstaged video that was in flight at MAX_CRASHES_PER_VIDEO
        crashes of its worker."""
        for offset in range(len(done_before)):
            count = self.crashes.get(str(offset), 0)
            if count >= MAX_CRASHES_PER_VIDEO and done_before[offset] == 0 and not self.staged(offset):
                self.stage_failure(offset, f"worker process died {count} times while processing this video")
                self.video_done(offset)

    def write_shard(self, cache: FeatureCache, done_before: np.ndarray) -> tuple[np.ndarray, list, list]:
        """Every pending video of the shard is staged: write its tokens, mask and done flags to the
        store in one go, leave `ledger.json`, remove the staged tokens. Returns (done flags of the
        shard, failures, warnings)."""
        job = self.job
        n = job.hi - job.lo
        if (done_before != 0).any():  # a retry: keep the cached rows as stored
            tokens, mask = cache.read_videos(np.arange(job.lo, job.hi))
            tokens, mask = np.array(tokens), np.array(mask)
        else:
            tokens = np.zeros((n, job.frames, cache.num_tokens, cache.dim), dtype=np.float16)
            mask = np.zeros((n, job.frames), dtype=np.uint8)
        done = done_before.copy()
        failures, warnings = [], []
        for offset in range(n):
            if done_before[offset] != 0:
                continue
            npy = self.npy(offset)
            if npy.exists():
                video_tokens = np.load(npy)
                tokens[offset] = 0
                mask[offset] = 0
                tokens[offset, : video_tokens.shape[0]] = video_tokens
                mask[offset, : video_tokens.shape[0]] = 1
                done[offset] = 1
                if self.warn(offset).exists():
                    warning = "; ".join(read_json(self.warn(offset), []))
                    warnings.append({"id": job.ids[offset], "warning": warning})
            else:
                record = read_json(self.fail(offset), None)
                if not isinstance(record, dict):  # a .fail of an older version: the reason as text
                    record = {"reason": self.fail(offset).read_text()}
                failures.append({"id": job.ids[offset], **record})
                done[offset] = 2
        cache.write_shard_videos(job.lo, tokens, mask, done)
        atomic_write_text(self.dir / "ledger.json", json.dumps({"failures": failures, "warnings": warnings}))
        for path in [*self.dir.glob("*.npy"), *self.dir.glob("*.warn")]:
            path.unlink()
        return done, failures, warnings


def _shard_folders(staging: Path) -> list[tuple[int, Path]]:
    return [(int(folder.name.split("-")[1]), folder) for folder in sorted(staging.glob("shard-*"))]


def merge_staged_ledgers(cache: FeatureCache, staging: Path) -> None:
    """Move the ledgers (failures, warnings) of written shards into the store; drop their staging."""
    if not staging.exists():
        return
    done = cache.read_done()
    known = {json.dumps(f, sort_keys=True) for f in cache.failures}
    failures, warnings = [], []
    for shard, folder in _shard_folders(staging):
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


def retry_failed_videos(cache: FeatureCache, staging: Path, retry_all: bool) -> int:
    """Set failed videos back to pending when their file changed since it failed (size or mtime),
    or all of them with `retry_all` (--retry-failed). Their ledger records move to
    `failure_history`. Returns how many were set back."""
    done = cache.read_done()
    ids, paths = cache.video_ids, cache.video_paths
    records = {f["id"]: f for f in cache.failures}
    retry = []
    for i in np.flatnonzero(done == 2):
        record = records.get(ids[i], {})
        changed = "size" in record and (
            (record.get("size"), record.get("mtime_ns")) != tuple(file_state(str(paths[i])).values())
        )
        if retry_all or changed:
            retry.append(int(i))
    if retry:
        cache.retire_failures(ids[i] for i in retry)
        cache.mark_pending(retry)
    if retry_all and staging.exists():  # failures staged by an unfinished shard, too
        for path in [*staging.glob("shard-*/*.fail"), *staging.glob("shard-*/crashes.json")]:
            path.unlink()
    return len(retry)


def count_finished(cache: FeatureCache, staging: Path) -> int:
    """Videos finished so far: flagged in the store, plus staged in shards not yet written."""
    done = cache.read_done()
    count = int(((done == 1) | (done == 2)).sum())  # retired rows are no work of this library
    if staging.exists():
        for shard, folder in _shard_folders(staging):
            lo, hi = cache.shard_range(shard)
            if (done[lo:hi] == 0).all():
                count += sum(1 for p in folder.iterdir() if p.suffix in (".npy", ".fail"))
    return count
