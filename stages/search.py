"""`muse index`: embed every cached video once with a trained run and write a self-contained index.

The index's format is `muse_pipeline.search.index_format`; querying it is
`muse_pipeline.search.query.Searcher`. This stage only wires a run and a cache into it: it checks
the run and the cache, records how to rebuild the cache's CLIP text tower, checks that the run's
text side can be stored (`t + W t + b`, then L2), embeds the videos (done == 1, all splits) and
picks the tuning queries of an approximate index (the cache's own captions through the text side).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from muse_pipeline.errors import InputError
from muse_pipeline.search.cache_columns import absolute_paths, clip_windows, first_captions
from muse_pipeline.search.index_format import write_index
from muse_pipeline.search.query import adapter_state, apply_text_side, check_text_side, clip_record
from muse_pipeline.search.text_encoder import ensure_text_encoder
from muse_pipeline.search.topk import APPROX_THRESHOLD, IVF_THRESHOLD, TUNING_QUERIES, plan_search


def build_index(
    run_dir: Path | str,
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
) -> Path:
    """Embed every cached video of `cache_path` (default: the run's cache) with the run; write the index.

    out_path defaults to `<run_dir>/index`. `pretrained` is only needed when the cache was made from
    a local weights file that is not where the cache says. Refuses an existing out_path unless
    `overwrite`. Returns out_path.
    """
    from muse_pipeline.evaluation.embed import embed_videos, open_cache
    from muse_pipeline.evaluation.score import check_compatible
    from muse_pipeline.models.checkpoint import load_run

    run_dir = Path(run_dir).resolve()
    out = Path(out_path) if out_path is not None else run_dir / "index"
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    model, config = load_run(run_dir, which=which)
    if config.get("end_to_end"):
        raise InputError(
            f"{run_dir} is an end-to-end run (CLIP fine-tuned): a cache of frozen-CLIP tokens does not "
            "describe it, so it cannot be indexed from a cache; index a run trained from the cache"
        )
    model = model.eval()
    if cache_path is None and not config.get("cache"):
        raise InputError(f"{run_dir}/config.json names no cache; pass one with --cache")
    cache_path = Path(cache_path if cache_path is not None else config["cache"]).resolve()
    cache = open_cache(cache_path)
    fp = dict(cache.fingerprint or {})
    check_compatible(config.get("fingerprint") or {}, fp, cache_path)
    missing = [k for k in ("model", "weights", "words") if k not in fp]
    if missing:
        raise InputError(f"cache {cache_path} fingerprint lacks {missing}: cannot tell how to encode queries")
    clip = clip_record(fp, pretrained)

    done = np.asarray(cache.read_done())
    rows = np.flatnonzero(done == 1)
    if rows.size == 0:
        raise InputError(f"cache {cache_path} has no extracted videos (done == 1): nothing to index")
    adapter = adapter_state(model)  # load_run returns the model on the CPU
    check_text_side(model, adapter, int(fp.get("dim") or config["model"]["dim"]))
    model = model.to(device)
    import torch

    emb = embed_videos(model, cache, rows, batch_size, device)
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)
    all_ids, all_paths = cache.video_ids, cache.video_paths
    ids = [str(all_ids[i]) for i in rows]
    paths = absolute_paths([str(all_paths[i]) for i in rows], cache_path)

    # Tuning queries for an approximate index: the cache's own captions through the text side.
    plan = plan_search(len(rows), exact=exact, approx_threshold=approx_threshold, ivf_threshold=ivf_threshold)
    text_done = np.flatnonzero(np.asarray(cache.read_text_done()) == 1)
    tuning = None
    if plan.kind != "exact":
        pick = text_done[np.linspace(0, len(text_done) - 1, min(TUNING_QUERIES, len(text_done))).astype(int)] \
            if len(text_done) else np.zeros(0, np.int64)
        tuning = apply_text_side(np.asarray(cache.read_text_embeddings(pick), np.float32), adapter) \
            if len(pick) else emb[:: max(1, len(emb) // TUNING_QUERIES)]

    write_index(
        out, emb, ids=ids, paths=paths, captions=first_captions(cache, rows), windows=clip_windows(cache, rows),
        clip=clip, words=int(fp["words"]), adapter=adapter, plan=plan, tuning_queries=tuning,
        overwrite=overwrite,
        extra={"head": config["model"]["head"], "head_config": config["model"], "which": which,
               "run_name": run_dir.name, "cache_name": cache_path.name, "dataset": fp.get("dataset")},
    )
    # The CLIP text tower for queries, once per index root (a query then needs no open_clip).
    ensure_text_encoder(out, clip, pretrained=pretrained, device=device)
    return out
