"""Index and search stage: trained video embeddings of a cache, queried with free text.

`build_index` embeds every cached video (done == 1, all splits) once with a trained run and stores
the L2-normalised embeddings in a small Zarr store. `search` encodes a query with the same CLIP
text tower that made the cache (model name + weights from the cache fingerprint, checked), passes
it through the run's text side, and returns the top-k videos by cosine similarity. `write_html`
renders hits as a self-contained page with inline JPEG thumbnails.

Index layout (Zarr v3):
```
/            attrs: format="muse-index", format_version=1, run_dir, which, head, cache_path,
                    n_videos, fingerprint={model, pretrained, weights, words, dim}
/embeddings  [N, D] float32, L2-normalised
/ids         [N] str
/paths       [N] str
```
"""

from __future__ import annotations

import base64
import functools
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

INDEX_FORMAT = "muse-index"
INDEX_VERSION = 1
RANDOM_INIT = "random-init"  # ClipEncoder.weights_id of seeded random weights
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _cache_pretrained(weights: str, pretrained: str | None) -> str | None:
    """The `pretrained` argument of ClipEncoder that reproduces the cache's weights id."""
    if pretrained is not None:
        return pretrained
    if weights == RANDOM_INIT:
        return None
    if _SHA256.match(weights):
        raise ValueError(
            "the cache was made with a local CLIP weights file (sha256 "
            f"{weights[:12]}...); pass the same file as `pretrained` (--pretrained) to encode queries"
        )
    return weights  # an open_clip pretrained tag


def build_index(
    run_dir: Path | str,
    cache_path: Path | str | None = None,
    out_path: Path | str | None = None,
    *,
    pretrained: str | None = None,
    which: str = "best",
    batch_size: int = 64,
    device: str = "cpu",
) -> Path:
    """Embed every cached video of `cache_path` (default: the run's cache) with the run; write the index.

    out_path defaults to `<run_dir>/index.zarr`. `pretrained` is only needed when the cache was
    made from a local weights file (its fingerprint keeps only the file's sha256). Returns out_path.
    """
    import zarr

    from muse_pipeline.models.checkpoint import load_run
    from muse_pipeline.stages.evaluate import check_compatible, embed_videos, open_cache

    run_dir = Path(run_dir).resolve()
    model, config = load_run(run_dir, which=which)
    if config.get("end_to_end"):
        raise ValueError(
            f"{run_dir} is an end-to-end run (CLIP fine-tuned): a cache of frozen-CLIP tokens does not "
            "describe it, so it cannot be indexed from a cache; index a run trained from the cache"
        )
    model = model.to(device).eval()
    cache_path = Path(cache_path if cache_path is not None else config["cache"]).resolve()
    cache = open_cache(cache_path)
    fp = dict(cache.fingerprint or {})
    check_compatible(config.get("fingerprint") or {}, fp, cache_path)
    missing = [k for k in ("model", "weights", "words") if k not in fp]
    if missing:
        raise ValueError(f"cache {cache_path} fingerprint lacks {missing}: cannot tell how to encode queries")
    query_pretrained = _cache_pretrained(str(fp["weights"]), pretrained)

    done = np.asarray(cache.read_done())
    rows = np.flatnonzero(done == 1)
    if rows.size == 0:
        raise ValueError(f"cache {cache_path} has no extracted videos (done == 1): nothing to index")
    emb = embed_videos(model, cache, rows, batch_size, device)
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)
    all_ids, all_paths = cache.video_ids, cache.video_paths
    ids = np.array([str(all_ids[i]) for i in rows])
    paths = np.array([str(all_paths[i]) for i in rows])

    out = Path(out_path) if out_path is not None else run_dir / "index.zarr"
    group = zarr.open_group(str(out), mode="w")
    group.create_array("embeddings", data=emb, chunks=(min(len(rows), 4096), emb.shape[1]))
    for name, values in (("ids", ids), ("paths", paths)):
        arr = group.create_array(name, shape=(len(values),), dtype=str)
        arr[...] = values
    group.attrs.update(
        {
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "run_dir": str(run_dir),
            "which": which,
            "head": config["model"]["head"],
            "cache_path": str(cache_path),
            "n_videos": int(len(rows)),
            "fingerprint": {
                "model": fp["model"],
                "pretrained": None if query_pretrained is None else str(query_pretrained),
                "weights": fp["weights"],
                "words": int(fp["words"]),
                "dim": int(emb.shape[1]),
            },
        }
    )
    _load_searcher.cache_clear()
    return out


