"""One-command reproduction: extract -> train -> eval on a real benchmark, and a results page.

`make reproduce-msrvtt` (and -didemo, -activitynet) call `muse reproduce DATASET`. The page
`results/<dataset>.md` puts our numbers beside the published ones of spec section 10, with every
setting used, so that a reader can tell a reproduction from a smoke run.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

from muse_pipeline.config import preset
from muse_pipeline.data import AnnotationError, load_dataset
from muse_pipeline.errors import UserError

# Spec section 10 (ViT-B/32, text -> video).
PUBLISHED: dict[str, list[tuple[str, dict[str, float]]]] = {
    "msrvtt": [
        ("CLIP zero-shot", {"R1": 31.1, "R5": 53.7, "R10": 63.4, "MdR": 4, "MnR": 41.6}),
        ("CLIP4Clip meanP", {"R1": 43.1, "R5": 70.4, "R10": 80.8, "MdR": 2, "MnR": 16.2}),
        ("CLIP4Clip seqTransf", {"R1": 44.5, "R5": 71.4, "R10": 81.6, "MdR": 2, "MnR": 15.3}),
        ("MUSE released log (best epoch)", {"R1": 44.8, "R5": 71.6, "R10": 82.1, "MdR": 2, "MnR": 15.6}),
    ],
    "didemo": [("CLIP4Clip meanP", {"R1": 43.4})],
    "activitynet": [("CLIP4Clip meanP", {"R1": 40.5})],
}

WHERE_TO_GET = {
    "msrvtt": """MSR-VTT is not here. Get the videos and the CLIP4Clip split files
(MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv; see the CLIP4Clip repository's data
instructions) and lay them out as:
  $MSRVTT_ROOT/MSRVTT_data.json
  $MSRVTT_ROOT/MSRVTT_train.9k.csv
  $MSRVTT_ROOT/MSRVTT_JSFUSION_test.csv
  $MSRVTT_ROOT/videos/all/video0.mp4 ... video9999.mp4   (or videos/ or the root itself)
then run: make reproduce-msrvtt MSRVTT_ROOT=/path/to/msrvtt""",
    "didemo": """DiDeMo is not here. Get the videos and the annotation files (LocalizingMoments
repository: train_data.json, val_data.json, test_data.json) plus the split lists
{train,val,test}_list.txt (CLIP4Clip data instructions), laid out as:
  $DIDEMO_ROOT/{train,val,test}_data.json
  $DIDEMO_ROOT/{train,val,test}_list.txt
  $DIDEMO_ROOT/videos/<video id>[.<ext>]
then run: make reproduce-didemo DIDEMO_ROOT=/path/to/didemo""",
    "activitynet": """ActivityNet Captions is not here. Get the ActivityNet videos and the captions
(train.json, val_1.json from the ActivityNet Captions release), laid out as:
  $ACTIVITYNET_ROOT/train.json
  $ACTIVITYNET_ROOT/val_1.json
  $ACTIVITYNET_ROOT/videos/v_XXXXXXXXXXX.mp4   (or XXXXXXXXXXX.<ext>)
then run: make reproduce-activitynet ACTIVITYNET_ROOT=/path/to/activitynet""",
}


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


def run_reproduce(cfg: ReproduceConfig) -> Path:
    """extract -> train -> eval; returns the path of the results page."""
    import torch

    from muse_pipeline.stages.evaluate import evaluate_run, evaluate_zero_shot
    from muse_pipeline.stages.extract import ExtractConfig, run_extract
    from muse_pipeline.stages.train import run_train

    check_data(cfg.dataset, cfg.data_root)
    cuda = torch.cuda.is_available()
    device = cfg.device or ("cuda" if cuda else "cpu")
    end_to_end = cfg.end_to_end if cfg.end_to_end is not None else device == "cuda"
    frames = cfg.frames or preset(cfg.dataset).frames

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
    previous = cfg.runs_dir / run_name
    if (previous / "config.json").exists():
        # an earlier reproduce run of the same recipe: continue it (a finished one has nothing left)
        run_dir = run_train(resume=previous, device=device, quiet=cfg.quiet)
    else:
        run_dir = run_train(
            **source, head=cfg.head, name=run_name, runs_dir=cfg.runs_dir, device=device, quiet=cfg.quiet,
            epochs=cfg.epochs, batch_size=cfg.batch_size,
        )
    result = evaluate_run(run_dir, split="test", device=device)
    settings = {
        "dataset": cfg.dataset,
        "data_root": str(cfg.data_root),
        "model": cfg.model,
        "pretrained": cfg.pretrained or "random init (NOT a reproduction)",
        "frames": frames,
        "head": cfg.head,
        "epochs": cfg.epochs or preset(cfg.dataset).epochs,
        "batch_size": cfg.batch_size or preset(cfg.dataset).batch_size,
        "mode": "end to end (CLIP in the loop)" if end_to_end else "from the feature cache (CLIP frozen)",
        "device": device,
        "cache": str(cache),
        "run_dir": str(run_dir),
        "videos": f"{summary.n_cached} cached, {summary.n_failed} failed",
        "machine": f"{platform.node()} ({platform.machine()}), torch {torch.__version__}",
    }
    page = results_markdown(cfg.dataset, zero_shot, result, settings)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    out = cfg.results_dir / f"{cfg.dataset}.md"
    out.write_text(page)
    (cfg.results_dir / f"{cfg.dataset}.json").write_text(
        json.dumps({"settings": settings, "zero_shot": zero_shot, "trained": result}, indent=2, default=str)
    )
    return out


def _row(name: str, m: dict[str, float]) -> str:
    cells = [f"{m[k]:.1f}" if k in m else "-" for k in ("R1", "R5", "R10", "MdR", "MnR")]
    return f"| {name} | " + " | ".join(cells) + " |"


def results_markdown(dataset: str, zero_shot: dict, trained: dict, settings: dict) -> str:
    lines = [
        f"# Reproduction: {dataset}",
        "",
        "Text -> video on the test split "
        f"({trained['counts']['texts']} texts, {trained['counts']['videos']} videos).",
        "",
        "| system | R@1 | R@5 | R@10 | MdR | MnR |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, metrics in PUBLISHED.get(dataset, []):
        lines.append(_row(f"published: {name}", metrics))
    lines.append(_row(f"ours: zero-shot meanP ({settings['model']})", zero_shot["metrics"]["t2v"]))
    lines.append(_row(f"ours: {settings['head']} head", trained["metrics"]["t2v"]))
    lines += [
        "",
        "Video -> text (ours):",
        "",
        "| system | R@1 | R@5 | R@10 | MdR | MnR |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        _row("zero-shot meanP", zero_shot["metrics"]["v2t"]),
        _row(f"{settings['head']} head", trained["metrics"]["v2t"]),
        "",
        "No post-processing (DSL off). Model selected on validation, never on test.",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"
