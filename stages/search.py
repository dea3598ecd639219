"""Index and search stage: a self-contained folder of trained video embeddings, queried with free text.

`build_index` embeds every cached video (done == 1, all splits) once with a trained run and writes
everything a query needs into one folder, so that searching never opens the run or the cache again
and the folder can be moved or copied:

```
INDEX/
  index.json               format="muse-index", format_version=2, n_videos, dim, search={kind, params,
                           measured recall}, clip={model, weights_id, pretrained tag | weights_file},
                           words, head config, run name, created
  embeddings.npy           [N, D] float32, L2-normalised rows (memory-mapped at query time)
  ids.bin/.off.npy         [N] video ids      (UTF-8 blob + [N+1] int64 offsets, memory-mapped)
  paths.bin/.off.npy       [N] absolute source paths at index time
  relpaths.bin/.off.npy    [N] the same paths relative to INDEX (used when the absolute path is gone)
  captions.bin/.off.npy    [N] first caption of each video ("" when the dataset has none)
  windows.npy              [N, 2] float64 clip window (start, end) in seconds; NaN = not set
  text_adapter.safetensors the run's text adapter (fc.weight [D, D], fc.bias [D]); absent = identity
  ann.faiss                the approximate index (only when search.kind != "exact")
```

Text side at query time: CLIP's text tower (open_clip model name + the weights the cache was made
with: an open_clip tag, a local file named by absolute path and checked by size/mtime/sha256, or the
seeded random init) -> the stored text adapter `t + W t + b` -> L2 normalisation. `build_index`
checks that this reproduces the run's own `embed_texts` before it writes anything.

Scoring: cosine similarity (inner product of unit rows). Below `APPROX_THRESHOLD` videos, or with
`exact=True`, every row is scored (numpy, blocked); above it a faiss index answers (HNSW below
`IVF_THRESHOLD`, IVF-Flat above), its search-time parameter tuned at build time on the cache's own
caption queries to reach `TARGET_RECALL` recall@10 against exact search, and recorded.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.errors import InputError, UserError

INDEX_FORMAT = "muse-index"
INDEX_VERSION = 2
RANDOM_INIT = "random-init"  # ClipEncoder.weights_id of seeded random weights
# Exact search scores N x D multiply-adds per query: ~25 ms at 100k x 512 on one core, so exact is
# the right answer below this; above it an approximate faiss index is built (see benchmarks/search.py).
APPROX_THRESHOLD = 100_000
# HNSW needs no training and has the best recall per query time, but its build cost grows fastest;
# IVF-Flat builds in a fraction of the time at millions of rows.
IVF_THRESHOLD = 400_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
TARGET_RECALL = 0.95
TUNING_QUERIES = 256
MAX_QUERY_CHARS = 1000
_EXACT_BLOCK_ROWS = 65536  # rows of E scored at once: a [block, Q] float32 temporary


class IndexFormatError(UserError, ValueError):
    """A missing, foreign or damaged index, or a text side that cannot be rebuilt."""


# --------------------------------------------------------------------------------------------------
# String columns: one UTF-8 blob + offsets, memory-mapped, so opening a 1M-row index reads nothing.


def _write_strings(folder: Path, name: str, values: Sequence[str]) -> None:
    encoded = [str(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    (folder / f"{name}.bin").write_bytes(b"".join(encoded))
    np.save(folder / f"{name}.off.npy", offsets)


class StringColumn:
    """Read side of `_write_strings`: column[i] -> str, decoded on demand."""

    def __init__(self, folder: Path, name: str) -> None:
        self.offsets = np.load(folder / f"{name}.off.npy", mmap_mode="r")
        blob = folder / f"{name}.bin"
        self._blob = np.memmap(blob, dtype=np.uint8, mode="r") if blob.stat().st_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self._blob[lo:hi]).decode("utf-8")

    def all(self) -> list[str]:
        return [self[i] for i in range(len(self))]


# --------------------------------------------------------------------------------------------------
# Approximate search (faiss).


@dataclass(frozen=True)
class SearchPlan:
    """Which search structure an index of n rows gets. kind: exact | hnsw | ivf-flat."""

    kind: str
    params: dict[str, int]


def plan_search(n: int, *, exact: bool = False, approx_threshold: int = APPROX_THRESHOLD,
                ivf_threshold: int = IVF_THRESHOLD) -> SearchPlan:
    if exact or n < approx_threshold:
        return SearchPlan("exact", {})
    if n < ivf_threshold:
        return SearchPlan("hnsw", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
    # faiss's guideline: nlist ~ 4 sqrt(N) .. 16 sqrt(N) lists; 4 sqrt(N) keeps training cheap.
    return SearchPlan("ivf-flat", {"nlist": int(4 * round(math.sqrt(n)))})


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise IndexFormatError(f"faiss is not installed ({exc}); pip install faiss-cpu") from None
    return faiss


def build_ann(emb: np.ndarray, plan: SearchPlan, seed: int = 0):
    """A faiss inner-product index over emb [N, D] float32 (ids = row numbers)."""
    faiss = _import_faiss()
    d = emb.shape[1]
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, plan.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["efConstruction"]
    elif plan.kind == "ivf-flat":
        nlist = min(plan.params["nlist"], len(emb))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample: faiss uses at most 256 points per list anyway.
        rng = np.random.default_rng(seed)
        sample = emb[np.sort(rng.choice(len(emb), size=min(len(emb), 64 * nlist), replace=False))]
        index.train(np.ascontiguousarray(sample))
    else:
        raise ValueError(f"no approximate index for kind {plan.kind!r}")
    index.add(np.ascontiguousarray(emb))
    return index


def _set_search_param(index, kind: str, value: int) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = int(value)
    elif kind == "ivf-flat":
        index.nprobe = int(value)


def exact_topk(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], rows [Q, k]) of the k largest inner products, best first; emb [N, D], queries [Q, D].

    Ties are broken by the lower row number, so the answer does not depend on the block size.
    """
    n = emb.shape[0]
    k = min(k, n)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((q.shape[0], 0), np.int64)
    for lo in range(0, n, _EXACT_BLOCK_ROWS):
        block = np.asarray(emb[lo : lo + _EXACT_BLOCK_ROWS], dtype=np.float32)
        scores = q @ block.T  # [Q, b]
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < scores.shape[1] else (
            np.broadcast_to(np.arange(scores.shape[1]), scores.shape))
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + lo], axis=1)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


