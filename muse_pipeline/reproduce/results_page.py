"""The results page of `muse reproduce`: `results/<dataset>.md`, ours beside the published numbers.

`run_row(kind, run_dir, result)` -> the dict of one trained model on the page (kind "selection" or
"refit", run_dir, protocol sentence, metrics / counts of its eval result, config.json, final
logit_scale); `results_markdown(dataset, zero_shot, rows, settings)` -> the page (markdown, ends with
a newline): the text -> video table, ours minus published, video -> text, protocol, recipe, settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from muse_pipeline.reproduce.published import COUNTERPART, METRICS, PUBLISHED, PUBLISHED_PROTOCOL
from muse_pipeline.training.metrics_log import final_logit_scale


def run_row(kind: str, run_dir: Path, result: dict) -> dict:
    """One trained model on the page: its metrics, and the protocol and recipe that produced them."""
    from muse_pipeline.models.checkpoint import read_run_config

    config = read_run_config(run_dir)
    epochs = config["train"]["epochs"]
    if kind == "refit":
        p = config["protocol"]
        protocol = (f"refit: all {config['n_train_videos']} training videos ({config['n_train_texts']} pairs), "
                    f"{epochs} epoch(s) = the count selected on the {p['selection_val_source']}; last epoch")
    else:
        state = _selection_state(run_dir)
        chosen = (f"epoch {state['best_epoch'] + 1} of {epochs} chosen on the {config['val_source']}"
                  if state and state["best_epoch"] >= 0 and config.get("n_val_videos") else f"last of {epochs} epochs (no validation set)")
        protocol = (f"selection: {config['n_train_videos']} training videos ({config['n_train_texts']} pairs), "
                    f"{chosen}")
    return {"kind": kind, "run_dir": str(run_dir), "protocol": protocol, "metrics": result["metrics"],
            "counts": result["counts"], "config": config, "logit_scale_final": final_logit_scale(run_dir)}


def _selection_state(run_dir: Path) -> dict | None:
    import torch

    path = run_dir / "state.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["loop"]


def metric_row(name: str, m: dict[str, float], protocol: str = "") -> str:
    """One table row: name, protocol, then METRICS to one decimal ("-" where `m` lacks one)."""
    cells = [f"{m[k]:.1f}" if k in m else "-" for k in METRICS]
    return f"| {name} | {protocol} | " + " | ".join(cells) + " |"


def diff_row(name: str, ours: dict[str, float], published: dict[str, float]) -> str:
    cells = [f"{ours[k] - published[k]:+.1f}" if k in published and k in ours else "-" for k in METRICS]
    return f"| {name} | " + " | ".join(cells) + " |"


def results_markdown(dataset: str, zero_shot: dict, ours: list[dict], settings: dict) -> str:
    """The results page: ours beside the published numbers, the differences, protocol and recipe.

    ours: rows of `run_row` (the selection model, then the refit model when there is one); the last
    is the reported model."""
    head = settings["head"]
    published = dict(PUBLISHED.get(dataset, []))
    counts = ours[-1]["counts"]
    reported = ours[-1]
    header = ["| system | protocol | R@1 | R@5 | R@10 | MdR | MnR |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines = [
        f"# Reproduction: {dataset}",
        "",
        f"Text -> video on the test split ({counts['texts']} texts, {counts['videos']} videos). "
        f"Reported model: the {head} head's **{reported['kind']}** run ({reported['run_dir']}).",
        "",
        *header,
    ]
    for name, metrics in PUBLISHED.get(dataset, []):
        lines.append(metric_row(f"published: {name}", metrics, PUBLISHED_PROTOCOL.get(name, "")))
    lines.append(metric_row(f"ours: zero-shot meanP ({settings['model']})", zero_shot["metrics"]["t2v"], "no training"))
    for r in ours:
        lines.append(metric_row(f"ours: {head} head ({r['kind']})", r["metrics"]["t2v"], r["protocol"]))

    lines += ["", "## Ours minus published (text -> video)", ""]
    pairs = [("zero-shot meanP", zero_shot["metrics"]["t2v"], COUNTERPART["zero-shot"])]
    pairs += [(f"{head} head ({r['kind']})", r["metrics"]["t2v"], COUNTERPART.get(head)) for r in ours]
    diffs = [(n, m, c) for n, m, c in pairs if c in published]
    if diffs:
        lines += ["| ours - published | R@1 | R@5 | R@10 | MdR | MnR |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [diff_row(f"{n} - {c}", m, published[c]) for n, m, c in diffs]
    else:
        lines.append(f"No published number for the {head} head on {dataset} (spec section 10).")

    lines += ["", "## Video -> text (ours)", "", *header,
              metric_row("zero-shot meanP", zero_shot["metrics"]["v2t"], "no training")]
    lines += [metric_row(f"{head} head ({r['kind']})", r["metrics"]["v2t"], r["protocol"]) for r in ours]

    cfg = reported["config"]
    init = (cfg.get("init") or {}).get("head", "not recorded")
    lines += [
        "",
        "## Protocol",
        "",
        "- Post-processing: none (DSL off) for every number of ours.",
        "- Model selection: on validation only, never on the test split; the test split is evaluated once per "
        "reported model, after training.",
        *[f"- {r['protocol'][0].upper()}{r['protocol'][1:]}." for r in ours],
        "- Published CLIP4Clip / MUSE numbers: their code evaluates the test split after every epoch and "
        "reports the best epoch (spec section 11), a selection ours does not make.",
        f"- Head initialisation: {init}.",
        "",
        "## Recipe (the reported run's config.json)",
        "",
        f"- training: {json.dumps(cfg['train'], sort_keys=True)}",
        f"- model: {json.dumps(_full_model_config(cfg['model']), sort_keys=True)}",
        f"- logit_scale: init {cfg['model'].get('logit_scale_init', float('nan')):.4f}, "
        f"final {_fmt(reported['logit_scale_final'])} (lr {cfg['train']['clip_lr']:g}, clamped <= ln(100))",
        f"- bf16 autocast ran: {cfg['train'].get('amp')}; world size {cfg.get('world_size', 1)}",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def _full_model_config(stored: dict) -> dict:
    """The stored model config with every default filled in (what was really built)."""
    from muse_pipeline.models.retrieval import ModelConfig

    try:
        return ModelConfig.from_dict(stored).to_dict()
    except ValueError:
        return stored


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
