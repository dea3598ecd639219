"""The `muse` command line (typer): one command per pipeline stage."""

from __future__ import annotations

import typer

from muse_pipeline.cli.cache import cache_app
from muse_pipeline.cli.common import MuseGroup
from muse_pipeline.cli.evaluate import eval_cmd
from muse_pipeline.cli.extract import extract_cmd
from muse_pipeline.cli.pipeline import demo_cmd, reproduce_cmd
from muse_pipeline.cli.report import report_cmd
from muse_pipeline.cli.search import index_cmd, search_cmd, serve_cmd
from muse_pipeline.cli.train import train_cmd

app = typer.Typer(
    help="MUSE text-video retrieval: extract CLIP tokens -> train heads -> eval / index / search.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    cls=MuseGroup,
)


@app.callback()
def main_callback(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of user errors too (same as MUSE_DEBUG=1); "
        "accepted before or after the command.",
    ),
) -> None:
    """MUSE text-video retrieval: extract CLIP tokens -> train heads -> eval / index / search."""
app.command("extract")(extract_cmd)
app.command("train")(train_cmd)
app.command("eval")(eval_cmd)
app.command("index")(index_cmd)
app.command("search")(search_cmd)
app.command("serve")(serve_cmd)
app.command("report")(report_cmd)
app.command("demo")(demo_cmd)
app.command("reproduce")(reproduce_cmd)
app.add_typer(cache_app, name="cache")


@app.command("version")
def version_cmd() -> None:
    """Print the package version."""
    from muse_pipeline import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
