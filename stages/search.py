"""`muse index`: embed every cached video once (with a trained run, or zero-shot CLIP) and publish a
self-contained index generation.

The index's format is `muse_pipeline.search.index_format` (one generation folder) and
`generations` (the root, CURRENT); querying it is `muse_pipeline.search.query.Searcher`; what an
update copies and what faiss gets is `muse_pipeline.search.update`; which embedder (a run's head or
zero-shot CLIP) and which tuning queries is `muse_pipeline.search.embedder`. This stage only wires a
run (or zero-shot CLIP) and a cache into them: it checks the cache, records how to rebuild the
cache's CLIP text tower, embeds the videos that are new since the current generation (done == 1,
all splits), copies the others, and publishes the generation.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.errors import InputError
from muse_pipeline.search.cache_columns import (
    absolute_paths,
    clip_windows,
    first_captions,
)
from muse_pipeline.search.embedder import load_indexable_run, run_embedder, tuning_queries, zero_shot_embedder
from muse_pipeline.search.generations import is_index_root, open_index, publish
from muse_pipeline.search.index_format import VideoIndex, write_index
from muse_pipeline.search.query import clip_record
from muse_pipeline.search.text_encoder import ensure_text_encoder
from muse_pipeline.search.topk import APPROX_THRESHOLD, IVF_THRESHOLD, plan_search
from muse_pipeline.search.update import (
    ann_choice,
    cache_identity,
    extend_ann,
    identity_differences,
    index_identity,
    kept_tuning,
    plan_rows,
)


@dataclass(frozen=True)
class IndexBuild:
    """What `build_index` did: the index root, the generation now current, and the counts.

    published: False when the index was already up to date (nothing written). faiss: "none" (exact
    search), "updated" or "rebuilt"; "unchanged" for an approximate index left as it was. notes: sentences for the user (a frame count that differs, why a
    full build was needed)."""

    path: Path
    generation: str
    published: bool
    n_videos: int
    added: int
    removed: int
    kept: int
    faiss: str
    notes: list[str] = field(default_factory=list)


def _existing(out: Path, identity: dict[str, Any], overwrite: bool) -> tuple[VideoIndex | None, list[str]]:
    """The current generation to update (None: full build) and notes; refuses (before anything is
    written) an existing folder of another source or a non-index folder unless `overwrite`."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None, []
    if not is_index_root(out):
        if not overwrite:
            raise InputError(f"{out} exists and is not a muse index; pass --overwrite to replace it")
        return None, []
    if overwrite:
        return None, ["--overwrite: every video embedded again"]
    old = open_index(out)  # a damaged index is one error line that says --overwrite
    differ = identity_differences(old.meta.get("identity"), identity)
    if differ:
        raise InputError(f"{out} holds an index of another {' / '.join(differ)} (it is updated in place "
                         "only from the same run, cache and CLIP); pass --overwrite to replace it, or "
                         "choose another --out")
    return old, []


