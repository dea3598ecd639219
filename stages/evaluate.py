"""Evaluate stage (spec section 8): embed every video and every text of a split once, score once.

The upstream code reran the fusion head for every (text batch, video batch) pair; here the head runs
once per video and the text adapter once per text, then one [texts, videos] similarity matrix is
built in row blocks and ranked with `muse_pipeline.metrics`.

Videos whose extraction failed (done == 2) cannot be embedded: they are left out together with
their captions, and the counts in eval.json say so. A split with pending (never extracted) videos
or texts is refused: the numbers would silently cover a different test set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from muse_pipeline.metrics import retrieval_metrics_dsl, rsum, summarize_ranks, t2v_ranks, v2t_ranks

DSL_TEMPERATURE = 0.01
# Fingerprint keys that must agree between the cache a run was trained on and the cache it is
# evaluated on: the same CLIP geometry and weights produced both.
COMPATIBLE_KEYS = ("model", "weights", "dim", "num_tokens", "image_size")


class Embedder(Protocol):
    """What evaluation needs of a model (RetrievalModel satisfies it)."""

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SplitMembers:
    """Which cache rows a split evaluates, and what was left out.

    video_idx: [N] cache rows of the cached (done == 1) videos of the split, ascending.
    text_idx: [M] cache rows of the texts whose video is in video_idx.
    caption_to_video: [M] position in video_idx of each text's video.
    """

    video_idx: np.ndarray
    text_idx: np.ndarray
    caption_to_video: np.ndarray
    failed_videos: int
    dropped_texts: int


def _cache_splits(cache: Any) -> list[str]:
    return sorted({str(s) for s in cache.video_splits})


def split_members(cache: Any, split: str) -> SplitMembers:
    """Rows of `split` to evaluate; raises ValueError if the split is absent or not fully extracted."""
    video_idx, text_idx = cache.split_indices(split)
    video_idx = np.asarray(video_idx, dtype=np.int64)
    text_idx = np.asarray(text_idx, dtype=np.int64)
    if video_idx.size == 0:
        known = _cache_splits(cache)
        raise ValueError(
            f"split {split!r} has no videos in cache {cache.path}"
            + (f"; splits in this cache: {', '.join(known)}" if known else "")
        )
    if text_idx.size == 0:
        raise ValueError(f"split {split!r} has no captions in cache {cache.path}: nothing to retrieve")
    done = np.asarray(cache.read_done())[video_idx]
    pending = int((done == 0).sum())
    if pending:
        raise ValueError(
            f"{pending} of {len(video_idx)} {split!r} videos in {cache.path} are not extracted yet; "
            "finish `muse extract` (it resumes) before evaluating"
        )
    text_done = np.asarray(cache.read_text_done())[text_idx]
    if not text_done.all():
        raise ValueError(
            f"{int((text_done == 0).sum())} {split!r} texts in {cache.path} have no embedding yet; "
            "finish `muse extract` before evaluating"
        )
    ok = video_idx[done == 1]
    if ok.size == 0:
        raise ValueError(f"every {split!r} video in {cache.path} failed extraction: nothing to evaluate")
    text_video = np.asarray(cache.text_video_index)[text_idx].astype(np.int64)
    position = {int(v): i for i, v in enumerate(ok)}
    keep = np.array([int(v) in position for v in text_video], dtype=bool)
    if not keep.any():
        raise ValueError(f"no {split!r} caption belongs to a cached video in {cache.path}")
    return SplitMembers(
        video_idx=ok,
        text_idx=text_idx[keep],
        caption_to_video=np.array([position[int(v)] for v in text_video[keep]], dtype=np.int64),
        failed_videos=int((done == 2).sum()),
        dropped_texts=int((~keep).sum()),
    )


@torch.inference_mode()
def embed_videos(
    model: Embedder, cache: Any, video_idx: np.ndarray, batch_size: int, device: str
) -> torch.Tensor:
    """[N, D] float32 CPU: each video read once (batched cache reads) and embedded once."""
    out = []
    for lo in range(0, len(video_idx), batch_size):
        tokens, mask = cache.read_videos(video_idx[lo : lo + batch_size])
        # Kept float16 on the way to the device (half the transfer); the model casts to its dtype.
        tokens_t = torch.as_tensor(np.asarray(tokens)).to(device=device)
        mask_t = torch.as_tensor(np.asarray(mask)).to(device=device)
        out.append(model.embed_videos(tokens_t, mask_t).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(
    model: Embedder, cache: Any, text_idx: np.ndarray, batch_size: int, device: str
) -> torch.Tensor:
    """[M, D] float32 CPU: the cached CLIP text embeddings through the model's text side, once each."""
    cached = np.asarray(cache.read_text_embeddings(text_idx))
    out = []
    for lo in range(0, len(text_idx), batch_size):
        emb = torch.as_tensor(cached[lo : lo + batch_size]).to(device=device, dtype=torch.float32)
        out.append(model.embed_texts(emb).float().cpu())
    return torch.cat(out)


