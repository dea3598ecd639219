"""One writer per feature cache: an exclusive lock file beside the store (`<store>.lock`).

The lock is an `flock` on that file, held by the extracting client for the whole run. The kernel
drops it when the process ends, however it ends (exit, Ctrl-C, SIGKILL), so a lock file left by a
dead process is simply taken over by the next run: no pid guessing, no race between two runs that
both find a stale file. The file's content (pid, host, run id, start time) is informative: it names
the holder in the refusal message, and lets workers check that their run still owns the store.
flock works on local disks and on NFSv4; on file systems without locks the refusal is not guaranteed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from muse_pipeline.errors import UserError


class StoreLocked(UserError):
    """Another process is writing this store."""

    exit_code = 3


def lock_path(store: Path | str) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".lock")


def read_owner(store: Path | str) -> dict | None:
    """The holder recorded in the lock file (None when there is none or it is unreadable)."""
    return _read(lock_path(store))


def _held_message(path: Path, owner: dict) -> str:
    return (
        f"{path.with_suffix('')} is being written by another `muse extract` (pid "
        f"{owner.get('pid', '?')} on host {owner.get('host', '?')}, since {owner.get('started', '?')}); "
        "wait for it to finish or stop it first"
    )


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StoreLock:
    """`with StoreLock(store) as lock:` holds the store's lock; `lock.run` names this run."""

    def __init__(self, store: Path | str) -> None:
        self.path = lock_path(store)
        self.run = uuid.uuid4().hex
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreLocked(_held_message(self.path, _read(self.path) or {})) from None
            # The file may have been unlinked by its previous holder between our open and flock:
            # then we hold a lock on a file nobody else can see. Retry on the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run": self.run,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock: see the inode check in acquire
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def ensure_unlocked(store: Path | str) -> None:
    """Raise StoreLocked now if another process holds the store's lock (creates nothing: a quick
    check before the slow setup; `StoreLock.acquire` takes the lock for real)."""
    path = lock_path(store)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read(path) or {}
        raise StoreLocked(_held_message(path, owner)) from None
    finally:
        os.close(fd)
