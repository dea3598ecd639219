"""`muse eval`: retrieval metrics of a trained run (or of zero-shot CLIP on a cache)."""

from __future__ import annotations

from pathlib import Path

import typer

from muse_pipeline.cli.common import console, fail


def eval_cmd(
    run_dir: Path = typer.Argument(None, help="Run directory of `muse train` (omit with --zero-shot)."),
    split: str = typer.Option("test", help="Split of the cache to evaluate (model selection used val)."),
    dsl: bool = typer.Option(
        False, "--dsl", help="Also report dual-softmax post-processed numbers (labelled as such).",
        show_default="off",
    ),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    which: str = typer.Option("best", help="Weights to evaluate: best (validation) or last."),
    cache: Path = typer.Option(
        None, help="Feature cache to evaluate on (required with --zero-shot).",
        show_default="the run's own cache",
    ),
    zero_shot: bool = typer.Option(
        False, "--zero-shot", help="Parameter-free CLIP meanP on the cache: no run needed.", show_default="off"
    ),
    out: Path = typer.Option(
        None, help="Folder for eval.json / eval.md (with --zero-shot; a run writes into its own folder).",
        show_default="the run directory; none with --zero-shot",
    ),
    batch_size: int = typer.Option(64, help="Videos / texts per forward pass (count)."),
) -> None:
    """Embed every video and text of the split once, then score R@1/5/10, MdR, MnR and RSum both ways.

    Writes eval.json (with per-query ranks) and eval.md into the run directory (eval-<split>.* for a split other than test).
    """
    from muse_pipeline.evaluation.tables import eval_file_name, print_eval
    from muse_pipeline.stages.evaluate import evaluate_run, evaluate_zero_shot

    try:
        if zero_shot:
            if run_dir is not None:
                fail("--zero-shot evaluates CLIP itself: give --cache, not a run directory")
            if cache is None:
                fail("--zero-shot needs --cache STORE")
            result = evaluate_zero_shot(cache, split=split, out_dir=out, dsl=dsl, batch_size=batch_size)
        else:
            if run_dir is None:
                fail("give a run directory (or --zero-shot --cache STORE)")
            result = evaluate_run(
                run_dir,
                split=split,
                dsl=dsl,
                device=device,
                which=which,
                cache_path=cache,
                batch_size=batch_size,
            )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    print_eval(result, console)
    where = run_dir if not zero_shot else out
    if where is not None:
        name = eval_file_name(split)
        console.print(f"wrote {Path(where) / (name + '.json')} and {name}.md")
