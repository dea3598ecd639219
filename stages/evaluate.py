"""Evaluate stage (spec section 8): embed every video and every text of a split once, score once, write
eval.json + eval.md beside the run (or into --out for zero-shot CLIP).

The library does the work (`muse_pipeline.evaluation`: embed, score, end_to_end, tables); this module
chooses the path (cached tokens, or decoded frames for end-to-end runs) and writes the files. The head
runs once per video and the text adapter once per text; one [texts, videos] similarity matrix is built
in row blocks. Videos whose extraction failed are left out with their captions (counted in eval.json);
a split with pending videos or texts is refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from muse_pipeline.evaluation.embed import Embedder, open_cache
from muse_pipeline.evaluation.end_to_end import embed_split_end_to_end, load_end_to_end_encoder
from muse_pipeline.evaluation.score import (
    check_compatible,
    evaluate_cached,
    score_similarity,
    zero_shot_result,
)
from muse_pipeline.evaluation.tables import eval_file_name, write_eval


def _evaluate_end_to_end(
    run_dir: Path,
    config: dict[str, Any],
    model: Embedder,
    split: str,
    dsl: bool,
    device: str,
    which: str,
    batch_size: int,
    chunk: int,
) -> dict[str, Any]:
    from muse_pipeline.data import load_dataset

    src = config["end_to_end_source"]
    index = load_dataset(src["dataset"], src["data_root"])
    encoder = load_end_to_end_encoder(run_dir, config, which, device)
    train = config.get("train") or {}
    frames = int(train.get("frames") or config["model"]["max_frames"])
    words = int(train.get("words") or config["fingerprint"]["words"])
    t0 = time.perf_counter()
    video_emb, text_emb, c2v, failures = embed_split_end_to_end(
        model, encoder, index, split, frames, words, batch_size, device, src.get("decoder", "pyav")
    )
    embed_s = time.perf_counter() - t0
    split_videos = [v for v in index.videos if v.split == split]
    positions = {i for i, v in enumerate(index.videos) if v.split == split}
    names = ([v.id for v in split_videos], [c.text for c in index.captions if c.video_index in positions])
    scored = score_similarity(video_emb, text_emb, c2v, dsl, chunk, names)
    scored["seconds"] = {"embed": round(embed_s, 4), **scored["seconds"]}
    return {
        "split": split,
        "cache": None,
        "source": f"end-to-end: {src['dataset']} at {src['data_root']} (frames decoded, fine-tuned CLIP)",
        "counts": {
            "videos": int(video_emb.shape[0]),
            "texts": int(text_emb.shape[0]),
            "failed_videos": 0,
            "dropped_texts": 0,
            "undecodable_videos_scored_as_black_frame": int(failures),
        },
        **scored,
    }


def evaluate_run(
    run_dir: Path | str,
    split: str = "test",
    dsl: bool = False,
    device: str = "cpu",
    *,
    which: str = "best",
    cache_path: Path | str | None = None,
    batch_size: int = 64,
    chunk: int = 4096,
) -> dict[str, Any]:
    """Evaluate a trained run on `split` of its cache (or `cache_path`); write eval.json + eval.md.

    Files go to `run_dir` (`eval-<split>.*` for a split other than test). Returns the eval.json dict.
    """
    from muse_pipeline.models.checkpoint import load_run

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no config.json); train one with `muse train`"
        )
    model, config = load_run(run_dir, which=which)
    model = model.to(device).eval()
    head = {"run_dir": str(run_dir), "head": config["model"]["head"], "weights": which}
    if config.get("end_to_end"):
        if cache_path is not None:
            raise ValueError(
                f"{run_dir} is an end-to-end run (CLIP fine-tuned): cached frozen-CLIP tokens do not "
                "describe it; evaluate it without --cache (its videos are decoded again)"
            )
        result = {
            **head,
            **_evaluate_end_to_end(run_dir, config, model, split, dsl, device, which, batch_size, chunk),
        }
    else:
        if cache_path is None and not config.get("cache"):
            raise ValueError(f"{run_dir}/config.json names no cache; pass one with --cache")
        path = Path(cache_path) if cache_path is not None else Path(config["cache"])
        cache = open_cache(path)
        check_compatible(config.get("fingerprint") or {}, cache.fingerprint or {}, path)
        result = {**head, **evaluate_cached(model, cache, split, dsl, device, batch_size, chunk)}
    write_eval(result, run_dir / f"{eval_file_name(split)}.json")
    return result


def evaluate_zero_shot(
    cache_path: Path | str,
    split: str = "test",
    out_dir: Path | str | None = None,
    *,
    dsl: bool = False,
    batch_size: int = 64,
    chunk: int = 4096,
) -> dict[str, Any]:
    """Zero-shot CLIP (meanP of cached CLS tokens vs cached text embeddings), no training.

    Writes eval.json + eval.md into `out_dir` when given. Returns the eval.json dict.
    """
    result = zero_shot_result(cache_path, split, dsl=dsl, batch_size=batch_size, chunk=chunk)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_eval(result, out / f"{eval_file_name(split)}.json")
    return result
