"""The index's text side and its searcher: free text -> unit query rows -> hits.

Text side (what `build_index` stores and a query replays): CLIP's text tower (open_clip model name
and the weights the cache was made with: an open_clip tag, a local file named by absolute path and
checked by size and sha256, or the seeded random init) -> the run's text adapter `t + W t + b`
(fc.weight [D, D], fc.bias [D]; none = identity) -> L2 normalisation. The index build exports the
text tower into the index root (`text_encoder`), so a query normally never imports open_clip.

- `clip_record(fingerprint, pretrained)`: the index.json `clip` record of a cache's CLIP (build side);
  `clip_source(record, index_path, override)`: the `pretrained` argument that rebuilds it (query side).
- `adapter_state(model)` / `apply_text_side(clip_emb, adapter)` / `check_text_side(...)`: the adapter
  as numpy arrays, its application, and the check that it reproduces the run's `embed_texts`.
- `QueryEncoder`: texts (Q) -> [Q, D] float32 unit rows; `Searcher`: an index with its encoder,
  loaded once for many queries; hits are `VideoIndex.hit` dicts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.encoders.weights_identity import RANDOM_INIT, file_sha256
from muse_pipeline.errors import InputError
from muse_pipeline.search.generations import open_index
from muse_pipeline.search.index_format import IndexFormatError, VideoIndex
from muse_pipeline.search.limits import DEFAULT_K, check_k, check_query
from muse_pipeline.search.moments import group_by_source

# --group fetches this many hits per wanted file first (a file has several moments), then doubles.
GROUP_FETCH = 8

RANDOM_INIT_NOTE = (
    "This index was built with a randomly initialised CLIP (no pretrained weights): words do not mean "
    "colours or shapes to it, so these results show the machinery, not real search. Real search needs "
    "real CLIP weights (muse extract --pretrained openai, or a weights file)."
)


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def clip_record(fingerprint: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
    """How to rebuild the cache's CLIP text tower, for index.json's `clip` key.

    fingerprint: the cache's (model, weights = an open_clip tag, a sha256 or RANDOM_INIT, optional
    pretrained = the tag or file it was made from); pretrained: the user's override. Returns {model,
    weights_id} plus {pretrained: tag} or {weights_file: {path (absolute), size, mtime_ns}}; a file
    whose sha256 is not the cache's, or a local-file cache without its file, is an InputError.
    """
    weights = str(fingerprint["weights"])
    record: dict[str, Any] = {"model": str(fingerprint["model"]), "weights_id": weights}
    if weights == RANDOM_INIT:
        return record
    candidate = pretrained if pretrained is not None else fingerprint.get("pretrained")
    if candidate is not None and os.path.isfile(candidate):
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


def clip_source(clip: dict[str, Any], index_path: Path, override: str | None) -> str | None:
    """The `pretrained` argument for ClipEncoder of an index's `clip` record (None = random init);
    a missing or resized weights file is a one-line InputError naming it."""
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


def adapter_state(model: Any) -> dict[str, np.ndarray] | None:
    """The run's text adapter as float32 numpy arrays {fc.weight [D, D], fc.bias [D]}; None if it has none."""
    adapter = getattr(model, "text_adapter", None)
    if adapter is None:
        return None
    return {k: v.detach().float().cpu().numpy() for k, v in adapter.state_dict().items()}


def apply_text_side(clip_emb: np.ndarray, adapter: dict[str, np.ndarray] | None) -> np.ndarray:
    """CLIP text embeddings [M, D] -> unit query rows [M, D] float32: t + W t + b (if an adapter), then L2."""
    x = np.asarray(clip_emb, dtype=np.float32)
    if adapter is not None:
        x = x + x @ adapter["fc.weight"].T + adapter["fc.bias"]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_text_side(model: Any, adapter: dict[str, np.ndarray] | None, dim: int) -> None:
    """The stored text side must equal the run's embed_texts (on 8 seeded probes, atol 1e-4), or
    queries would silently drift; RuntimeError (a bug, not a user error) if it does not."""
    import torch

    probe = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.embed_texts(probe).float().numpy()
    got = apply_text_side(probe.numpy(), adapter)
    if not np.allclose(got, want, atol=1e-4):
        raise RuntimeError("the run's text side is not `t + Linear(t)` then L2: the index cannot store it")


