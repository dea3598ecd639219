"""The `muse` command line (typer)."""

import typer

app = typer.Typer(help="MUSE text-video retrieval pipeline: extract -> train -> eval / search.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the package version."""
    from muse_pipeline import __version__

    typer.echo(__version__)
