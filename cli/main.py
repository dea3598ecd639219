"""The `muse` command line (typer): one command per pipeline stage."""

from __future__ import annotations

import typer

from muse_pipeline.cli.cache import cache_app
from muse_pipeline.cli.extract import extract_cmd

app = typer.Typer(
    help="MUSE text-video retrieval: extract CLIP tokens -> train heads -> eval / index / search.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("extract")(extract_cmd)
app.add_typer(cache_app, name="cache")


@app.command("version")
def version_cmd() -> None:
    """Print the package version."""
    from muse_pipeline import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