def embed_split(
    model: Embedder, cache: Any, split: str, batch_size: int = 64, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(video_emb [N, D], text_emb [M, D], caption_to_video [M]) of the cached videos of `split`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    members = split_members(cache, split)
    video_emb = embed_videos(model, cache, members.video_idx, batch_size, device)
    text_emb = embed_texts(model, cache, members.text_idx, batch_size, device)
    return video_emb, text_emb, members.caption_to_video


def similarity_chunked(text_emb: torch.Tensor, video_emb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[M, N] float32 = text_emb [M, D] @ video_emb [N, D]^T, computed `chunk` text rows at a time."""
    if text_emb.ndim != 2 or video_emb.ndim != 2 or text_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(
            f"need text_emb [M, D] and video_emb [N, D] with equal D, got {tuple(text_emb.shape)} "
            f"and {tuple(video_emb.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    t = text_emb.float()
    v_t = video_emb.float().t().contiguous()
    sim = torch.empty(t.shape[0], v_t.shape[1], dtype=torch.float32, device=t.device)
    for lo in range(0, t.shape[0], chunk):
        sim[lo : lo + chunk] = t[lo : lo + chunk] @ v_t
    return sim.cpu()


class ZeroShotMeanP:
    """Parameter-free CLIP baseline (spec section 6, meanP): masked mean of L2-normalised CLS rows.

    embed_videos: tokens [B, T, L, D], mask [B, T] -> [B, D]; embed_texts: [M, D] -> [M, D] (L2 norm).
    """

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cls = torch.nn.functional.normalize(tokens[:, :, 0, :].float(), dim=-1)
        w = mask.to(cls.dtype).unsqueeze(-1)
        pooled = (cls * w).sum(1) / w.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(text_emb.float(), dim=-1)


def check_compatible(train_fp: dict, cache_fp: dict, cache_path: Path) -> None:
    diff = [k for k in COMPATIBLE_KEYS if k in train_fp and k in cache_fp and train_fp[k] != cache_fp[k]]
    if diff:
        details = "; ".join(f"{k}: run {train_fp[k]!r} vs cache {cache_fp[k]!r}" for k in diff)
        raise ValueError(f"cache {cache_path} was not made with the run's CLIP model ({details})")


T2V_RULE = ("text -> video: each caption ranks all test videos by similarity; the rank of its own video "
            "counts (ties count against the query)")
V2T_RULE = ("video -> text: each video ranks all test captions by similarity; its rank is the best "
            "(smallest) rank among its own captions, so a video with 20 captions needs only one near the "
            "top (ties count against the query)")


def _score(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_to_video: np.ndarray,
    dsl: bool,
    chunk: int,
    names: tuple[list[str], list[str]] | None = None,
) -> dict[str, Any]:
    """Metrics (and DSL metrics if asked) of one similarity matrix, with per-query ranks and timings.

    names: (video ids [N], caption texts [M]) for the per-query ranks kept in eval.json.
    """
    t0 = time.perf_counter()
    sim = similarity_chunked(text_emb, video_emb, chunk)
    t1 = time.perf_counter()
    c2v = np.asarray(caption_to_video, dtype=np.int64)
    t2v = t2v_ranks(sim, c2v)
    v2t = v2t_ranks(sim, c2v)
    metrics = {"t2v": summarize_ranks(t2v), "v2t": summarize_ranks(v2t)}
    out: dict[str, Any] = {"metrics": metrics, "rsum": round(rsum(metrics), 4), "post_processing": None}
    if dsl:
        out["post_processing"] = f"dual softmax (DSL), temperature {DSL_TEMPERATURE}"
        out["metrics_dsl"] = retrieval_metrics_dsl(sim, caption_to_video, DSL_TEMPERATURE)
        out["rsum_dsl"] = round(rsum(out["metrics_dsl"]), 4)
    video_ids, captions = names if names is not None else (None, None)
    with_caption = np.unique(c2v)  # v2t ranks come in this (column) order
    out["rules"] = {"t2v": T2V_RULE, "v2t": V2T_RULE}
    out["per_query"] = {
        "t2v": {
            "rank": t2v.tolist(),
            "video": [video_ids[i] for i in c2v] if video_ids is not None else c2v.tolist(),
            **({"caption": list(captions)} if captions is not None else {}),
        },
        "v2t": {
            "rank": v2t.tolist(),
            "video": [video_ids[i] for i in with_caption] if video_ids is not None else with_caption.tolist(),
        },
    }
    out["seconds"] = {"similarity": round(t1 - t0, 4), "metrics": round(time.perf_counter() - t1, 4)}
    return out


def _evaluate(
    model: Embedder,
    cache: Any,
    split: str,
    dsl: bool,
    device: str,
    batch_size: int,
    chunk: int,
) -> dict[str, Any]:
    members = split_members(cache, split)
    t0 = time.perf_counter()
    video_emb = embed_videos(model, cache, members.video_idx, batch_size, device)
    text_emb = embed_texts(model, cache, members.text_idx, batch_size, device)
    embed_s = time.perf_counter() - t0
    all_ids, all_captions = cache.video_ids, cache.captions
    names = ([str(all_ids[i]) for i in members.video_idx], [str(all_captions[i]) for i in members.text_idx])
    scored = _score(video_emb, text_emb, members.caption_to_video, dsl, chunk, names)
    scored["seconds"] = {"embed": round(embed_s, 4), **scored["seconds"]}
    return {
        "split": split,
        "cache": str(cache.path),
        "counts": {
            "videos": int(len(members.video_idx)),
            "texts": int(len(members.text_idx)),
            "failed_videos": members.failed_videos,
            "dropped_texts": members.dropped_texts,
        },
        **scored,
    }


# --------------------------------------------------------------------------------------------------
# End-to-end runs fine-tune CLIP, so cached (frozen-CLIP) tokens do not describe them: their
# evaluation decodes the split's videos and runs the run's own CLIP, as its validation did.


def load_end_to_end_encoder(
    run_dir: Path | str, config: dict[str, Any], which: str = "best", device: str = "cpu"
):
    """The run's fine-tuned CLIP as a ClipEncoder (weights from `<which>.safetensors`, `clip.` prefix)."""
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.models.checkpoint import load_weights

    src = config["end_to_end_source"]
    _, clip_state = load_weights(run_dir, which)
    if not clip_state:
        raise ValueError(
            f"{run_dir}/{which}.safetensors has no CLIP weights, but config.json says end-to-end"
        )
    encoder = ClipEncoder(src["model"], pretrained=src["pretrained"], device="cpu")
    encoder.model.load_state_dict(clip_state, strict=True)
    encoder.model.to(device).eval()
    encoder.device = torch.device(device)
    return encoder


@torch.inference_mode()
def embed_split_end_to_end(
    model: Embedder,
    encoder: Any,
    index: Any,
    split: str,
    frames: int,
    words: int,
    batch_size: int = 16,
    device: str = "cpu",
    decoder: str = "pyav",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """(video_emb [N, D], text_emb [M, D], caption_to_video [M], decode failures) of `split` of a
    DatasetIndex: frames decoded and encoded by `encoder`, each video and text once.

    A video that cannot be decoded becomes one black frame (as in end-to-end training) and is
    counted, so it stays in the test set and counts as a miss rather than silently vanishing.
    """
    import warnings

    from muse_pipeline.training.data import EndToEndPairDataset

    video_rows = np.array([i for i, v in enumerate(index.videos) if v.split == split], dtype=np.int64)
    if video_rows.size == 0:
        known = sorted({v.split for v in index.videos})
        raise ValueError(
            f"split {split!r} has no videos in dataset {index.name!r}; splits: {', '.join(known)}"
        )
    position = {int(v): i for i, v in enumerate(video_rows)}
    captions = [c for c in index.captions if c.video_index in position]
    if not captions:
        raise ValueError(f"split {split!r} of dataset {index.name!r} has no captions: nothing to retrieve")
    ids = encoder.tokenize([c.text for c in captions], words)
    # Only its frame decoding (video_batch) is used: the same decode + preprocess as training.
    empty = np.zeros(0, np.int64)
    ds = EndToEndPairDataset(
        index.videos, empty, empty, empty, frames, encoder.image_size, encoder.mean, encoder.std, decoder
    )
    videos = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for lo in range(0, len(video_rows), batch_size):
            pixels, mask = ds.video_batch(video_rows[lo : lo + batch_size])
            pixels, mask = pixels.to(device), mask.to(device)
            real = encoder.frame_tokens(pixels[mask])  # only real frames go through CLIP
            tokens = real.new_zeros((*mask.shape, *real.shape[1:]))
            tokens[mask] = real
            videos.append(model.embed_videos(tokens, mask).float().cpu())
    failures = sum(1 for w in caught if "using a black frame" in str(w.message))
    texts = []
    for lo in range(0, len(ids), batch_size):
        feats = encoder.text_features(torch.from_numpy(ids[lo : lo + batch_size]).to(device))
        texts.append(model.embed_texts(feats).float().cpu())
    c2v = np.array([position[c.video_index] for c in captions], dtype=np.int64)
    return torch.cat(videos), torch.cat(texts), c2v, failures


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
    scored = _score(video_emb, text_emb, c2v, dsl, chunk, names)
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


def open_cache(cache_path: Path | str) -> Any:
    path = Path(cache_path)
    if not path.exists():
        raise FileNotFoundError(f"cache {path} does not exist (run `muse extract` first)")
    from muse_pipeline.cache.store import FeatureCache

    return FeatureCache.open(path, mode="r")


def _eval_name(split: str) -> str:
    return "eval" if split == "test" else f"eval-{split}"


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
        result = {**head, **_evaluate(model, cache, split, dsl, device, batch_size, chunk)}
    write_eval(result, run_dir / f"{_eval_name(split)}.json")
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
    cache = open_cache(cache_path)
    result = {
        "run_dir": None,
        "head": "zero-shot meanP",
        "weights": "CLIP (no training)",
        **_evaluate(ZeroShotMeanP(), cache, split, dsl, "cpu", batch_size, chunk),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_eval(result, out / f"{_eval_name(split)}.json")
    return result


# --------------------------------------------------------------------------------------------------
# Output: eval.json, eval.md and the terminal table.

_COLUMNS = ("R1", "R5", "R10", "MdR", "MnR")


def _fmt(key: str, value: float) -> str:
    return f"{value:.1f}"


def markdown_table(metrics: dict[str, dict[str, float]]) -> str:
    head = "| direction | R@1 | R@5 | R@10 | MdR | MnR |\n| --- | --- | --- | --- | --- | --- |\n"
    rows = []
    for direction, label in (("t2v", "text -> video"), ("v2t", "video -> text")):
        m = metrics[direction]
        rows.append(f"| {label} | " + " | ".join(_fmt(k, m[k]) for k in _COLUMNS) + " |")
    return head + "\n".join(rows) + f"\n\nRSum (R@1 + R@5 + R@10, both directions): **{rsum(metrics):.1f}**\n"


def eval_markdown(result: dict[str, Any]) -> str:
    c = result["counts"]
    lines = [
        f"# Evaluation: {result['head']} on {result['split']}",
        "",
        f"- run: `{result['run_dir']}` (weights: {result['weights']})"
        if result.get("run_dir")
        else f"- model: {result['weights']}",
        f"- cache: `{result['cache']}`" if result.get("cache") else f"- source: {result.get('source')}",
        f"- {c['texts']} texts x {c['videos']} videos"
        + (
            f"; left out: {c['failed_videos']} videos that failed extraction and their {c['dropped_texts']} texts"
            if c["failed_videos"] or c["dropped_texts"]
            else ""
        ),
        f"- {T2V_RULE}.",
        f"- {V2T_RULE}.",
        "- R@K: percent of queries whose rank is <= K; MdR / MnR: median / mean rank (lower is better).",
        "- Per-query ranks are in the `per_query` field of the JSON file beside this one.",
        "",
        "## Without post-processing",
        "",
        markdown_table(result["metrics"]),
    ]
    if result.get("metrics_dsl"):
        lines += [
            f"## Post-processed: {result['post_processing']}",
            "",
            "Uses the scores of all test queries at once; not comparable with the table above.",
            "",
            markdown_table(result["metrics_dsl"]),
        ]
    return "\n".join(lines)


def write_eval(result: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    """Write `result` as JSON and the same numbers as Markdown beside it (`.md`)."""
    json_path = Path(json_path)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(eval_markdown(result))
    return json_path, md_path


def print_eval(result: dict[str, Any], console: Any = None) -> None:
    """Rich table(s) of an eval result on the terminal: both directions, RSum, the rules in words."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    c = result["counts"]
    tables = [("", result["metrics"])]
    if result.get("metrics_dsl"):
        tables.append((f" (post-processed: {result['post_processing']})", result["metrics_dsl"]))
    for suffix, metrics in tables:
        table = Table(
            title=f"{result['head']} on {result['split']}: {c['texts']} texts x {c['videos']} videos{suffix}",
            caption=f"RSum {rsum(metrics):.1f} (R@1 + R@5 + R@10, both directions)",
        )
        table.add_column("direction")
        for k in ("R@1", "R@5", "R@10", "MdR", "MnR"):
            table.add_column(k, justify="right")
        for direction, label in (("t2v", "text -> video"), ("v2t", "video -> text")):
            table.add_row(label, *(_fmt(k, metrics[direction][k]) for k in _COLUMNS))
        console.print(table)
    console.print(f"{T2V_RULE}.", soft_wrap=True, highlight=False)
    console.print(f"{V2T_RULE}.", soft_wrap=True, highlight=False)
    if c["failed_videos"]:
        console.print(
            f"[yellow]{c['failed_videos']} videos failed extraction and were left out "
            f"with their {c['dropped_texts']} texts[/yellow]"
        )
