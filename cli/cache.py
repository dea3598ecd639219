"""`muse cache info|export`: inspect a feature cache, or export it to HDF5."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from muse_pipeline.cli.common import console, fail, print_failures, print_warnings

cache_app = typer.Typer(help="Inspect or export a feature cache.", no_args_is_help=True)


def _require_store(path: Path) -> None:
    """One `error:` line unless `path` is a muse feature cache (checked before anything is written)."""
    from muse_pipeline.cache.store import FeatureCache

    if not path.exists():
        fail(f"no cache at {path}")
    try:
        FeatureCache.open(path, mode="r")
    except (ValueError, KeyError, OSError) as exc:
        fail(f"{path} is not a readable muse cache: {exc}")


@cache_app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="A .zarr store written by `muse extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON.", show_default="off"),
) -> None:
    """Counts per split, cached / failed / pending videos, size on disk, fingerprint, failures."""
    from rich.table import Table

    from muse_pipeline.cache.export import cache_info

    _require_store(path)
    try:
        info = cache_info(path)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        fail(f"{path} is not a readable muse cache: {exc}")
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    table = Table(title=str(path), title_justify="left", show_header=False)
    for key, value in info.items():
        if key in ("fingerprint", "failures", "warnings", "failure_history", "generations"):
            continue
        table.add_row(key, json.dumps(value, default=str) if isinstance(value, dict | list) else str(value))
    if info.get("generations"):
        latest = info["generations"][-1]
        table.add_row("generations", f"{len(info['generations'])}; latest: rows {latest['rows']}, {latest['new']} new, "
                      f"{latest['changed']} changed, {latest['removed']} removed, {latest['unchanged']} unchanged")
    console.print(table)
    fp = Table(title="fingerprint", title_justify="left", show_header=False)
    for key, value in info.get("fingerprint", {}).items():
        fp.add_row(key, str(value))
    console.print(fp)
    if info.get("failures"):
        print_failures(info["failures"])
    if info.get("warnings"):
        print_warnings(info["warnings"])
    if info.get("failure_history"):
        console.print(f"{len(info['failure_history'])} earlier failure record(s) of retried videos: "
                      "`muse cache info --json` lists them")


@cache_app.command("export")
def export_cmd(
    path: Path = typer.Argument(..., help="A .zarr store written by `muse extract`."),
    out: Path = typer.Option(None, help="Output file.", show_default="the store path with .h5"),
    format: str = typer.Option("hdf5", "--format", help="Only hdf5 for now."),
) -> None:
    """Write the same arrays (same names, attributes) to one HDF5 file."""
    from muse_pipeline.cache.export import export_hdf5

    _require_store(path)
    if format.lower() not in ("hdf5", "h5"):
        fail(f"unknown export format {format!r}; supported: hdf5")
    target = out or path.with_suffix(".h5")
    try:
        export_hdf5(path, target)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}; choose another --out")
    console.print(f"wrote {target}")
