"""`make demo`: the whole pipeline on the built-in synthetic dataset with the tiny CLIP.

generate videos -> extract (dask, or in-process on a small CPU) -> zero-shot meanP -> train `muse` and `seqTransf`
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

import numpy as np
from rich.console import Console
from rich.table import Table

from muse_pipeline.atomic import atomic_write_text

DEMO_SEARCHES = 5  # test captions searched for in the demo's search step


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
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.metrics import rsum
    from muse_pipeline.stages.evaluate import evaluate_run, evaluate_zero_shot
    from muse_pipeline.stages.extract import run_extract
    from muse_pipeline.stages.report import write_report
    from muse_pipeline.stages.search import build_index
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

    say(f"[bold]2/6 extract[/] with {cfg.model} (random init)")
    summary = run_extract(ExtractConfig(
        dataset="synthetic", data_root=data_root, model=cfg.model, cache_dir=cfg.root / "cache",
        workers=cfg.workers, quiet=cfg.quiet,
    ))
    cache = summary.store
    t = lap("extract", t)

    say("[bold]3/6 zero-shot meanP[/] (CLIP alone, no training)")
    results = {"zero-shot meanP": evaluate_zero_shot(cache, split="test", out_dir=cfg.root / "zero-shot")}
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
    pngs = write_report(list(runs.values()), cfg.root / "report", baseline=cfg.root / "zero-shot" / "eval.json")
    t = lap("report", t)

    search_head = "muse" if "muse" in runs else next(iter(runs))
    say(f"[bold]6/6 search[/]: index every cached video with the trained {search_head} head, search for test captions")
    index_path = build_index(runs[search_head], cache, cfg.root / "index", overwrite=True).path
    searched = search_test_captions(index_path, data_root, cfg.root / "search.html")
    lap("search", t)

    table = Table(title=f"retrieval on the synthetic test split ({cfg.model}, random-init CLIP)",
                  title_justify="left", caption="RSum = R@1 + R@5 + R@10 of both directions")
    for col in ("system", "t2v R@1", "R@5", "R@10", "MdR", "v2t R@1", "R@5 ", "R@10 ", "RSum"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, result in results.items():
        t2v, v2t = result["metrics"]["t2v"], result["metrics"]["v2t"]
        if name in ("muse", "muse-transformer") and cfg.muse_overrides:
            name += " (" + ", ".join(f"{k} {v}" for k, v in cfg.muse_overrides) + ")"
        table.add_row(name, *(f"{t2v[k]:.1f}" for k in ("R1", "R5", "R10", "MdR")),
                      *(f"{v2t[k]:.1f}" for k in ("R1", "R5", "R10")), f"{rsum(result['metrics']):.1f}")
    n_test = results["zero-shot meanP"]["counts"]["videos"]
    if not cfg.quiet:
        console.print(table)
        console.print(f"chance R@1 = {100 / max(n_test, 1):.1f}% ({n_test} test videos)")
        print_searches(searched, console)
        console.print(f"report plots: {', '.join(str(p) for p in pngs)}")
        console.print(f"search page: {searched['html']}")
        console.print(f"try: muse search \"a blue square moves up\" --index {index_path} --top-k 5 "
                      f"--html {cfg.root / 'my-search.html'}   or   muse serve --index {index_path}")
        console.print(f"total {sum(timings.values()):.0f} s: " +
                      ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    out = {"results": results, "runs": {k: str(v) for k, v in runs.items()}, "report": [str(p) for p in pngs],
           "search": searched, "seconds": timings}
    atomic_write_text(cfg.root / "demo.json", json.dumps(out, indent=2, default=str))
    return out


def _test_captions(data_root: Path, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """((video id, caption) of n test videos spread over the test split, the same of every test video);
    each video with its first caption."""
    from muse_pipeline.data import load_dataset

    index = load_dataset("synthetic", data_root)
    first: dict[int, str] = {}
    for caption in index.captions:
        if caption.split == "test":
            first.setdefault(caption.video_index, caption.text)
    rows = sorted(first)
    pick = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, min(n, len(rows)))] if rows else []
    return [(index.videos[r].id, first[r]) for r in pick], [(index.videos[r].id, first[r]) for r in rows]


def search_test_captions(index_path: Path, data_root: Path, html_path: Path, n: int = DEMO_SEARCHES) -> dict:
    """Search for test captions and report where each caption's own video ranks among all indexed videos.

    With a randomly initialised CLIP, words carry no meaning of their own: what the trained head
    learned is a mapping of this CLIP's text embeddings of the synthetic captions; ranks say how well.
    """
    from muse_pipeline.search.html import write_html
    from muse_pipeline.search.query import RANDOM_INIT_NOTE, Searcher

    searcher = Searcher(index_path)
    shown, every = _test_captions(data_root, n)
    n_indexed = len(searcher.index)
    searches = []
    for video_id, caption in shown:
        hits = searcher.search([caption], top_k=3)[0]
        searches.append({"query": caption, "video": video_id, "rank": searcher.rank_of(caption, video_id),
                         "hits": hits})
    # Every test caption at once: the distribution of its own video's rank.
    q = searcher.encoder.encode([c for _, c in every])
    scores = q @ np.asarray(searcher.index.embeddings).T
    own = np.array([searcher.index.row_of(v) for v, _ in every])
    ranks = (scores >= scores[np.arange(len(own)), own][:, None]).sum(1)
    note = RANDOM_INIT_NOTE if searcher.index.random_init else None
    first = searches[0]
    html = write_html(first["hits"], html_path, query=first["query"], note=note, extra_rows=[
        f"The video this caption describes ({first['video']}) ranks {first['rank']} of {n_indexed} indexed videos.",
        f"Over all {len(every)} test captions, the own video's median rank is {np.median(ranks):g} of "
        f"{n_indexed} (chance: {(n_indexed + 1) / 2:g}); top 10 for {100 * np.mean(ranks <= 10):.0f}% of them.",
    ])
    return {"index": str(index_path), "n_indexed": n_indexed, "searches": searches, "html": str(html),
            "test_captions": len(every), "median_rank": float(np.median(ranks)),
            "top10_percent": float(100 * np.mean(ranks <= 10)), "random_init": searcher.index.random_init,
            "note": note}


def print_searches(searched: dict, console: Console) -> None:
    n = searched["n_indexed"]
    table = Table(title=f"search for test captions among {n} indexed videos (the caption's own video: its rank)",
                  title_justify="left")
    for col in ("query (a test caption)", "own video", "rank", "top 3 hits (id: its caption)"):
        table.add_column(col, justify="right" if col == "rank" else "left")
    for s in searched["searches"]:
        top = "\n".join(f"{h['id']}: {h['caption'] or ''}" for h in s["hits"])
        table.add_row(s["query"], s["video"], f"{s['rank']} of {n}", top)
    console.print(table)
    console.print(f"over all {searched['test_captions']} test captions: own video median rank "
                  f"{searched['median_rank']:g} of {n} (chance {(n + 1) / 2:g}), in the top 10 for "
                  f"{searched['top10_percent']:.0f}%")
    if searched["note"]:
        console.print(f"[yellow]note:[/] {searched['note']}", soft_wrap=True, highlight=False)