class _Searcher:
    """An opened index with its query encoder and run model, kept for repeated queries."""

    def __init__(self, index_path: Path, device: str) -> None:
        import zarr

        from muse_pipeline.encoders.clip import ClipEncoder
        from muse_pipeline.models.checkpoint import load_run

        if not index_path.exists():
            raise FileNotFoundError(f"index {index_path} does not exist (build it with `muse index`)")
        group = zarr.open_group(str(index_path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_path} is not a muse index (format {attrs.get('format')!r})")
        fp = attrs["fingerprint"]
        self.embeddings = torch.from_numpy(np.asarray(group["embeddings"][...], dtype=np.float32))
        self.ids = [str(x) for x in np.asarray(group["ids"][...])]
        self.paths = [str(x) for x in np.asarray(group["paths"][...])]
        self.words = int(fp["words"])
        self.device = device
        self.encoder = ClipEncoder(fp["model"], pretrained=fp["pretrained"], device=device)
        if self.encoder.weights_id != fp["weights"]:
            raise ValueError(
                f"query encoder weights {self.encoder.weights_id!r} differ from the cache's {fp['weights']!r}"
            )
        self.model, _ = load_run(attrs["run_dir"], which=attrs.get("which", "best"))
        self.model = self.model.to(device).eval()

    @torch.inference_mode()
    def query(self, texts: Sequence[str]) -> torch.Tensor:
        """texts (Q) -> [Q, D] L2-normalised query embeddings."""
        ids = self.encoder.tokenize(list(texts), self.words)
        clip_emb = self.encoder.encode_texts(ids).to(self.device)
        emb = self.model.embed_texts(clip_emb).float().cpu()
        return torch.nn.functional.normalize(emb, dim=-1)


@functools.lru_cache(maxsize=2)
def _load_searcher(index_path: str, mtime: float, device: str) -> _Searcher:
    return _Searcher(Path(index_path), device)


def search(
    query: str, index_path: Path | str, top_k: int = 5, *, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Top-k videos of the index for a free-text query: [{"id", "score", "path", "rank"}], best first.

    score: cosine similarity of the run's text and video embeddings.
    """
    if not query or not query.strip():
        raise ValueError("the query is empty")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    path = Path(index_path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"index {path} does not exist (build it with `muse index`)")
    # The mtime in the key reloads an index that was rebuilt in place.
    searcher = _load_searcher(str(path), (path / "zarr.json").stat().st_mtime, device)
    q = searcher.query([query])[0]
    scores = searcher.embeddings @ q
    k = min(top_k, scores.numel())
    values, order = torch.topk(scores, k)
    return [
        {"rank": r + 1, "id": searcher.ids[i], "score": float(v), "path": searcher.paths[i]}
        for r, (v, i) in enumerate(zip(values.tolist(), order.tolist(), strict=True))
    ]


# --------------------------------------------------------------------------------------------------
# HTML


def _thumbnails(path: str, n_frames: int, height: int) -> tuple[list[str], str | None]:
    """Base64 JPEGs of up to n_frames frames spread over the video, or ([], reason) if undecodable."""
    from PIL import Image

    from muse_pipeline.video.decode import decode_clip

    try:
        frames = decode_clip(path, max_frames=n_frames)
    except Exception as exc:  # a missing or broken file still gets a row, with the reason
        return [], f"{type(exc).__name__}: {exc}"
    out = []
    for frame in np.asarray(frames):
        img = Image.fromarray(frame)
        width = max(1, round(img.width * height / max(img.height, 1)))
        img = img.resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out, None


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
.hit { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin-bottom: 0.8em; }
.meta { margin-bottom: 0.4em; } .score { font-weight: bold; } .path { color: #666; font-size: 0.9em; }
.strip img { margin-right: 4px; border-radius: 3px; } .err { color: #a00; }
"""


def write_html(
    hits: Sequence[dict[str, Any]],
    out_html: Path | str,
    *,
    query: str | None = None,
    n_frames: int = 4,
    height: int = 96,
) -> Path:
    """A self-contained HTML page (inline base64 JPEG thumbnails) of search hits. Returns its path."""
    title = f"muse search: {query}" if query else "muse search"
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if not hits:
        parts.append("<p>No results.</p>")
    for i, hit in enumerate(hits):
        thumbs, error = _thumbnails(str(hit["path"]), n_frames, height)
        strip = "".join(
            f'<img src="data:image/jpeg;base64,{b64}" alt="frame {j + 1}" height="{height}">'
            for j, b64 in enumerate(thumbs)
        )
        if error:
            strip = f'<span class="err">no preview ({html.escape(error)})</span>'
        parts.append(
            '<div class="hit"><div class="meta">'
            f'{hit.get("rank", i + 1)}. <span class="score">{float(hit["score"]):.4f}</span> '
            f"{html.escape(str(hit['id']))} "
            f'<span class="path">{html.escape(str(hit["path"]))}</span></div>'
            f'<div class="strip">{strip}</div></div>'
        )
    parts.append("</body></html>")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
