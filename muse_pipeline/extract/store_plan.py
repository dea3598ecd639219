"""What a run does to its store before extracting, planned read-only, then applied under the lock.

`plan_store` decides, without writing anything, whether the run creates the store (its rows: long
folder files cut into windows), resumes it, or brings a folder library's store up to its folder
(`library.plan_update`); it checks the disk space for what the plan will write. The CLI's checks
all run before the first write, the lock included. `apply_store_plan` (under the lock) creates,
reopens or updates the store; a store that changed between planning and locking is planned again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.cache.compat import check_growing_fingerprint
from muse_pipeline.cache.fingerprint import build_fingerprint
from muse_pipeline.cache.schema import RETIRED, RowFacts, is_cache_dir
from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.data.base import DatasetIndex
from muse_pipeline.extract.config import ExtractConfig, check_output, needed_bytes
from muse_pipeline.extract.encoders import ENCODER_CACHE
from muse_pipeline.extract.library import LibraryUpdate, plan_update, text_rows
from muse_pipeline.extract.rows import planned_rows, probe_files


@dataclass
class StorePlan:
    """`rows` + `facts` to create (or resume) a store, or the `update` of a growing library; the
    store's `fingerprint` and its `state` when planned (see `store_state`)."""

    fingerprint: dict[str, Any]
    state: tuple
    rows: DatasetIndex | None = None
    facts: RowFacts | None = None
    update: LibraryUpdate | None = None


def store_state(path: Path) -> tuple:
    """What planning depends on: whether a store exists, its rows and its generations."""
    if not is_cache_dir(path):
        return (path.exists(),)
    cache = FeatureCache.open(path)
    return True, cache.n_videos, len(cache.generations), int((cache.read_done() == RETIRED).sum())


def _growing(cfg: ExtractConfig, path: Path) -> FeatureCache | None:
    """The existing store of a folder library (None: create or resume as for any dataset)."""
    if cfg.dataset != "folder" or cfg.overwrite or not is_cache_dir(path):
        return None
    cache = FeatureCache.open(path)
    return cache if cache.has_row_facts else None  # a store made before libraries could grow: as before


def plan_store(cfg: ExtractConfig, index: DatasetIndex, encoder) -> StorePlan:
    """Plan the store for `index` (read-only; InputError when the disk cannot take it)."""
    path = cfg.store_path()
    fingerprint = build_fingerprint(cfg, index, encoder.describe())
    state = store_state(path)
    cache = _growing(cfg, path)
    if cache is None:
        durations = probe_files(index) if cfg.window_spec.enabled else None
        rows, facts = planned_rows(index, cfg.window_spec, durations)
        check_output(path, needed_bytes(cfg, rows, encoder.num_tokens, encoder.dim, path))
        return StorePlan(fingerprint, state, rows=rows, facts=facts)
    check_growing_fingerprint(cache, fingerprint)
    update = plan_update(cache, index, cfg.window_spec)
    check_output(path, needed_bytes(cfg, update.rows, encoder.num_tokens, encoder.dim, path,
                                    extra_rows=len(update.rows.videos)))
    return StorePlan(fingerprint, state, update=update)


def open_store(cfg: ExtractConfig, index: DatasetIndex, encoder=None, facts: RowFacts | None = None
               ) -> tuple[FeatureCache, Path]:
    """Create the store with the rows of `index` (and their `facts`), or reopen it when its
    fingerprint matches (FingerprintMismatch otherwise); `--overwrite` clears the staging folder
    too. `encoder`: the run's CLIP (None: the process-wide cached one, on the CPU). Returns
    (FeatureCache open for writing, staging folder)."""
    # The client needs the model's geometry and weights identity, and the tokenizer for the texts.
    # The same cached instance serves the in-process run (--workers 0) on the CPU: CLIP loads once.
    if encoder is None:
        encoder = ENCODER_CACHE.get(cfg.model, cfg.pretrained, "cpu")
    path = cfg.store_path()
    staging = Path(str(path) + ".staging")
    if cfg.overwrite and staging.exists():
        shutil.rmtree(staging)
    # Token ids are written when the store is created; a resumed store already has them.
    fresh = cfg.overwrite or not path.exists()
    text_tokens = encoder.tokenize([c.text for c in index.captions], cfg.max_words) if fresh else None
    cache = FeatureCache.open_or_create(
        path, index, frames=cfg.max_frames, num_tokens=encoder.num_tokens, dim=encoder.dim,
        words=cfg.max_words, fingerprint=build_fingerprint(cfg, index, encoder.describe()),
        videos_per_shard=cfg.videos_per_shard, overwrite=cfg.overwrite, text_tokens=text_tokens, facts=facts,
        growing=cfg.dataset == "folder",
    )
    return cache, staging


def apply_store_plan(cfg: ExtractConfig, index: DatasetIndex, encoder, plan: StorePlan
                     ) -> tuple[FeatureCache, Path, str | None]:
    """Carry out `plan` (under the store's lock): create or reopen the store (`open_store`), or
    append and retire a growing library's rows. Returns (store open for writing, staging folder, the library's changes in
    words, or None for datasets that do not grow)."""
    path = cfg.store_path()
    if store_state(path) != plan.state:  # another run changed the store since: plan again
        plan = plan_store(cfg, index, encoder)
    if plan.update is None:
        fresh = cfg.overwrite or not path.exists()
        cache, staging = open_store(cfg, plan.rows, encoder, plan.facts)
        if not (fresh and cfg.dataset == "folder"):
            return cache, staging, None
        first = LibraryUpdate(plan.rows, plan.facts, np.zeros(0, np.int64),
                              new=sorted({v.source_id for v in plan.rows.videos}))
        cache.record_generation({"generation": 1, "rows": [0, cache.n_videos], **first.counts()})
        return cache, staging, first.describe()
    update = plan.update
    cache = FeatureCache.open(path, mode="r+")
    if update.changes_anything:
        lo = hi = cache.n_videos
        if update.rows.videos:
            lo, hi = cache.append_generation(update.rows, update.facts)
        # recorded before the retirements: an interruption after the append keeps the record of its rows
        active = int((cache.read_done() != RETIRED).sum()) - int(update.retire.size)
        cache.record_generation({"generation": len(cache.generations) + 1, "rows": [lo, hi], **update.counts()},
                                fingerprint={**plan.fingerprint, "n_videos": active})
        cache.retire(update.retire)
        if cache.n_texts:
            cache.set_text_videos(text_rows(cache, index))
    return cache, Path(str(path) + ".staging"), update.describe()
