"""`muse index`, `muse search` and `muse serve`: text-to-video search over indexed videos."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from muse_pipeline.cli.common import console, err_console
from muse_pipeline.errors import InputError
from muse_pipeline.search.limits import DEFAULT_K, check_k
from muse_pipeline.search.topk import APPROX_THRESHOLD


def index_cmd(
    run_dir: Path = typer.Argument(
        None, help="Run directory of `muse train` (its head and text side go into the index). Without a "
        "run: a zero-shot CLIP index (mean of each video's frame embeddings; needs --cache and --out).",
        show_default="none: zero-shot CLIP",
    ),
    cache: Path = typer.Option(
        None, help="Feature cache whose videos to index (another cache than the run's needs the same CLIP "
        "model and weights).", show_default="the run's own cache",
    ),
    out: Path = typer.Option(None, help="Index folder to write or update.", show_default="<run_dir>/index"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an index of another run, cache or CLIP (or a damaged one) "
        "and embed every video again.", show_default="off: update an index of the same run and cache",
    ),
    exact: bool = typer.Option(
        False, "--exact", help="Always score every video; no approximate (faiss) index, whatever the size.",
        show_default=f"off: approximate from {APPROX_THRESHOLD:,} videos",
    ),
    pretrained: str = typer.Option(
        None, help="CLIP weights file, only if the cache was made from a local file that moved "
        "(its sha256 is checked).", show_default="the file or tag named by the cache",
    ),
    which: str = typer.Option("best", help="Run weights: best (validation) or last."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    batch_size: int = typer.Option(64, help="Videos per forward pass (count)."),
) -> None:
    """Embed every cached video once; publish a self-contained index for `muse search` / `muse serve`.

    The folder holds the video embeddings, ids, source paths, moments (clip windows), captions, and the text side (CLIP model and weights, the run's text adapter): it keeps working when moved or copied. Run again on the same folder after `muse extract` picked up new, changed or removed files: it publishes a new generation, embedding only the new videos (a running `muse serve` switches to it).
    """
    from muse_pipeline.search.generations import generation_folder
    from muse_pipeline.search.index_format import read_meta
    from muse_pipeline.stages.search import build_index

    built = build_index(run_dir, cache, out, pretrained=pretrained, which=which, batch_size=batch_size,
                        device=device, exact=exact, overwrite=overwrite)
    for note in built.notes:
        err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True, highlight=False)
    if not built.published:
        console.print(f"index {built.path} is up to date ({built.generation}, {built.n_videos} videos): "
                      "nothing new, changed or removed in the cache", soft_wrap=True)
        return
    # index.json alone: opening the generation would read every embedding just written back in.
    search = read_meta(generation_folder(built.path, built.generation))["search"]
    params = ", ".join(f"{k} {v}" for k, v in search["params"].items())
    kind = search["kind"] + (f"; {params}" if params else "")
    faiss = {"none": "exact search, no faiss index", "updated": "faiss index updated (new rows added)",
             "rebuilt": "faiss index rebuilt"}[built.faiss]
    console.print(f"indexed {built.n_videos} videos -> {built.path} ({built.generation}: {built.added} embedded, "
                  f"{built.kept} copied, {built.removed} removed; {faiss})"
                  + ("" if search["kind"] == "exact" else f" (search: {kind})"), soft_wrap=True)


def _read_queries(path: Path) -> list[str]:
    if str(path) == "-":
        lines = sys.stdin.read().splitlines()
    else:
        if not path.is_file():
            raise InputError(f"queries file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"queries file {path} is not UTF-8 text; give one query per line") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise InputError(f"queries file {path} has no non-empty line")
    return queries


def search_cmd(
    query: str = typer.Argument(None, help="What to look for, in words (or give --queries FILE)."),
    index: Path = typer.Option(..., help="Index folder written by `muse index`."),
    top_k: int = typer.Option(DEFAULT_K, "--top-k", "-k", help="Hits per query (count; files with --group)."),
    queries: Path = typer.Option(
        None, help="File with one query per line ('-': standard input); embedded in batches.",
        show_default="only QUERY",
    ),
    group: bool = typer.Option(
        False, "--group", "--per-video", help="One entry per video file (the best K files), each with its "
        "matching moments, best first.", show_default="off: one entry per moment",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON lines instead of a table: one object per hit "
        "(query, rank, id, source, path, start, end, score, caption, missing; start/end in seconds); with "
        "--group one per file (query, rank, source, path, score, missing, moments).",
        show_default="off: a table",
    ),
    html: Path = typer.Option(None, help="Also write a self-contained HTML page with thumbnails and a "
                              "player at each moment.", show_default="no page"),
    exact: bool = typer.Option(False, "--exact", help="Score every video even if the index is approximate.",
                               show_default="off: the index's own search"),
    pretrained: str = typer.Option(None, help="CLIP weights file to use instead of the one the index names.",
                                   show_default="the index's"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Rank the indexed moments against text queries (cosine similarity of the index's embeddings).

    Each hit is a moment of a video file (start-end seconds; the whole file for short clips). A hit whose file no longer exists is kept and marked missing.
    """
    from muse_pipeline.search.query import RANDOM_INIT_NOTE, Searcher

    if query is None and queries is None:
        raise InputError("give a QUERY or --queries FILE")
    texts = ([query] if query is not None else []) + (_read_queries(queries) if queries is not None else [])
    check_k(top_k, "--top-k")
    searcher = Searcher(index, device=device, pretrained=pretrained)
    if group:
        grouped = searcher.search_grouped(texts, top_k, exact=exact)
        results = [[m for g in groups for m in g["moments"]] for groups in grouped]
    else:
        results = searcher.search(texts, top_k, exact=exact)
    if searcher.index.random_init:
        err_console.print(f"[yellow]note:[/] {RANDOM_INIT_NOTE}", soft_wrap=True, highlight=False)
    if as_json:
        for text, items in zip(texts, grouped if group else results, strict=True):
            for item in items:
                sys.stdout.write(json.dumps({"query": text, **item}, ensure_ascii=False) + "\n")
    elif group:
        _print_groups(texts, grouped)
    else:
        _print_hits(texts, results)
    if html is not None:
        from muse_pipeline.search.html import write_html  # thumbnails: PyAV, PIL; only for a page

        note = RANDOM_INIT_NOTE if searcher.index.random_init else None
        page = write_html(results[0], html, query=texts[0], note=note)
        (err_console if as_json else console).print(f"wrote {page}")


def _file_cell(hit: dict) -> str:
    return hit["path"] + (" (missing)" if hit.get("missing") else "")


def _print_hits(texts: list[str], results: list[list[dict]]) -> None:
    from rich.table import Table

    from muse_pipeline.search.moments import moment_label

    for text, hits in zip(texts, results, strict=True):
        table = Table(title=f"top {len(hits)} for {text!r}", title_justify="left")
        for col in ("#", "score", "moment", "id", "caption", "file"):
            table.add_column(col, justify="right" if col in ("#", "score") else "left")
        for hit in hits:
            table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", moment_label(hit["start"], hit["end"]),
                          hit["id"], hit["caption"] or "", _file_cell(hit))
        console.print(table)