def exact_topk_single(emb: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`exact_topk` for one query [D] or [1, D], in one pass: E @ q, the k-th largest score by
    partition, then the (few) rows at or above it sorted by (-score, row). Returns ([1, k], [1, k])."""
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    scores = np.asarray(emb, dtype=np.float32) @ q
    n = len(scores)
    k = min(k, n)
    kth = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero(scores >= kth)
    rows = cand[np.lexsort((cand, -scores[cand]))][:k]
    return scores[rows][None, :], rows.astype(np.int64)[None, :]


def exact_topk_fast(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Same answer as `exact_topk` (up to the order of exactly tied scores) from faiss's brute-force
    kNN (BLAS blocks + a heap per query; ~6x faster than the numpy blocks for 100 queries at 100k)."""
    faiss = _import_faiss()
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    e = emb if emb.dtype == np.float32 and emb.flags["C_CONTIGUOUS"] else np.ascontiguousarray(emb, np.float32)
    scores, rows = faiss.knn(q, e, min(k, len(e)), metric=faiss.METRIC_INNER_PRODUCT)
    return scores, rows.astype(np.int64)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k also returned."""
    k = exact_rows.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows, strict=True)]
    return float(np.mean(hits) / k)


def tune_ann(index, kind: str, emb: np.ndarray, queries: np.ndarray, k: int = 10,
             target: float = TARGET_RECALL) -> dict[str, Any]:
    """Smallest search parameter (efSearch or nprobe, doubling) whose recall@k against exact >= target."""
    _, truth = exact_topk_fast(emb, queries, k)
    name = "efSearch" if kind == "hnsw" else "nprobe"
    limit = 4096 if kind == "hnsw" else int(index.nlist)
    value = 16 if kind == "hnsw" else 1
    while True:
        _set_search_param(index, kind, value)
        _, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        recall = recall_at_k(rows, truth)
        if recall >= target or value >= limit:
            return {name: int(value), "recall_at_10": round(recall, 4), "tuning_queries": int(len(queries))}
        value = min(2 * value, limit)


# --------------------------------------------------------------------------------------------------
# Building an index.


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _clip_record(fp: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
    """How to rebuild the cache's CLIP text tower: model, weights id and an open_clip tag or an
    absolute weights file (with its size and mtime, to tell a changed file before hashing it)."""
    weights = str(fp["weights"])
    record: dict[str, Any] = {"model": str(fp["model"]), "weights_id": weights}
    if weights == RANDOM_INIT:
        return record
    candidate = pretrained if pretrained is not None else fp.get("pretrained")
    if candidate is not None and os.path.isfile(candidate):
        from muse_pipeline.encoders.clip import file_sha256

        path = Path(candidate).resolve()
        if file_sha256(path) != weights:
            raise InputError(f"CLIP weights file {path} is not the file the cache was made with "
                             f"(its sha256 is not {weights[:12]}...); pass that file with --pretrained FILE")
        st = path.stat()
        record["weights_file"] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return record
    if _is_sha256(weights):
        where = f"CLIP weights file {candidate} does not exist" if candidate else "the cache names no weights file"
        raise InputError(f"the cache was made with a local CLIP weights file (sha256 {weights[:12]}...) "
                         f"but {where}; pass that file with --pretrained FILE")
    if pretrained is not None and pretrained != weights:
        raise InputError(f"--pretrained {pretrained} is neither a file nor the cache's weights tag {weights!r}")
    record["pretrained"] = weights  # an open_clip pretrained tag
    return record


def _windows(cache: Any, rows: np.ndarray) -> np.ndarray:
    """[n, 2] (start, end) seconds of each indexed video; NaN where the dataset sets no window.

    Read from the cache's `videos/start` / `videos/end` when it has them; otherwise from the
    dataset's rules: folder clips carry their window in the id (`<video>@<start>-<end>`), DiDeMo
    clips are the first 30 s.
    """
    out = np.full((len(rows), 2), np.nan)
    group = getattr(cache, "root", None)
    try:
        starts = np.asarray(group["videos/start"][...], dtype=np.float64)[rows]
        ends = np.asarray(group["videos/end"][...], dtype=np.float64)[rows]
        return np.stack([starts, ends], axis=1)
    except Exception:  # older caches: no window arrays
        pass
    dataset = (cache.fingerprint or {}).get("dataset")
    ids = cache.video_ids
    for j, i in enumerate(rows):
        vid = str(ids[i])
        if dataset == "didemo":
            out[j] = (0.0, 30.0)
        elif "@" in vid:
            window = vid.rsplit("@", 1)[1]
            lo, sep, hi = window.partition("-")
            try:
                out[j] = (float(lo) if lo else np.nan, float(hi) if hi else np.nan) if sep else out[j]
            except ValueError:
                pass
    return out


def _first_captions(cache: Any, rows: np.ndarray) -> list[str]:
    captions = cache.captions
    owner = np.asarray(cache.text_video_index)
    first: dict[int, str] = {}
    for text, video in zip(captions, owner.tolist(), strict=True):
        first.setdefault(int(video), str(text))
    return [first.get(int(i), "") for i in rows]


def _absolute_paths(paths: Sequence[str], cache_path: Path) -> list[str]:
    """Cached paths made absolute: relative ones against the working directory, else the cache's folder."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_absolute():
            here = Path.cwd() / path
            path = here if here.exists() or not (cache_path.parent / path).exists() else cache_path.parent / path
        out.append(os.path.normpath(str(path)))
    return out


def _adapter_state(model: Any) -> dict[str, np.ndarray] | None:
    adapter = getattr(model, "text_adapter", None)
    if adapter is None:
        return None
    return {k: v.detach().float().cpu().numpy() for k, v in adapter.state_dict().items()}


def apply_text_side(clip_emb: np.ndarray, adapter: dict[str, np.ndarray] | None) -> np.ndarray:
    """CLIP text embeddings [M, D] -> unit query rows [M, D]: t + W t + b (if an adapter), then L2."""
    x = np.asarray(clip_emb, dtype=np.float32)
    if adapter is not None:
        x = x + x @ adapter["fc.weight"].T + adapter["fc.bias"]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_text_side(model: Any, adapter: dict[str, np.ndarray] | None, dim: int) -> None:
    """The stored text side must equal the run's embed_texts, or queries would silently drift."""
    import torch

    probe = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.embed_texts(probe).float().numpy()
    got = apply_text_side(probe.numpy(), adapter)
    if not np.allclose(got, want, atol=1e-4):
        raise RuntimeError("the run's text side is not `t + Linear(t)` then L2: the index cannot store it")


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
    from muse_pipeline.models.checkpoint import load_run
    from muse_pipeline.stages.evaluate import check_compatible, embed_videos, open_cache

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
    clip = _clip_record(fp, pretrained)

    done = np.asarray(cache.read_done())
    rows = np.flatnonzero(done == 1)
    if rows.size == 0:
        raise InputError(f"cache {cache_path} has no extracted videos (done == 1): nothing to index")
    adapter = _adapter_state(model)  # load_run returns the model on the CPU
    _check_text_side(model, adapter, int(fp.get("dim") or config["model"]["dim"]))
    model = model.to(device)
    import torch

    emb = embed_videos(model, cache, rows, batch_size, device)
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)
    all_ids, all_paths = cache.video_ids, cache.video_paths
    ids = [str(all_ids[i]) for i in rows]
    paths = _absolute_paths([str(all_paths[i]) for i in rows], cache_path)

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
        out, emb, ids=ids, paths=paths, captions=_first_captions(cache, rows), windows=_windows(cache, rows),
        clip=clip, words=int(fp["words"]), adapter=adapter, plan=plan, tuning_queries=tuning,
        overwrite=overwrite,
        extra={"head": config["model"]["head"], "head_config": config["model"], "which": which,
               "run_name": run_dir.name, "cache_name": cache_path.name, "dataset": fp.get("dataset")},
    )
    return out