def build_index(
    run_dir: Path | str | None,
    cache_path: Path | str | None = None,
    out_path: Path | str | None = None,
    *,
    pretrained: str | None = None,
    which: str = "best",
    batch_size: int = 64,
    device: str = "cpu",
    exact: bool = False,
    overwrite: bool = False,
    approx_threshold: int = APPROX_THRESHOLD,
    ivf_threshold: int = IVF_THRESHOLD,
) -> IndexBuild:
    """Index every cached video of `cache_path` (default: the run's cache) and publish a generation.

    run_dir None: zero-shot CLIP (`ZeroShotMeanP`: mean of the real frames' unit CLS rows, unit
    norm; identity text side); cache_path and out_path are then required. out_path defaults to
    `<run_dir>/index`. An existing index at out_path from the same run (or zero-shot), cache and CLIP
    is updated (a new generation: new rows embedded, retired rows dropped, the others copied); another
    one is refused unless `overwrite`. `pretrained` is only needed when the cache was made from a local
    weights file that is not where the cache says.
    """
    from muse_pipeline.evaluation.embed import embed_videos, open_cache

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    model = config = None
    if run_dir is None:
        if cache_path is None or out_path is None:
            raise InputError("without a run, give the cache and the index folder: muse index --cache CACHE --out INDEX")
    else:
        run_dir = Path(run_dir).resolve()
        model, config = load_indexable_run(run_dir, which)
        if cache_path is None and not config.get("cache"):
            raise InputError(f"{run_dir}/config.json names no cache; pass one with --cache")
    out = Path(out_path) if out_path is not None else run_dir / "index"
    cache_path = Path(cache_path if cache_path is not None else config["cache"]).resolve()
    try:
        cache = open_cache(cache_path)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from None
    fp = dict(cache.fingerprint or {})
    missing = [k for k in ("model", "weights", "words") if k not in fp]
    if missing:
        raise InputError(f"cache {cache_path} fingerprint lacks {missing}: cannot tell how to encode queries")
    clip = clip_record(fp, pretrained)
    embedder = (zero_shot_embedder(cache) if run_dir is None
                else run_embedder(run_dir, model, config, cache, cache_path, which, device))
    identity = index_identity(embedder.run, cache_identity(cache_path, fp), clip)
    old, notes = _existing(out, identity, overwrite)

    done = np.asarray(cache.read_done())
    cached = np.flatnonzero(done == 1)
    if cached.size == 0:
        raise InputError(f"cache {cache_path} has no extracted videos (done == 1): nothing to index")
    all_ids, all_paths = cache.video_ids, cache.video_paths
    if old is not None and old.cache_rows is None:
        notes.append("the current index records no cache rows (made before updates existed): rebuilt")
    rows = plan_rows(old.cache_rows if old is not None else None, old.ids.all() if old is not None else [],
                     cached, all_ids)
    plan = plan_search(len(cached), exact=exact, approx_threshold=approx_threshold, ivf_threshold=ivf_threshold)
    if old is not None and not len(rows.new_cache_rows) and not rows.removed and old.kind == plan.kind:
        return IndexBuild(out, old.generation, False, len(old), 0, 0, len(old), "none" if plan.kind == "exact"
                          else "unchanged", [*embedder.notes, *notes])
    import torch

    new_emb = np.zeros((0, int(fp.get("dim") or cache.dim)), np.float32)
    if len(rows.new_cache_rows):
        new_emb = embed_videos(embedder.model, cache, rows.new_cache_rows, batch_size, device)
        new_emb = torch.nn.functional.normalize(new_emb, dim=-1).numpy().astype(np.float32)
    kept_emb = old.embeddings[rows.keep] if old is not None else new_emb[:0]
    emb = np.concatenate([kept_emb, new_emb]).astype(np.float32)
    index_rows = rows.cache_rows
    faiss = ann_choice(old.kind if old is not None else None, old is not None and (old.path / "ann.faiss").is_file(),
                       plan, rows)
    ann = (extend_ann(old.ann_index(), new_emb), kept_tuning(old.meta["search"]["params"])) if faiss == "updated" else None
    tuning = tuning_queries(cache, embedder.adapter, emb) if faiss == "rebuilt" else None
    previous = old.generation if old is not None else None
    update = {"previous": previous, "added": len(rows.new_cache_rows), "removed": rows.removed,
              "kept": len(rows.keep), "faiss": faiss}

    def write(folder: Path) -> None:
        write_index(
            folder, emb, ids=[str(all_ids[i]) for i in index_rows],
            paths=absolute_paths([str(all_paths[i]) for i in index_rows], cache_path),
            captions=first_captions(cache, index_rows), windows=clip_windows(cache, index_rows),
            sources=cache.read_sources(index_rows), durations=cache.read_durations(index_rows),
            cache_rows=index_rows, clip=clip, words=int(fp["words"]), adapter=embedder.adapter, plan=plan,
            tuning_queries=tuning, ann=ann,
            extra={**embedder.extra, "cache_name": cache_path.name, "dataset": fp.get("dataset"),
                   "identity": identity, "update": update},
        )

    if overwrite and out.exists() and not is_index_root(out):
        shutil.rmtree(out) if out.is_dir() else out.unlink()  # --out may name a file
    generation = publish(out, write)
    # The CLIP text tower for queries, once per index root (a query then needs no open_clip).
    ensure_text_encoder(out, clip, pretrained=pretrained, device=device)
    return IndexBuild(out, generation, True, len(emb), update["added"], update["removed"], update["kept"],
                      faiss, [*embedder.notes, *notes])
