"""eval.json / eval.md and the terminal table of an evaluation result (the dict `score.evaluate_cached`
and the evaluate stage build)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from muse_pipeline.atomic import atomic_write_text
from muse_pipeline.evaluation.score import T2V_RULE, V2T_RULE
from muse_pipeline.metrics import rsum


def eval_file_name(split: str) -> str:
    """Stem of an evaluation's files: "eval" for the test split, "eval-<split>" otherwise."""
    return "eval" if split == "test" else f"eval-{split}"


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
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")  # `muse report` reads it
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, eval_markdown(result))
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