def write_index(
    out: Path | str,
    embeddings: np.ndarray,
    *,
    ids: Sequence[str],
    paths: Sequence[str],
    clip: dict[str, Any],
    words: int,
    captions: Sequence[str] | None = None,
    windows: np.ndarray | None = None,
    adapter: dict[str, np.ndarray] | None = None,
    plan: SearchPlan | None = None,
    tuning_queries: np.ndarray | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an index folder (layout in the module docstring) from unit rows `embeddings` [N, D].

    Built under a temporary name and renamed, so a crash never leaves half an index.
    """
    out = Path(out)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = emb.shape
    if not (len(ids) == len(paths) == n):
        raise ValueError(f"ids ({len(ids)}), paths ({len(paths)}) and embeddings ({n}) differ in length")
    if len(set(ids)) != n:
        raise ValueError("video ids are not unique")
    captions = list(captions) if captions is not None else [""] * n
    windows = np.full((n, 2), np.nan) if windows is None else np.asarray(windows, dtype=np.float64)
    plan = plan or plan_search(n)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "embeddings.npy", emb)
    np.save(tmp / "windows.npy", windows)
    out_abs = out.resolve()
    _write_strings(tmp, "ids", ids)
    _write_strings(tmp, "paths", paths)
    _write_strings(tmp, "relpaths", [os.path.relpath(p, out_abs) if os.path.isabs(p) else p for p in paths])
    _write_strings(tmp, "captions", captions)
    if adapter is not None:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in adapter.items()},
                  str(tmp / "text_adapter.safetensors"))
    search: dict[str, Any] = {"kind": plan.kind, "params": dict(plan.params)}
    if plan.kind != "exact":
        t0 = time.perf_counter()
        ann = build_ann(emb, plan)
        search["build_seconds"] = round(time.perf_counter() - t0, 2)
        queries = tuning_queries if tuning_queries is not None and len(tuning_queries) else emb[:TUNING_QUERIES]
        search["params"].update(tune_ann(ann, plan.kind, emb, queries))
        _import_faiss().write_index(ann, str(tmp / "ann.faiss"))
    meta = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "n_videos": n,
        "dim": d,
        "metric": "cosine",
        "search": search,
        "clip": clip,
        "words": int(words),
        "has_captions": any(bool(c) for c in captions),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------------
# Opening and querying an index.


class VideoIndex:
    """An opened index folder: memory-mapped embeddings and metadata, the faiss index if any.

    Opening reads index.json and maps the arrays: no torch, no run, no CLIP.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            if (self.path / "zarr.json").is_file():
                raise IndexFormatError(f"{self.path} is an index of an older format; rebuild it with `muse index`")
            raise IndexFormatError(f"index {self.path} does not exist or is not a muse index "
                              "(no index.json); build it with `muse index`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_VERSION:
            raise IndexFormatError(f"{self.path} is not a muse index of version {INDEX_VERSION} "
                              f"(format {meta.get('format')!r} v{meta.get('format_version')}); rebuild it")
        self.meta = meta
        self.embeddings = np.load(self.path / "embeddings.npy", mmap_mode="r")
        self.ids = StringColumn(self.path, "ids")
        self.paths = StringColumn(self.path, "paths")
        self.relpaths = StringColumn(self.path, "relpaths")
        self.captions = StringColumn(self.path, "captions")
        self.windows = np.load(self.path / "windows.npy", mmap_mode="r")
        self.kind = meta["search"]["kind"]
        self._ann = None
        self._row_of: dict[str, int] | None = None
        adapter_path = self.path / "text_adapter.safetensors"
        self.adapter = None
        if adapter_path.is_file():
            from safetensors.numpy import load_file

            self.adapter = load_file(str(adapter_path))

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def random_init(self) -> bool:
        return self.meta["clip"].get("weights_id") == RANDOM_INIT

    def row_of(self, video_id: str) -> int | None:
        if self._row_of is None:
            self._row_of = {vid: i for i, vid in enumerate(self.ids.all())}
        return self._row_of.get(video_id)

    def media_path(self, row: int) -> Path:
        """The video file of a row: the absolute path stored at index time, else the path relative to
        the index folder (an index moved together with its videos)."""
        stored = Path(self.paths[row])
        if stored.exists():
            return stored
        rel = self.path / self.relpaths[row]
        return rel if rel.exists() else stored

    def _ann_index(self):
        if self._ann is None:
            faiss = _import_faiss()
            self._ann = faiss.read_index(str(self.path / "ann.faiss"))
            params = self.meta["search"]["params"]
            _set_search_param(self._ann, self.kind, params.get("efSearch", params.get("nprobe", 1)))
        return self._ann

    def load(self) -> VideoIndex:
        """Touch what the first query would load (the faiss index), e.g. when a server starts."""
        if self.kind != "exact":
            self._ann_index()
        return self

    def search_vectors(self, queries: np.ndarray, k: int, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], rows [Q, k']) with k' = min(k, N), best first; queries [Q, D] unit rows."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if exact or self.kind == "exact":
            # One query: a matrix-vector product + partition in numpy beats faiss's threaded kNN
            # (benchmarks/search.py); a batch: faiss's blocked BLAS + heaps win by several times.
            if len(q) == 1:
                return exact_topk_single(self.embeddings, q, k)
            return exact_topk_fast(self.embeddings, q, k)
        scores, rows = self._ann_index().search(q, min(k, len(self)))
        return scores, rows.astype(np.int64)

    def hit(self, row: int, score: float, rank: int) -> dict[str, Any]:
        start, end = (float(x) for x in self.windows[row])
        return {
            "rank": rank,
            "id": self.ids[row],
            "path": self.paths[row],
            "start": 0.0 if math.isnan(start) else start,
            "end": None if math.isnan(end) else end,
            "score": round(float(score), 6),
            "caption": self.captions[row] or None,
        }


class QueryEncoder:
    """The index's text side: CLIP text tower + stored adapter. texts (Q) -> [Q, D] unit rows."""

    def __init__(self, index: VideoIndex, device: str = "cpu", pretrained: str | None = None) -> None:
        clip = index.meta["clip"]
        source = _clip_source(clip, index.path, pretrained)
        from muse_pipeline.encoders.clip import ClipEncoder

        if source is None:  # open_clip warns "initialized randomly" on the root logger; we say it ourselves
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                self.encoder = ClipEncoder(clip["model"], pretrained=None, device=device)
            finally:
                logging.disable(previous)
        else:
            self.encoder = ClipEncoder(clip["model"], pretrained=source, device=device)
        if self.encoder.weights_id != clip["weights_id"]:
            raise IndexFormatError(f"CLIP weights {self.encoder.weights_id!r} differ from the index's "
                              f"{clip['weights_id']!r}; rebuild the index or pass the right --pretrained")
        self.words = int(index.meta["words"])
        self.adapter = index.adapter

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for lo in range(0, len(texts), batch_size):
            ids = self.encoder.tokenize(list(texts[lo : lo + batch_size]), self.words)
            out.append(self.encoder.encode_texts(ids).numpy())
        return apply_text_side(np.concatenate(out), self.adapter)


def _clip_source(clip: dict[str, Any], index_path: Path, override: str | None) -> str | None:
    """The `pretrained` argument for ClipEncoder; a missing weights file is a one-line error naming it."""
    if override is not None:
        if not os.path.isfile(override):
            raise InputError(f"CLIP weights file {override} does not exist")
        return override
    if clip.get("weights_id") == RANDOM_INIT:
        return None
    record = clip.get("weights_file")
    if record is None:
        return clip.get("pretrained")
    path = Path(record["path"])
    if not path.is_file():
        raise InputError(f"CLIP weights file {path} (named by index {index_path}) does not exist; "
                         "put it back or pass it with --pretrained FILE")
    if path.stat().st_size != record.get("size", path.stat().st_size):
        raise InputError(f"CLIP weights file {path} changed since index {index_path} was built (its size "
                         "differs); rebuild the index or pass the original file with --pretrained FILE")
    return str(path)  # ClipEncoder checks its sha256 against the index's weights id


def check_query(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError("the query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise InputError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS} are allowed")
    return text.strip()


class Searcher:
    """An index with its query encoder, loaded once for many queries (CLI batches, the server)."""

    def __init__(self, index_path: Path | str, device: str = "cpu", pretrained: str | None = None) -> None:
        self.index = VideoIndex(index_path).load()
        self.encoder = QueryEncoder(self.index, device=device, pretrained=pretrained)

    def search(self, queries: Sequence[str], top_k: int = 5, *, exact: bool = False) -> list[list[dict[str, Any]]]:
        """One hit list per query (best first): rank, id, path, start, end, score, caption."""
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        texts = [check_query(q) for q in queries]
        if not texts:
            return []
        scores, rows = self.index.search_vectors(self.encoder.encode(texts), top_k, exact=exact)
        return [
            [self.index.hit(int(r), float(s), rank) for rank, (s, r) in enumerate(zip(sr, rr, strict=True), 1) if r >= 0]
            for sr, rr in zip(scores, rows, strict=True)
        ]

    def rank_of(self, query: str, video_id: str) -> int | None:
        """Exact 1-based rank of `video_id` for `query` among all indexed videos (ties count against it)."""
        row = self.index.row_of(video_id)
        if row is None:
            return None
        q = self.encoder.encode([check_query(query)])[0]
        scores = np.asarray(self.index.embeddings) @ q
        return int((scores >= scores[row]).sum())


_SEARCHERS: dict[tuple[str, float, str], Searcher] = {}


def search(query: str, index_path: Path | str, top_k: int = 5, *, device: str = "cpu") -> list[dict[str, Any]]:
    """Top-k videos of the index for one free-text query (see Searcher.search); searchers are reused."""
    check_query(query)
    if top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    path = Path(index_path).resolve()
    meta = path / "index.json"
    key = (str(path), meta.stat().st_mtime if meta.exists() else 0.0, device)
    if key not in _SEARCHERS:
        _SEARCHERS.clear()
        _SEARCHERS[key] = Searcher(path, device)
    return _SEARCHERS[key].search([query], top_k)[0]


def clear_searchers() -> None:
    _SEARCHERS.clear()


RANDOM_INIT_NOTE = (
    "This index was built with a randomly initialised CLIP (no pretrained weights): words do not mean "
    "colours or shapes to it, so these results show the machinery, not real search. Real search needs "
    "real CLIP weights (muse extract --pretrained openai, or a weights file)."
)


# --------------------------------------------------------------------------------------------------
# HTML


def thumbnail_strip(path: str | Path, n_frames: int, height: int, start: float | None = None,
                    end: float | None = None) -> list[bytes]:
    """JPEG bytes of up to n_frames frames spread over [start, end) of the video; raises on a bad file."""
    from PIL import Image

    from muse_pipeline.video.decode import decode_clip

    frames = decode_clip(path, max_frames=n_frames, start=start, end=end)
    out = []
    for frame in frames:  # an array [n, H, W, 3], or a list where the frame size changes
        img = Image.fromarray(frame)
        width = max(1, round(img.width * height / max(img.height, 1)))
        img = img.resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _thumbnails(path: str, n_frames: int, height: int, start: float | None = None,
                end: float | None = None) -> tuple[list[str], str | None]:
    """Base64 JPEGs of the strip, or ([], reason) if undecodable."""
    try:
        jpegs = thumbnail_strip(path, n_frames, height, start, end)
    except Exception as exc:  # a missing or broken file still gets a row, with the reason
        return [], f"{type(exc).__name__}: {exc}"
    return [base64.b64encode(j).decode("ascii") for j in jpegs], None


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
.note { background: #fff4d6; border: 1px solid #e0c060; padding: 0.6em; border-radius: 6px; }
.hit { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin-bottom: 0.8em; }
.meta { margin-bottom: 0.4em; } .score { font-weight: bold; } .path { color: #666; font-size: 0.9em; }
.caption { font-style: italic; } .strip img { margin-right: 4px; border-radius: 3px; } .err { color: #a00; }
"""


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:g} s"


def write_html(
    hits: Sequence[dict[str, Any]],
    out_html: Path | str,
    *,
    query: str | None = None,
    n_frames: int = 4,
    height: int = 96,
    note: str | None = None,
    extra_rows: Sequence[str] = (),
) -> Path:
    """A self-contained HTML page (inline base64 JPEG thumbnails) of search hits. Returns its path.

    note: a warning shown above the hits (e.g. RANDOM_INIT_NOTE); extra_rows: lines of plain text
    shown under the title (escaped).
    """
    title = f"muse search: {query}" if query else "muse search"
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts += [f"<p>{html.escape(line)}</p>" for line in extra_rows]
    if not hits:
        parts.append("<p>No results.</p>")
    for i, hit in enumerate(hits):
        start, end = hit.get("start"), hit.get("end")
        thumbs, error = _thumbnails(str(hit["path"]), n_frames, height, start or None, end)
        strip = "".join(
            f'<img src="data:image/jpeg;base64,{b64}" alt="frame {j + 1}" height="{height}">'
            for j, b64 in enumerate(thumbs)
        )
        if error:
            strip = f'<span class="err">no preview ({html.escape(error)})</span>'
        caption = hit.get("caption")
        window = f" [{_seconds(start)} - {_seconds(end)}]" if start or end is not None else ""
        parts.append(
            '<div class="hit"><div class="meta">'
            f'{hit.get("rank", i + 1)}. <span class="score">{float(hit["score"]):.4f}</span> '
            f"{html.escape(str(hit['id']))}{html.escape(window)} "
            f'<span class="path">{html.escape(str(hit["path"]))}</span></div>'
            + (f'<div class="caption">{html.escape(str(caption))}</div>' if caption else "")
            + f'<div class="strip">{strip}</div></div>'
        )
    parts.append("</body></html>")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
