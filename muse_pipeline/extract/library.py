"""A library that grows: what a re-run of `muse extract --dataset folder` must add, redo and retire.

The folder dataset's store follows its folder. Each run compares the store's active rows (done !=
RETIRED) with the files found now, per file (`source`):

- new: a file with no active row -> its rows (windows per `extract/windows.py`) are appended;
- changed: a file whose rows were planned from another (size, mtime_ns) -> those rows are retired,
  rows for the file as it is now appended (unless a run interrupted after the append made them);
- removed: a file no longer found -> its rows are retired;
- unchanged: every active row has the file's current state -> untouched (same bits, not decoded).

Only new and changed files are probed. Rows are appended as one generation at a shard boundary
(`cache/growth.py`), so no shard of tokens is rewritten. Each step writes what planning the same
update again would write, so an update interrupted at any point is finished by running the same
command: rows appended but not extracted are pending (extraction resumes them), old rows not yet
retired are retired then. Captions: the captions file is part of the fingerprint (a changed
captions file is refused as for annotated datasets); a changed captioned file's captions follow
its new rows (`text_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from muse_pipeline.cache.schema import RETIRED, RowFacts
from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.data.base import DatasetIndex
from muse_pipeline.extract.rows import file_key, planned_rows, probe_files
from muse_pipeline.extract.windows import WindowSpec


@dataclass
class LibraryUpdate:
    """The rows to append (`rows`, `facts`), the store rows to `retire`, and the file counts."""

    rows: DatasetIndex
    facts: RowFacts
    retire: np.ndarray
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changes_anything(self) -> bool:
        return bool(len(self.rows.videos) or self.retire.size)

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "changed": len(self.changed), "removed": len(self.removed),
                "unchanged": len(self.unchanged)}

    def describe(self) -> str:
        """'3 new, 1 changed, 1 removed, 11 unchanged' (files)."""
        return ", ".join(f"{n} {word}" for word, n in self.counts().items())


def _subset(index: DatasetIndex, keep: set[str]) -> DatasetIndex:
    """The videos of `index` whose file is in `keep` (captions dropped: the store keeps its texts)."""
    videos = tuple(v for v in index.videos if v.source_id in keep)
    return DatasetIndex(index.name, index.root, videos, (), index.annotation_checksum, index.extra)


def plan_update(cache: FeatureCache, index: DatasetIndex, spec: WindowSpec) -> LibraryUpdate:
    """Compare the store's active rows with the files of `index` (the folder as loaded now)."""
    rows = np.arange(cache.n_videos)
    done = cache.read_done()
    sources = cache.read_sources(rows)
    states = cache.read_file_states(rows)
    paths = cache.video_paths
    found: dict[str, tuple[int, int]] = {}
    found_path: dict[str, str] = {}
    for video in index.videos:
        if video.source_id not in found:
            found[video.source_id] = file_key(str(video.path))
            found_path[video.source_id] = str(video.path)
    stored: dict[str, list[int]] = {}
    for row in np.flatnonzero(done != RETIRED):
        stored.setdefault(sources[row], []).append(int(row))

    retire: list[int] = []
    update_sources: set[str] = set()
    new, changed, removed, unchanged = [], [], [], []
    for source, source_rows in stored.items():
        if source not in found:
            removed.append(source)
            retire.extend(source_rows)
            continue
        now = found[source]
        current = [r for r in source_rows if tuple(states[r]) == now and paths[r] == found_path[source]]
        stale = sorted(set(source_rows) - set(current))
        retire.extend(stale)
        (changed if stale else unchanged).append(source)
        if not current:
            update_sources.add(source)
    for source in found:
        if source not in stored:
            new.append(source)
            update_sources.add(source)
    subset = _subset(index, update_sources)
    durations = probe_files(subset) if spec.enabled else None
    append, facts = planned_rows(subset, spec, durations)
    return LibraryUpdate(append, facts, np.array(sorted(retire), dtype=np.int64), sorted(new), sorted(changed),
                         sorted(removed), sorted(unchanged))


def text_rows(cache: FeatureCache, index: DatasetIndex) -> np.ndarray:
    """int32 [M]: the active store row of each caption's clip (by id). Every caption has one after
    an update (the folder loader refuses a caption naming a file it did not find, and captioned
    clips are never cut into windows): a KeyError here is a bug, not a user's mistake."""
    done = cache.read_done()
    active = {cache.video_ids[r]: r for r in np.flatnonzero(done != RETIRED)}
    return np.array([active[index.videos[c.video_index].id] for c in index.captions], dtype=np.int32)
