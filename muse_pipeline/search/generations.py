"""An index root and its generations: how `muse index` publishes and how readers find the current one.

```
ROOT/
  CURRENT          one line: the current generation's folder name (replaced atomically, os.replace)
  gen-000001/      an index generation folder (`index_format`); never modified once CURRENT named it
  gen-000002/
```

Publishing writes the whole new folder first (under a temporary name, renamed), then replaces
CURRENT, so a reader sees the old generation or the new one, never half of one. Old generations are
removed only when two newer ones exist: a server that read CURRENT just before the switch may still
be loading the previous one. An index written before generations existed (index.json directly in
ROOT) is generation "0"; its files are removed like an old generation once two generations exist.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from muse_pipeline.atomic import atomic_write_text
from muse_pipeline.search.index_format import REBUILD, IndexFormatError, VideoIndex

CURRENT = "CURRENT"
LEGACY = "0"
_GEN = re.compile(r"gen-(\d{6,})")
# The files of a generation-0 (flat) index, removed once it is two generations old.
_LEGACY_FILES = ("index.json", "embeddings.npy", "windows.npy", "durations.npy", "cache_rows.npy",
                 "text_adapter.safetensors", "ann.faiss")
_LEGACY_COLUMNS = ("ids", "sources", "paths", "relpaths", "captions")


def generation_name(number: int) -> str:
    return f"gen-{number:06d}"


def generation_number(name: str) -> int:
    """gen-000012 -> 12; the legacy generation "0" -> 0."""
    match = _GEN.fullmatch(name)
    return int(match.group(1)) if match else 0


def is_index_root(root: Path) -> bool:
    """Whether `root` holds an index (a CURRENT pointer or a legacy flat index.json)."""
    return (root / CURRENT).is_file() or (root / "index.json").is_file()


def current_generation(root: Path | str) -> str:
    """The current generation's name (cheap: reads CURRENT), or "0" for a legacy flat index.

    A root without either is an IndexFormatError (no index there); a CURRENT that names no folder of
    this root is one too (a damaged root)."""
    root = Path(root)
    pointer = root / CURRENT
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if (root / "index.json").is_file() or (root / "zarr.json").is_file():
            return LEGACY
        raise IndexFormatError(f"index {root} does not exist or is not a muse index "
                               "(no CURRENT or index.json); build it with `muse index`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"index file {pointer} cannot be read ({exc}); {REBUILD}") from None
    if not _GEN.fullmatch(name):
        raise IndexFormatError(f"index file {pointer} does not name a generation (holds {name[:40]!r}); {REBUILD}")
    return name


def generation_folder(root: Path | str, name: str) -> Path:
    root = Path(root)
    return root if name == LEGACY else root / name


def open_index(root: Path | str) -> VideoIndex:
    """The current generation of the index at `root`, read into memory (`VideoIndex`)."""
    root = Path(root)
    name = current_generation(root)
    folder = generation_folder(root, name)
    if name != LEGACY and not folder.is_dir():
        raise IndexFormatError(f"index file {root / CURRENT} names {name}, which does not exist; {REBUILD}")
    return VideoIndex(folder, generation=name)


def generations(root: Path | str) -> list[str]:
    """The generation folders present in `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _GEN.fullmatch(p.name)), key=generation_number)


def publish(root: Path | str, write: Callable[[Path], object]) -> str:
    """Write a new generation of `root` with `write(folder)` (which must create `folder`), make it
    current, prune; returns its name. Numbers only grow (after the newest folder present); a damaged
    CURRENT is replaced (callers refuse a damaged index unless told to overwrite it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    present = generations(root)
    try:
        current = current_generation(root) if is_index_root(root) else None
    except IndexFormatError:  # a damaged CURRENT (the caller chose to replace it): the folders decide
        current = None
    newest = max([generation_number(n) for n in present] + [generation_number(current or LEGACY)])
    name = generation_name(newest + 1)
    write(root / name)
    atomic_write_text(root / CURRENT, name + "\n")
    prune(root)
    return name


def prune(root: Path | str, keep: int = 2) -> list[str]:
    """Remove the generations that have `keep` newer ones (CURRENT's is never removed); returns them."""
    root = Path(root)
    current = generation_number(current_generation(root))
    names = [n for n in generations(root) if generation_number(n) <= current]
    removed = []
    for name in names[: max(0, len(names) - keep)]:  # each has at least `keep` newer ones
        shutil.rmtree(root / name, ignore_errors=True)
        removed.append(name)
    if (root / "index.json").is_file() and len(names) >= keep:
        for fname in _LEGACY_FILES:
            (root / fname).unlink(missing_ok=True)
        for col in _LEGACY_COLUMNS:
            for suffix in (".bin", ".off.npy"):
                (root / f"{col}{suffix}").unlink(missing_ok=True)
        removed.append(LEGACY)
    for stray in root.glob(".gen-*.tmp-*"):  # a crashed publish's partial folder
        if not _pid_alive(stray.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stray, ignore_errors=True)
    return removed


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
