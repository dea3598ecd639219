"""`make demo`: the whole pipeline on the built-in synthetic dataset with the tiny CLIP.

generate videos -> extract (dask LocalCluster) -> zero-shot meanP -> train `muse` and `seqTransf`
from the cache -> evaluate -> one comparison table -> report plots -> a search example.

The tiny CLIP is randomly initialised (nothing can be downloaded here), so its zero-shot score is
chance: what the demo shows is the pipeline, and that a trained head learns the synthetic captions.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_QUERY = "a red circle moves from left to right"


@dataclass(frozen=True)
class DemoConfig:
    root: Path = Path("demo")
    n_videos: int = 192
    model: str = "muse-tiny"
    heads: tuple[str, ...] = ("muse", "seqTransf")
    # The paper's muse head (4 blocks, d_state 16, expand 1): affordable on 2 CPU cores since the fused
    # numba scan (issue 11). Overrides here (e.g. (("depth", 1),)) shrink it and label the table row.
    muse_overrides: tuple[tuple[str, int], ...] = ()
    epochs: int | None = None  # None: the synthetic preset
    workers: int | None = None  # extraction workers (None: sized to the machine)
    fresh: bool = False  # delete an earlier demo folder first
    quiet: bool = False


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    from muse_pipeline.data.synthetic import generate_synthetic
    from muse_pipeline.stages.evaluate import evaluate_run, evaluate_zero_shot
    from muse_pipeline.stages.extract import ExtractConfig, run_extract
    from muse_pipeline.stages.report import write_report
    from muse_pipeline.stages.search import build_index, search, write_html
    from muse_pipeline.stages.train import run_train

    console = console or Console()
    say = (lambda *a: None) if cfg.quiet else console.print
    if cfg.fresh and cfg.root.exists():
        shutil.rmtree(cfg.root)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = time.perf_counter() - since
        return time.perf_counter()

    say(f"[bold]1/6 synthetic dataset[/] -> {cfg.root / 'data'} ({cfg.n_videos} videos)")
    data_root = generate_synthetic(cfg.root / "data", n_videos=cfg.n_videos, seed=0)
    t = lap("generate", t0)

    say(f"[bold]2/6 extract[/] with {cfg.model} (random init) on a dask LocalCluster")
    summary = run_extract(ExtractConfig(
        dataset="synthetic", data_root=data_root, model=cfg.model, cache_dir=cfg.root / "cache",
        workers=cfg.workers, quiet=cfg.quiet,
    ))
    cache = summary.store
    t = lap("extract", t)

    say("[bold]3/6 zero-shot meanP[/] (CLIP alone, no training)")
    results = {"zero-shot meanP": evaluate_zero_shot(cache, split="test")}
    t = lap("zero-shot", t)

    runs: dict[str, Path] = {}
    for head in cfg.heads:
        say(f"[bold]4/6 train[/] the {head} head from the cache")
        previous = cfg.root / "runs" / f"synthetic-{head}"
        if (previous / "config.json").exists():
            run_dir = run_train(resume=previous, quiet=cfg.quiet)
        else:
            overrides = dict(cfg.muse_overrides) if head in ("muse", "muse-transformer") else None
            run_dir = run_train(from_cache=cache, head=head, name=f"synthetic-{head}",
                                runs_dir=cfg.root / "runs", epochs=cfg.epochs, quiet=cfg.quiet,
                                num_workers=0, model_overrides=overrides)
        runs[head] = Path(run_dir)
        results[head] = evaluate_run(run_dir, split="test")
        t = lap(f"train+eval {head}", t)

    say("[bold]5/6 report[/]")
    pngs = write_report(list(runs.values()), cfg.root / "report")
    t = lap("report", t)

    say(f"[bold]6/6 search[/] over the cached videos with the trained muse head: {DEMO_QUERY!r}")
    search_head = "muse" if "muse" in runs else next(iter(runs))
    index_path = build_index(runs[search_head], cache, cfg.root / "index.zarr")
    hits = search(DEMO_QUERY, index_path, top_k=5)
    html = write_html(hits, cfg.root / "search.html", query=DEMO_QUERY)
    lap("search", t)

    table = Table(title=f"text -> video on the synthetic test split ({cfg.model}, random-init CLIP)",
                  title_justify="left")
    for col in ("system", "R@1", "R@5", "R@10", "MdR", "MnR"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, result in results.items():
        m = result["metrics"]["t2v"]
        if name in ("muse", "muse-transformer") and cfg.muse_overrides:
            name += " (" + ", ".join(f"{k} {v}" for k, v in cfg.muse_overrides) + ")"
        table.add_row(name, *(f"{m[k]:.1f}" for k in ("R1", "R5", "R10", "MdR", "MnR")))
    n_test = results["zero-shot meanP"]["counts"]["videos"]
    hits_table = Table(title=f"search: {DEMO_QUERY!r}", title_justify="left")
    for col in ("rank", "video", "score", "caption"):
        hits_table.add_column(col)
    captions = _captions_by_video(data_root)
    for rank, hit in enumerate(hits, 1):
        hits_table.add_row(str(rank), hit["id"], f"{hit['score']:.3f}", captions.get(hit["id"], ""))
    if not cfg.quiet:
        console.print(table)
        console.print(f"chance R@1 = {100 / max(n_test, 1):.1f}% ({n_test} test videos)")
        console.print(hits_table)
        console.print(f"report plots: {', '.join(str(p) for p in pngs)}")
        console.print(f"search page: {html}")
        console.print(f"try: muse search \"a blue square moves up\" --index {index_path} --top-k 5 "
                      f"--html {cfg.root / 'my-search.html'}")
        console.print(f"total {sum(timings.values()):.0f} s: " +
                      ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    out = {"results": results, "runs": {k: str(v) for k, v in runs.items()}, "report": [str(p) for p in pngs],
           "search": {"query": DEMO_QUERY, "hits": hits, "html": str(html)}, "seconds": timings}
    (cfg.root / "demo.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def _captions_by_video(data_root: Path) -> dict[str, str]:
    from muse_pipeline.data import load_dataset

    index = load_dataset("synthetic", data_root)
    captions: dict[str, str] = {}
    for caption in index.captions:
        captions.setdefault(index.videos[caption.video_index].id, caption.text)
    return captions
