"""The run setup the train stage builds before it trains: pure decisions over configs and fingerprints.

- `ConfigMismatch`: a resumed run and its cache or options disagree (a UserError).
- Resume: `check_fingerprints` (compat.RESUME_KEYS), `resumed_configs` (only RESUME_FREE may change).
- A new run: `new_model_config` (ModelConfig dict), `seqtransf_plan` (CLIP4Clip's init, spec section 6),
  `build_model` (seeded), `initialise` (--init-head or seqTransf's copy), `run_record` (config.json's
  record of data, init, protocol and temperature), `choose_run_dir` (rank 0 picks, all ranks agree).
- `check_plan`: a split plan that can train (texts, batch, validation when refit needs it).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.cache.compat import RESUME_KEYS, describe_differences, differing_keys
from muse_pipeline.encoders.weights_identity import RANDOM_INIT
from muse_pipeline.errors import UserError
from muse_pipeline.models.checkpoint import load_weights
from muse_pipeline.training.config import TrainConfig
from muse_pipeline.training.data import CacheError, SplitPlan
from muse_pipeline.training.distributed import DistContext, broadcast_object
from muse_pipeline.training.loop import seed_everything

log = logging.getLogger(__name__)

# Fields a resumed run may change: they do not affect the weights.
RESUME_FREE = {"num_workers", "log_every"}


class ConfigMismatch(UserError, ValueError):
    """A resumed run and the cache (or the options given) disagree; lists the differing keys."""


def check_fingerprints(run_fp: dict, cache_fp: dict, cache_path: Path | str, run_dir: Path | str) -> None:
    """ConfigMismatch unless the cache (or end-to-end source) has the features the resumed run trained on."""
    diff = differing_keys(run_fp, cache_fp, RESUME_KEYS)
    if diff:
        raise ConfigMismatch(
            f"cannot resume {run_dir} from cache {cache_path}: it was trained on other features "
            f"({describe_differences(run_fp, cache_fp, diff)}). "
            "Pass the run's own cache with --from-cache, or start a new run."
        )


def is_random_init(fp: dict) -> bool:
    """Whether a fingerprint's CLIP weights are the seeded random init (not pretrained)."""
    return str(fp.get("weights", "")).startswith(RANDOM_INIT)


def grid_of(num_tokens: int) -> int:
    """g with num_tokens = 1 + g*g (ViT CLS + patch grid); CacheError otherwise."""
    g = int(round(math.sqrt(num_tokens - 1)))
    if g * g + 1 != num_tokens:
        raise CacheError(f"{num_tokens} tokens per frame is not 1 + g*g: not a ViT CLS + patch-grid layout")
    return g


def unique_run_dir(runs_dir: Path, base: str) -> Path:
    candidate, k = runs_dir / base, 2
    while (candidate / "config.json").exists():
        candidate = runs_dir / f"{base}-{k}"
        k += 1
    return candidate


def choose_run_dir(ctx: DistContext, runs_dir: Path, name: str | None, default: str) -> Path:
    if ctx.is_main:
        if name is not None:
            run_dir = runs_dir / name
            if (run_dir / "config.json").exists():
                raise FileExistsError(
                    f"run {run_dir} already exists: continue it with --resume {run_dir}, or pick another --name"
                )
        else:
            run_dir = unique_run_dir(runs_dir, re.sub(r"[^A-Za-z0-9_.-]+", "-", default))
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = None
    return Path(broadcast_object(ctx, str(run_dir)))  # type: ignore[arg-type]


def check_resume_overrides(saved: TrainConfig, overrides: dict[str, Any], head: str | None) -> None:
    bad = {
        k: v
        for k, v in overrides.items()
        if v is not None and k not in RESUME_FREE and getattr(saved, k) != (tuple(v) if k == "betas" else v)
    }
    if head is not None and head != saved.head:
        bad["head"] = head
    if bad:
        details = "; ".join(f"{k}: run {getattr(saved, k)!r} vs given {v!r}" for k, v in bad.items())
        raise ConfigMismatch(
            f"--resume continues a run exactly; these options differ from the run's: {details}"
        )


def build_model(model_cfg: dict, seed: int):
    from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(seed)
    return RetrievalModel(ModelConfig.from_dict(model_cfg))


def init_from_run(model, init_head: Path) -> None:
    state, _ = load_weights(init_head, "best")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigMismatch(
            f"--init-head {init_head} does not fit this model (other head or geometry): {exc}"
        ) from exc


def resumed_configs(saved: dict, train_overrides: dict, head: str | None) -> tuple[TrainConfig, dict]:
    """A resumed run keeps its recipe; only the RESUME_FREE knobs (workers, logging...) may change."""
    cfg = TrainConfig.from_dict(saved["train"])
    check_resume_overrides(cfg, train_overrides, head)
    cfg = cfg.replace(**{k: v for k, v in train_overrides.items() if k in RESUME_FREE and v is not None})
    return cfg, saved["model"]