class QueryEncoder:
    """The index's text side: CLIP text tower + stored adapter. texts (Q) -> [Q, D] unit rows.

    The tower is the index root's export (`text_encoder`: no open_clip import, no image tower)
    when it holds the index's CLIP; otherwise (an index built before exports, or a `pretrained`
    override) the whole CLIP is built through open_clip as `ClipEncoder`. `source` says which:
    "export" or "open_clip".

    clip_encoder: a loaded text tower (TextEncoder or ClipEncoder) to reuse, e.g. by a server's next
    generation with the same CLIP; it must hold the index's weights ("shared").
    """

    def __init__(self, index: VideoIndex, device: str = "cpu", pretrained: str | None = None,
                 clip_encoder: Any = None) -> None:
        clip = index.meta["clip"]
        self.words = int(index.meta["words"])
        self.adapter = index.adapter
        if clip_encoder is not None:
            self.encoder = clip_encoder
            self.source = "shared"
            return
        from muse_pipeline.search.text_encoder import TextEncoder, find_text_encoder

        exported = find_text_encoder(index.path, clip) if pretrained is None else None
        if exported is not None:
            self.encoder = TextEncoder.load(exported, device=device)
            self.source = "export"
            return
        from muse_pipeline.encoders.clip import ClipEncoder

        source = clip_source(clip, index.path, pretrained)
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
        self.source = "open_clip"

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for lo in range(0, len(texts), batch_size):
            ids = self.encoder.tokenize(list(texts[lo : lo + batch_size]), self.words)
            out.append(self.encoder.encode_texts(ids).numpy())
        return apply_text_side(np.concatenate(out), self.adapter)


class Searcher:
    """An index with its query encoder, loaded once for many queries (CLI batches, the server).

    index_path: an index root (its current generation is read, `generations.open_index`) or one
    generation folder. `reuse`: a Searcher whose CLIP text tower this one may share (same weights)."""

    def __init__(self, index_path: Path | str, device: str = "cpu", pretrained: str | None = None,
                 reuse: Searcher | None = None) -> None:
        self.root = Path(index_path)
        self.index = open_index(index_path).load()
        clip = self.index.meta["clip"]
        shared = None
        if reuse is not None and reuse.index.meta["clip"].get("weights_id") == clip.get("weights_id") \
                and reuse.index.meta["clip"].get("model") == clip.get("model"):
            shared = reuse.encoder.encoder
        self.encoder = QueryEncoder(self.index, device=device, pretrained=pretrained, clip_encoder=shared)

    def search(self, queries: Sequence[str], top_k: int = DEFAULT_K, *,
               exact: bool = False) -> list[list[dict[str, Any]]]:
        """One hit list per query (best first): rank, id, source, path, start, end, score, caption, missing."""
        check_k(top_k, "top_k")
        texts = [check_query(q) for q in queries]
        if not texts:
            return []
        return self._hits(self.encoder.encode(texts), top_k, exact)

    def _hits(self, vectors: np.ndarray, top_k: int, exact: bool) -> list[list[dict[str, Any]]]:
        """One hit list per query row of `vectors` [Q, D] (unit rows), best first."""
        scores, rows = self.index.search_vectors(vectors, top_k, exact=exact)
        return [
            [self.index.hit(int(r), float(s), rank) for rank, (s, r) in enumerate(zip(sr, rr, strict=True), 1) if r >= 0]
            for sr, rr in zip(scores, rows, strict=True)
        ]

    def search_grouped(self, queries: Sequence[str], top_k: int = DEFAULT_K, *,
                       exact: bool = False) -> list[list[dict[str, Any]]]:
        """One list of at most `top_k` source files per query (`moments.group_by_source`): each file's
        moments best first, files by their best moment. Fetches hits until `top_k` files are found or
        every row was ranked."""
        check_k(top_k, "top_k")
        texts = [check_query(q) for q in queries]
        if not texts:
            return []
        out = []
        # Each query is encoded once; only the ranking is redone with a larger fetch.
        for vector in self.encoder.encode(texts):
            fetch = min(len(self.index), top_k * GROUP_FETCH)
            while True:
                hits = self._hits(vector[None, :], fetch, exact)[0]
                groups = group_by_source(hits, top_k)
                if len(groups) >= top_k or fetch >= len(self.index):
                    break
                fetch = min(len(self.index), fetch * 2)
            out.append(groups)
        return out

    def rank_of(self, query: str, video_id: str) -> int | None:
        """Exact 1-based rank of `video_id` for `query` among all indexed videos (ties count against it)."""
        row = self.index.row_of(video_id)
        if row is None:
            return None
        q = self.encoder.encode([check_query(query)])[0]
        scores = np.asarray(self.index.embeddings) @ q
        return int((scores >= scores[row]).sum())
