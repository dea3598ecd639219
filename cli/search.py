"""`muse index` and `muse search`: text-to-video search over cached videos with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from muse_pipeline.cli.common import console, fail


def index_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory of `muse train`."),
    cache: Path = typer.Option(None, help="Cache whose videos to index (default: the run's own cache)."),
    out: Path = typer.Option(None, help="Index store (default: <run_dir>/index.zarr)."),
    pretrained: str = typer.Option(
        None, help="CLIP weights file, only if the cache was made from a local file (its sha256 is checked)."
    ),
    which: str = typer.Option("best", help="Weights: best or last."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    batch_size: int = typer.Option(64, help="Videos per forward pass."),
) -> None:
    """Embed every cached video once and store the embeddings for `muse search`."""
    from muse_pipeline.stages.search import build_index

    try:
        path = build_index(
            run_dir, cache, out, pretrained=pretrained, which=which, batch_size=batch_size, device=device
        )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    import zarr

    n = zarr.open_group(str(path), mode="r").attrs["n_videos"]
    console.print(f"indexed {n} videos -> {path}")


def search_cmd(
    query: str = typer.Argument(..., help="What to look for, in words."),
    index: Path = typer.Option(..., help="Index store written by `muse index`."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Number of results."),
    html: Path = typer.Option(None, help="Also write a self-contained HTML page with thumbnails."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Rank the indexed videos against a text query (cosine similarity of trained embeddings)."""
    from rich.table import Table

    from muse_pipeline.stages.search import search, write_html

    try:
        hits = search(query, index, top_k=top_k, device=device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    table = Table(title=f"top {len(hits)} for {query!r}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("id")
    table.add_column("file")
    for hit in hits:
        table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", hit["id"], hit["path"])
    console.print(table)
    if html is not None:
        console.print(f"wrote {write_html(hits, html, query=query)}")