def _print_groups(texts: list[str], grouped: list[list[dict]]) -> None:
    from rich.table import Table

    from muse_pipeline.search.moments import moment_label

    for text, groups in zip(texts, grouped, strict=True):
        table = Table(title=f"top {len(groups)} files for {text!r}", title_justify="left")
        for col in ("#", "best", "file", "moments (score)"):
            table.add_column(col, justify="right" if col in ("#", "best") else "left")
        for g in groups:
            moments = ", ".join(f"{moment_label(m['start'], m['end'])} ({m['score']:.3f})" for m in g["moments"])
            table.add_row(str(g["rank"]), f"{g['score']:.4f}", _file_cell(g), moments)
        console.print(table)


def serve_cmd(
    index: Path = typer.Option(..., help="Index folder written by `muse index`."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; the default answers this machine only."),
    port: int = typer.Option(8080, help="TCP port."),
    pretrained: str = typer.Option(None, help="CLIP weights file to use instead of the one the index names.",
                                   show_default="the index's"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Serve a search page and a JSON API over an index (loads the index and CLIP once).

    The server follows the index: when `muse index` publishes a new generation into the folder, the server loads it in the background and answers from it, without a restart. GET /health reports the generation and size.
    """
    from muse_pipeline.search.query import RANDOM_INIT_NOTE
    from muse_pipeline.stages.serve import serve

    if not 0 < port < 65536:
        raise InputError(f"--port must be in 1..65535, got {port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]note:[/] binding {host}: other machines can query this index and "
                          "download its videos", soft_wrap=True)

    def ready(live) -> None:
        index = live.current().index
        console.print(f"serving {len(index)} moments of {live.root} ({index.generation}; a new generation "
                      f"from `muse index` is picked up live) at http://{host}:{port}/ (Ctrl-C stops)", soft_wrap=True)
        if index.random_init:
            err_console.print(f"[yellow]note:[/] {RANDOM_INIT_NOTE}", soft_wrap=True, highlight=False)

    serve(str(index), host=host, port=port, device=device, pretrained=pretrained, on_ready=ready)