def new_model_config(cfg: TrainConfig, dim: int, grid: int, random_init: bool,
                     model_overrides: dict | None, clip_info: dict | None = None) -> dict:
    """`clip_info`: the encoder's description (a cache fingerprint's "encoder"); its recorded
    `logit_scale` is the temperature's starting point (spec: initialised from CLIP)."""
    from muse_pipeline.models.retrieval import initial_logit_scale

    return {
        "head": cfg.head,
        "dim": dim,
        "grid": grid,
        "max_frames": cfg.frames,
        "text_adapter": cfg.text_adapter,
        "logit_scale_init": initial_logit_scale(clip_info, random_init),
        **(model_overrides or {}),
    }


def clip_source_of(fp: dict) -> dict:
    """The CLIP a cache was extracted with, as its fingerprint names it."""
    return {
        "model": fp.get("model"),
        "pretrained": fp.get("pretrained"),
        "weights": str(fp.get("weights", "")),
        "quick_gelu": bool((fp.get("encoder") or {}).get("quick_gelu", False)),
    }


def seqtransf_plan(model_cfg: dict, source: dict, announce: bool = False):
    """For a new seqTransf run: decide CLIP4Clip's init (spec section 6) and fix the geometry it needs
    (heads, activation) in `model_cfg` before the model is built. None for other heads. With `announce`,
    a fallback to random init (a text tower that does not fit) is said on the console."""
    from muse_pipeline.models.clip_init import ClipWeightsError, plan_seqtransf_init

    if model_cfg["head"] != "seqTransf":
        return None
    random_clip = is_random_init({"weights": source["weights"]})
    if not random_clip and not source.get("pretrained"):
        raise ClipWeightsError(
            f"seqTransf starts from CLIP's text tower, but the cache fingerprint names weights {source['weights']!r} "
            "without the pretrained tag or file to load them from: re-extract the cache with this version"
        )
    plan = plan_seqtransf_init(
        model_name=str(source["model"]), pretrained=None if random_clip else str(source["pretrained"]),
        weights_id=source["weights"], quick_gelu=source["quick_gelu"], dim=int(model_cfg["dim"]),
        layers=int(model_cfg.get("transformer_layers", 4)), max_frames=int(model_cfg["max_frames"]),
    )
    if announce and plan.warning:
        log.warning("%s", plan.warning)
    model_cfg.setdefault("transformer_heads", plan.heads)
    model_cfg.setdefault("transformer_act", plan.act)
    return plan


def initialise(retrieval, saved, init_head, seq_plan, clip_model) -> dict | None:
    """Weights a NEW run starts from beyond its seeded init: --init-head, or seqTransf's CLIP copy.
    Returns the record for config.json (None for a resumed run, whose weights come from state.pt)."""
    if saved is not None:
        return None
    if init_head is not None:
        init_from_run(retrieval, Path(init_head))
        return {"head": f"from --init-head {init_head} (best weights)"}
    if seq_plan is None:
        return {"head": "seeded random init (spec sections 3-6)"}
    from muse_pipeline.models.clip_init import init_seqtransf

    init_seqtransf(retrieval.head, seq_plan, clip_model)
    return {"head": seq_plan.note, "seqtransf": seq_plan.to_dict()}


def run_record(plan: SplitPlan, text_video: np.ndarray, cfg: TrainConfig, ctx: DistContext,
                init_note: dict | None, protocol: dict | None, model_cfg: dict) -> dict:
    """config.json fields that say what the run trains on, how it starts and how its model is chosen."""
    train_videos = np.unique(np.asarray(text_video)[plan.train_texts])
    if protocol is None:
        protocol = {
            "kind": "selection",
            "selection": (f"best val t2v R@1 over {cfg.epochs} epochs on the {plan.val_source}, never the test split"
                          if plan.has_val else "none: no validation set, the last epoch is the model"),
        }
    return {
        "n_train_texts": int(len(plan.train_texts)),
        "n_train_videos": int(len(train_videos)),
        "n_val_videos": int(len(plan.val_videos)),
        "world_size": ctx.world_size,
        "init": init_note,
        "protocol": protocol,
        # CLIP's temperature (spec section 7): per-epoch values are in metrics.jsonl
        "logit_scale": {"init": float(model_cfg.get("logit_scale_init", math.log(100.0))), "lr": cfg.clip_lr,
                        "clamp_max": math.log(100.0)},
    }


def param_rows(pair, cfg: TrainConfig) -> list[dict]:
    """One row per trainable parameter of `pair` {name, shape, group, lr, weight_decay} (what --print-param-groups lists)."""
    from muse_pipeline.models.params import param_table
    from muse_pipeline.training.loop import training_param_groups

    return param_table(training_param_groups(pair, cfg))


def preset_names() -> set[str]:
    from muse_pipeline.config import PRESETS

    return set(PRESETS)


def check_plan(plan: SplitPlan, where: Path | str, cfg: TrainConfig, require_val: bool = False) -> None:
    if require_val and not plan.has_val:
        raise CacheError(
            f"--refit retrains for the epoch count that validation selects, but {where} gives no validation "
            "set (no 'val' split and --val-fraction 0): set --val-fraction (e.g. 0.05) or drop --refit"
        )
    if len(plan.train_texts) == 0:
        raise CacheError(f"{where} has no training texts (no cached videos in split 'train')")
    if len(plan.train_texts) < cfg.batch_size:
        raise CacheError(
            f"{where} has {len(plan.train_texts)} training texts, fewer than the global batch "
            f"{cfg.batch_size}: lower --batch-size"
        )
