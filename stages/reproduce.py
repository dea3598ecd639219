"""One-command reproduction: extract -> train -> eval on a real benchmark, and a results page.

`make reproduce-msrvtt` (and -didemo, -activitynet) call `muse reproduce DATASET`. The page
`results/<dataset>.md` puts our numbers beside the published ones of spec section 10 with the
difference, the full recipe, and the protocol that produced each number (model selection on
validation, the refit on all training videos, DSL or not), so that a reader can tell a
reproduction from a smoke run.

Protocol (spec section 7): the selection run picks its epoch on validation (DiDeMo's val split, a
held-out 5% of the training videos elsewhere), never on test. With refit (the default where the
validation set is a held-out slice of train, i.e. MSR-VTT and ActivityNet), the recipe is trained
again on ALL training videos for the selected number of epochs (MSR-VTT: all 180,000 pairs); that
refit model is the headline number, the selection model is reported beside it.

The published numbers are `muse_pipeline.reproduce.published`, the page is
`muse_pipeline.reproduce.results_page`; this stage checks the data, runs the stages in order and
writes the page and its JSON.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from muse_pipeline.atomic import atomic_write_text
from muse_pipeline.config import preset
from muse_pipeline.data import AnnotationError, load_dataset
from muse_pipeline.errors import UserError
from muse_pipeline.reproduce.published import WHERE_TO_GET
from muse_pipeline.reproduce.results_page import results_markdown, run_row


class DataMissing(UserError, RuntimeError):
    """The benchmark's files are absent; the message says where to get them and how to lay them out."""


@dataclass(frozen=True)
class ReproduceConfig:
    dataset: str
    data_root: Path
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    head: str = "muse"
    frames: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    end_to_end: bool | None = None  # None: end to end when a GPU is present
    refit: bool | None = None  # None: refit where validation is a held-out slice of train (preset val_fraction > 0)
    device: str | None = None  # None: cuda when available
    workers: int | None = None
    cache_dir: Path = Path("cache")
    runs_dir: Path = Path("runs")
    results_dir: Path = Path("results")
    quiet: bool = False


def check_data(dataset: str, root: Path) -> None:
    if dataset not in WHERE_TO_GET:
        raise ValueError(f"no reproduction recipe for {dataset!r}; known: {', '.join(sorted(WHERE_TO_GET))}")
    if not Path(root).exists():
        raise DataMissing(f"{root} does not exist.\n{WHERE_TO_GET[dataset]}")
    try:
        index = load_dataset(dataset, root)
    except (AnnotationError, FileNotFoundError) as exc:
        raise DataMissing(f"{exc}\n{WHERE_TO_GET[dataset]}") from exc
    present = sum(Path(v.path).exists() for v in index.videos)
    if present == 0:
        raise DataMissing(
            f"annotations found under {root} but none of the {len(index.videos)} videos.\n"
            f"{WHERE_TO_GET[dataset]}"
        )


def default_refit(dataset: str) -> bool:
    """Refit by default where model selection holds training videos out (MSR-VTT, ActivityNet)."""
    return preset(dataset).val_fraction > 0


def run_reproduce(cfg: ReproduceConfig) -> Path:
    """extract -> train (selection run, then refit) -> eval; returns the path of the results page."""
    import torch

    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.models.checkpoint import read_run_config
    from muse_pipeline.stages.evaluate import evaluate_run, evaluate_zero_shot
    from muse_pipeline.stages.extract import run_extract
    from muse_pipeline.stages.train import run_train

    check_data(cfg.dataset, cfg.data_root)
    cuda = torch.cuda.is_available()
    device = cfg.device or ("cuda" if cuda else "cpu")
    end_to_end = cfg.end_to_end if cfg.end_to_end is not None else device == "cuda"
    frames = cfg.frames or preset(cfg.dataset).frames
    refit = default_refit(cfg.dataset) if cfg.refit is None else cfg.refit

    extract_cfg = ExtractConfig(
        dataset=cfg.dataset,
        data_root=cfg.data_root,
        model=cfg.model,
        pretrained=cfg.pretrained or None,
        frames=frames,
        device=device,
        workers=cfg.workers,
        cache_dir=cfg.cache_dir,
        quiet=cfg.quiet,
    )
    summary = run_extract(extract_cfg)
    cache = summary.store
    zero_shot = evaluate_zero_shot(cache, split="test")
    run_name = f"{cfg.dataset}-{cfg.head}-{cfg.model}-{frames}f"
    if end_to_end:
        source = dict(end_to_end=True, dataset=cfg.dataset, data_root=cfg.data_root, model=cfg.model,
                      pretrained=cfg.pretrained or None, frames=frames)
    else:
        source = dict(from_cache=cache)
    selection = cfg.runs_dir / run_name
    if (selection / "config.json").exists():
        # an earlier reproduce run of the same recipe: continue it (a finished one has nothing left)
        last = run_train(resume=selection, device=device, quiet=cfg.quiet, refit=refit)
    else:
        last = run_train(
            **source, head=cfg.head, name=run_name, runs_dir=cfg.runs_dir, device=device, quiet=cfg.quiet,
            epochs=cfg.epochs, batch_size=cfg.batch_size, refit=refit,
        )
    rows = [("selection", selection, evaluate_run(selection, split="test", device=device))]
    if refit:
        rows.append(("refit", last, evaluate_run(last, split="test", device=device, which="last")))
    reported = rows[-1][1]
    config = read_run_config(reported)
    settings = {
        "dataset": cfg.dataset,
        "data_root": str(cfg.data_root),
        "model": cfg.model,
        "pretrained": cfg.pretrained or "random init (NOT a reproduction)",
        "frames": frames,
        "head": cfg.head,
        "epochs": config["train"]["epochs"],
        "batch_size": config["train"]["batch_size"],
        "mode": "end to end (CLIP in the loop)" if end_to_end else "from the feature cache (CLIP frozen)",
        "device": device,
        "cache": str(cache),
        "run_dir": str(reported),
        "videos": f"{summary.n_cached} cached, {summary.n_failed} failed",
        "machine": f"{platform.node()} ({platform.machine()}), torch {torch.__version__}",
    }
    ours = [run_row(kind, path, result) for kind, path, result in rows]
    page = results_markdown(cfg.dataset, zero_shot, ours, settings)
    out = cfg.results_dir / f"{cfg.dataset}.md"
    atomic_write_text(out, page)
    atomic_write_text(cfg.results_dir / f"{cfg.dataset}.json", json.dumps(
        {"settings": settings, "zero_shot": zero_shot, "trained": rows[-1][2],
         "runs": [{k: v for k, v in r.items() if k != "config"} for r in ours]},
        indent=2, default=str,
    ))
    return out
