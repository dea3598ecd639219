"""Train stage: build data, model and trainer from a cache (or end to end), run, write `runs/<name>/`.

Single process: `run_train(from_cache=...)`. Multi-GPU: the same call in every torchrun process
(see muse_pipeline.training.distributed); rank 0 writes the run directory.

Mid-epoch resume skips the batches the interrupted epoch had already trained (their order is a
function of seed and epoch), so it does not redo them; the result equals an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse_pipeline.atomic import atomic_write_json
from muse_pipeline.errors import UserError
from muse_pipeline.models.checkpoint import load_weights, read_run_config
from muse_pipeline.training.config import TrainConfig
from muse_pipeline.training.data import CacheError, SplitPlan, plan_splits
from muse_pipeline.training.distributed import DistContext, barrier, broadcast_object, setup
from muse_pipeline.training.loop import LoopState, NonFiniteLossError, Trainer, effective_amp, seed_everything

log = logging.getLogger(__name__)

# Fingerprint keys that must agree between a run and the cache it resumes/evaluates on.
MATCH_KEYS = (
    "dataset",
    "model",
    "weights",
    "image_size",
    "num_tokens",
    "dim",
    "frames",
    "words",
    "sampling",
    "annotation_checksum",
)
# Fields a resumed run may change: they do not affect the weights.
RESUME_FREE = {"num_workers", "log_every"}


class ConfigMismatch(UserError, ValueError):
    """A resumed run and the cache (or the options given) disagree; lists the differing keys."""


def check_fingerprints(run_fp: dict, cache_fp: dict, cache_path: Path | str, run_dir: Path | str) -> None:
    diff = [k for k in MATCH_KEYS if k in run_fp and run_fp.get(k) != cache_fp.get(k)]
    if diff:
        details = "; ".join(f"{k}: run {run_fp.get(k)!r} vs cache {cache_fp.get(k)!r}" for k in diff)
        raise ConfigMismatch(
            f"cannot resume {run_dir} from cache {cache_path}: it was trained on other features ({details}). "
            "Pass the run's own cache with --from-cache, or start a new run."
        )


def _is_random_init(fp: dict) -> bool:
    return str(fp.get("weights", "")).startswith("random")


def _grid(num_tokens: int) -> int:
    g = int(round(math.sqrt(num_tokens - 1)))
    if g * g + 1 != num_tokens:
        raise CacheError(f"{num_tokens} tokens per frame is not 1 + g*g: not a ViT CLS + patch-grid layout")
    return g


def _unique_run_dir(runs_dir: Path, base: str) -> Path:
    candidate, k = runs_dir / base, 2
    while (candidate / "config.json").exists():
        candidate = runs_dir / f"{base}-{k}"
        k += 1
    return candidate


def _choose_run_dir(ctx: DistContext, runs_dir: Path, name: str | None, default: str) -> Path:
    if ctx.is_main:
        if name is not None:
            run_dir = runs_dir / name
            if (run_dir / "config.json").exists():
                raise FileExistsError(
                    f"run {run_dir} already exists: continue it with --resume {run_dir}, or pick another --name"
                )
        else:
            run_dir = _unique_run_dir(runs_dir, re.sub(r"[^A-Za-z0-9_.-]+", "-", default))
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = None
    return Path(broadcast_object(ctx, str(run_dir)))  # type: ignore[arg-type]


def _check_resume_overrides(saved: TrainConfig, overrides: dict[str, Any], head: str | None) -> None:
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


def _build_model(model_cfg: dict, seed: int):
    from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(seed)
    return RetrievalModel(ModelConfig.from_dict(model_cfg))


def _init_from_run(model, init_head: Path) -> None:
    state, _ = load_weights(init_head, "best")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigMismatch(
            f"--init-head {init_head} does not fit this model (other head or geometry): {exc}"
        ) from exc


def run_train(
    *,
    from_cache: Path | str | None = None,
    end_to_end: bool = False,
    dataset: str | None = None,
    data_root: Path | str | None = None,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    decoder: str = "pyav",
    head: str | None = None,
    name: str | None = None,
    runs_dir: Path | str = Path("runs"),
    resume: Path | str | None = None,
    init_head: Path | str | None = None,
    device: str | None = None,
    quiet: bool = False,
    model_overrides: dict[str, Any] | None = None,
    on_step_end: Callable[[LoopState], None] | None = None,
    cache_memory: str = "auto",
    require_kernels: bool = False,
    nccl_timeout: float | None = None,
    refit: bool = False,
    **train_overrides: Any,
) -> Path:
    """Train (or resume) a run and return its directory.

    `refit`: after this (selection) run, train again on ALL training videos (no held-out slice) for
    the number of epochs that validation selected, in `<run>-refit`, and return that directory
    (spec section 7; see `refit_run`). The selection run needs a validation set.

    Modes: `from_cache` (CLIP not loaded; tokens and text embeddings from the cache) or
    `end_to_end=True` with `dataset` and `data_root` (frames decoded, CLIP towers trained at
    `clip_lr`). `train_overrides` are TrainConfig fields (None = preset); `model_overrides` are
    ModelConfig fields (depth, drop_max, ...). Raises CacheError, ConfigMismatch, NonFiniteLossError,
    KeyboardInterrupt (after saving a resumable state.pt). `cache_memory` (auto | ram | device | off):
    where from-cache training tokens live; `require_kernels`: KernelsMissing unless the CUDA kernels run;
    `nccl_timeout`: seconds a DDP collective may wait (default distributed.DEFAULT_TIMEOUT_S).
    """
    runtime_opts = dict(cache_memory=cache_memory, require_kernels=require_kernels, nccl_timeout=nccl_timeout)
    run_dir = _train_once(
        from_cache=from_cache, end_to_end=end_to_end, dataset=dataset, data_root=data_root, model=model,
        pretrained=pretrained, decoder=decoder, head=head, name=name, runs_dir=runs_dir, resume=resume,
        init_head=init_head, device=device, quiet=quiet, model_overrides=model_overrides,
        on_step_end=on_step_end, needs_val=refit, **runtime_opts, **train_overrides,
    )
    if not refit:
        return run_dir
    return refit_run(run_dir, device=device, quiet=quiet, on_step_end=on_step_end, **runtime_opts)


def _train_once(
    *,
    from_cache: Path | str | None = None,
    end_to_end: bool = False,
    dataset: str | None = None,
    data_root: Path | str | None = None,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    decoder: str = "pyav",
    head: str | None = None,
    name: str | None = None,
    runs_dir: Path | str = Path("runs"),
    resume: Path | str | None = None,
    init_head: Path | str | None = None,
    device: str | None = None,
    quiet: bool = False,
    model_overrides: dict[str, Any] | None = None,
    on_step_end: Callable[[LoopState], None] | None = None,
    needs_val: bool = False,
    protocol: dict[str, Any] | None = None,
    describe_only: bool = False,
    cache_memory: str = "auto",
    require_kernels: bool = False,
    nccl_timeout: float | None = None,
    **train_overrides: Any,
) -> Any:
    """One run (see run_train). `needs_val`: refuse (before training) a run without a validation set;
    `protocol`: the refit record of a refit run's config.json;
    `describe_only`: build everything, train nothing, return the parameter table."""
    from muse_pipeline.models.backends import check_kernels

    ctx = setup(device, nccl_timeout)
    # before anything is written: the scan/conv implementations this run gets (config.json "runtime")
    runtime: dict[str, Any] = {
        "backends": check_kernels(ctx.device, require_kernels, warn=ctx.is_main and not describe_only)
    }
    runs_dir = Path(runs_dir)
    saved: dict[str, Any] | None = None
    if resume is not None:
        resume = Path(resume)
        saved = read_run_config(resume)
        if not (resume / "state.pt").is_file():
            raise FileNotFoundError(f"{resume} has no state.pt: nothing to resume")
        end_to_end = bool(saved.get("end_to_end", False))
    if end_to_end:
        if from_cache is not None:
            raise ValueError("--from-cache and --end-to-end exclude each other")
        return _run_end_to_end(
            ctx,
            dataset,
            data_root,
            model,
            pretrained,
            decoder,
            head,
            name,
            runs_dir,
            saved,
            resume,
            init_head,
            quiet,
            model_overrides,
            on_step_end,
            train_overrides,
            runtime=runtime,
            require_val=needs_val,
            protocol=protocol,
            describe_only=describe_only,
        )
    if from_cache is None:
        if saved is None:
            raise ValueError("give --from-cache CACHE (or --end-to-end --dataset NAME --data-root PATH)")
        from_cache = saved["cache"]
    return _run_from_cache(
        ctx,
        Path(from_cache),
        head,
        name,
        runs_dir,
        saved,
        resume,
        init_head,
        quiet,
        model_overrides,
        on_step_end,
        train_overrides,
        runtime=runtime,
        cache_memory=cache_memory,
        require_val=needs_val,
        protocol=protocol,
        describe_only=describe_only,
    )


def _resumed_configs(saved: dict, train_overrides: dict, head: str | None) -> tuple[TrainConfig, dict]:
    """A resumed run keeps its recipe; only the RESUME_FREE knobs (workers, logging...) may change."""
    cfg = TrainConfig.from_dict(saved["train"])
    _check_resume_overrides(cfg, train_overrides, head)
    cfg = cfg.replace(**{k: v for k, v in train_overrides.items() if k in RESUME_FREE and v is not None})
    return cfg, saved["model"]


def _new_model_config(cfg: TrainConfig, dim: int, grid: int, random_init: bool,
                      model_overrides: dict | None, clip_info: dict | None = None) -> dict:
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


def _clip_source_of(fp: dict) -> dict:
    """The CLIP a cache was extracted with, as its fingerprint names it."""
    return {
        "model": fp.get("model"),
        "pretrained": fp.get("pretrained"),
        "weights": str(fp.get("weights", "")),
        "quick_gelu": bool((fp.get("encoder") or {}).get("quick_gelu", False)),
    }


def _seqtransf_plan(model_cfg: dict, source: dict, announce: bool = False):
    """For a new seqTransf run: decide CLIP4Clip's init (spec section 6) and fix the geometry it needs
    (heads, activation) in `model_cfg` before the model is built. None for other heads."""
    from muse_pipeline.models.clip_init import ClipWeightsError, plan_seqtransf_init

    if model_cfg["head"] != "seqTransf":
        return None
    random_clip = _is_random_init({"weights": source["weights"]})
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


def _initialise(retrieval, saved, init_head, seq_plan, clip_model) -> dict | None:
    """Weights a NEW run starts from beyond its seeded init: --init-head, or seqTransf's CLIP copy.
    Returns the record for config.json (None for a resumed run, whose weights come from state.pt)."""
    if saved is not None:
        return None
    if init_head is not None:
        _init_from_run(retrieval, Path(init_head))
        return {"head": f"from --init-head {init_head} (best weights)"}
    if seq_plan is None:
        return {"head": "seeded random init (spec sections 3-6)"}
    from muse_pipeline.models.clip_init import init_seqtransf

    init_seqtransf(retrieval.head, seq_plan, clip_model)
    return {"head": seq_plan.note, "seqtransf": seq_plan.to_dict()}


def _run_record(plan: SplitPlan, text_video: np.ndarray, cfg: TrainConfig, ctx: DistContext,
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


def _param_rows(pair, cfg: TrainConfig) -> list[dict]:
    from muse_pipeline.models.params import param_table
    from muse_pipeline.training.loop import training_param_groups

    return param_table(training_param_groups(pair, cfg))


def param_group_rows(**kwargs: Any) -> list[dict]:
    """What `muse train --print-param-groups` lists: the run_train arguments of a NEW run -> one row per
    trainable parameter {name, shape, group, lr, weight_decay}. Builds the model, trains nothing, writes
    nothing (CLIP weights are not read for seqTransf's copy: it changes no group)."""
    if kwargs.get("resume") is not None:
        saved = read_run_config(Path(kwargs["resume"]))
        kwargs = {
            **kwargs,
            "resume": None,
            "head": saved["train"]["head"],
            "from_cache": kwargs.get("from_cache") or saved.get("cache"),
            "model_overrides": saved["model"],
            **{k: v for k, v in saved["train"].items() if k not in ("head", "dataset", "end_to_end")},
        }
        if saved.get("end_to_end"):
            e2e = saved["end_to_end_source"]
            kwargs.update(end_to_end=True, from_cache=None, dataset=e2e["dataset"], data_root=e2e["data_root"],
                          model=e2e["model"], pretrained=e2e["pretrained"], decoder=e2e["decoder"])
    return _train_once(describe_only=True, **kwargs)


def selected_epochs(run_dir: Path | str) -> tuple[int, dict]:
    """(epochs that validation selected, the selection record) of a FINISHED selection run."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if (config.get("train") or {}).get("refit"):
        raise ConfigMismatch(f"{run_dir} is itself a refit run; --refit needs the selection run")
    state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)
    loop = state["loop"]
    epochs = int(config["train"]["epochs"])
    if int(loop["epoch"]) < epochs:
        raise ConfigMismatch(f"{run_dir} has not finished ({loop['epoch']} of {epochs} epochs): resume it first")
    if loop["best_epoch"] < 0 or not math.isfinite(float(loop["best_score"])):
        raise ConfigMismatch(
            f"{run_dir} selected nothing (no validation set): --refit needs a run trained with a validation set"
        )
    selected = int(loop["best_epoch"]) + 1
    record = {
        "kind": "refit",
        "selection_run": str(run_dir.resolve()),
        "selection_val_source": config.get("val_source"),
        "selection_val_t2v_R1": float(loop["best_score"]),
        "selected_epochs": selected,
        "selection_epochs": epochs,
    }
    return selected, record


def refit_run(selection_dir: Path | str, *, device: str | None = None, quiet: bool = False,
              on_step_end: Callable[[LoopState], None] | None = None, **runtime_opts: Any) -> Path:
    """Spec section 7's optional refit: the selection run's recipe, trained from its initial state on
    ALL training videos (no held-out slice; a "val" split stays validation-only and selects nothing)
    for the number of epochs validation selected; the last epoch is the model. Writes (or resumes)
    `<selection>-refit` beside the selection run and returns it."""
    selection_dir = Path(selection_dir)
    selected, record = selected_epochs(selection_dir)
    refit_dir = selection_dir.parent / f"{selection_dir.name}-refit"
    if (refit_dir / "config.json").exists():
        done = read_run_config(refit_dir)
        if (done.get("protocol") or {}).get("selection_run") != record["selection_run"]:
            raise ConfigMismatch(f"{refit_dir} exists but refits another run; move it away")
        return _train_once(resume=refit_dir, device=device, quiet=quiet, on_step_end=on_step_end, **runtime_opts)
    config = read_run_config(selection_dir)
    train = {k: v for k, v in config["train"].items() if k not in ("head", "dataset", "end_to_end")}
    train.update(epochs=selected, val_fraction=0.0, refit=True)
    source: dict[str, Any]
    if config.get("end_to_end"):
        e2e = config["end_to_end_source"]
        source = dict(end_to_end=True, dataset=e2e["dataset"], data_root=e2e["data_root"], model=e2e["model"],
                      pretrained=e2e["pretrained"], decoder=e2e["decoder"], init_head=config.get("init_head"))
    else:
        source = dict(from_cache=config["cache"])
    if not quiet:
        log.info("refit: %d epoch(s) selected on %s; training %s on all training videos",
                 selected, record["selection_val_source"], refit_dir)
    return _train_once(**source, head=config["train"]["head"], name=refit_dir.name, runs_dir=selection_dir.parent,
                       device=device, quiet=quiet, model_overrides=config["model"], on_step_end=on_step_end,
                       protocol=record, **runtime_opts, **train)


def _run_from_cache(
    ctx,
    cache_path: Path,
    head,
    name,
    runs_dir,
    saved,
    resume,
    init_head,
    quiet,
    model_overrides,
    on_step_end,
    train_overrides,
    *,
    runtime: dict[str, Any],
    cache_memory: str = "auto",
    require_val: bool = False,
    protocol: dict | None = None,
    describe_only: bool = False,
) -> Any:
    from muse_pipeline.training.data import cache_dataset, choose_cache_memory, open_cache_arrays
    from muse_pipeline.training.modules import CachePairModel
    from muse_pipeline.training.validate import CacheValidator

    choose_cache_memory(cache_memory, 0, ctx.device)  # a bad mode is refused before the cache is read
    arrays = open_cache_arrays(cache_path)
    fp = arrays.fingerprint
    if saved is not None:
        check_fingerprints(saved.get("fingerprint") or {}, fp, cache_path, resume)
        cfg, model_cfg = _resumed_configs(saved, train_overrides, head)
    else:
        for key, have in (("frames", arrays.frames), ("words", fp.get("words"))):
            given = train_overrides.get(key)
            if given is not None and have is not None and int(given) != int(have):
                raise ConfigMismatch(
                    f"--{key} {given} differs from the cache's {have} ({cache_path}); "
                    f"re-extract with --{key} {given} or drop the option"
                )
        ds = str(fp.get("dataset", "synthetic"))
        preset_name = ds if ds in _preset_names() else "folder"
        cfg = TrainConfig.from_preset(preset_name, **train_overrides).replace(
            dataset=ds,
            frames=arrays.frames,
            words=int(fp.get("words", 32)),
            head=head or train_overrides.get("head") or "muse",
        )
        model_cfg = _new_model_config(cfg, arrays.dim, _grid(arrays.num_tokens), _is_random_init(fp),
                                      model_overrides, fp.get("encoder"))
    seq_plan = None
    if saved is None:
        cfg = cfg.replace(amp=effective_amp(cfg, ctx.device))  # config.json records what really runs
        seq_plan = _seqtransf_plan(model_cfg, _clip_source_of(fp), announce=ctx.is_main and not describe_only)
    plan = plan_splits(
        arrays.video_ids, arrays.video_split, arrays.video_done, arrays.text_video, cfg.val_fraction
    )
    _check_plan(plan, cache_path, cfg, require_val)
    retrieval = _build_model(model_cfg, cfg.seed)
    pair = CachePairModel(retrieval)
    if describe_only:
        return _param_rows(pair, cfg)
    init_note = _initialise(retrieval, saved, init_head, seq_plan, clip_model=None)
    dataset, memory = cache_dataset(arrays, plan.train_texts, cache_memory, ctx.device, ctx.world_size)
    runtime["cache_memory"] = memory.to_dict()
    if ctx.is_main:
        log.info("%s", memory.describe())
    validator = CacheValidator(dataset, plan, arrays.text_video, arrays.text_emb, ctx.device)
    if saved is not None:
        run_dir = Path(resume)
    else:
        run_dir = _choose_run_dir(ctx, runs_dir, name, f"{cfg.dataset}-{cfg.head}")
        config = {
            "model": model_cfg,
            "train": cfg.to_dict(),
            "cache": str(cache_path.resolve()),
            "fingerprint": fp,
            "end_to_end": False,
            "val_source": plan.val_source,
            **_run_record(plan, arrays.text_video, cfg, ctx, init_note, protocol, model_cfg),
            "runtime": runtime,
        }
        if ctx.is_main:
            atomic_write_json(run_dir / "config.json", config)
    return _fit(ctx, pair, dataset, cfg, run_dir, validator, resume is not None, quiet, on_step_end, plan)


def _preset_names() -> set[str]:
    from muse_pipeline.config import PRESETS

    return set(PRESETS)


def _check_plan(plan: SplitPlan, where: Path | str, cfg: TrainConfig, require_val: bool = False) -> None:
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


def _fit(
    ctx,
    pair,
    dataset,
    cfg,
    run_dir: Path,
    validator,
    resuming: bool,
    quiet: bool,
    on_step_end,
    plan: SplitPlan,
) -> Path:
    trainer = Trainer(pair, dataset, cfg, ctx, run_dir, validator, quiet=quiet, on_step_end=on_step_end)
    if resuming:
        state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)
        trainer.load_state_dict(state)
        if trainer.state.epoch >= cfg.epochs:
            log.info("run %s already finished %d epochs; nothing to do", run_dir, cfg.epochs)
            return run_dir
    else:
        # Per-rank streams for dropout; the model was built from `seed` alone, identical on all ranks.
        seed_everything(cfg.seed + ctx.rank)
    if ctx.is_main and cfg.refit:
        log.info("%s", cfg.refit_note(len(dataset)))
    elif ctx.is_main and not plan.has_val:
        log.warning("no validation set (no 'val' split, val_fraction 0): best.safetensors = last epoch")
    try:
        trainer.fit()
    except NonFiniteLossError as exc:
        if ctx.is_main:
            trainer._log({"kind": "error", "step": trainer.state.step, "message": str(exc)})
        raise
    barrier(ctx)
    return run_dir


def _run_end_to_end(
    ctx,
    dataset,
    data_root,
    model,
    pretrained,
    decoder,
    head,
    name,
    runs_dir,
    saved,
    resume,
    init_head,
    quiet,
    model_overrides,
    on_step_end,
    train_overrides,
    *,
    runtime: dict[str, Any],
    require_val: bool = False,
    protocol: dict | None = None,
    describe_only: bool = False,
) -> Any:
    from muse_pipeline.data import load_dataset
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.stages.extract import ExtractConfig
    from muse_pipeline.stages.extract import fingerprint as extract_fingerprint
    from muse_pipeline.training.data import CACHED, EndToEndPairDataset
    from muse_pipeline.training.modules import EndToEndPairModel
    from muse_pipeline.training.validate import EndToEndValidator

    if saved is not None:
        e2e = saved["end_to_end_source"]
        dataset = dataset or e2e["dataset"]
        data_root = data_root or e2e["data_root"]
        model, pretrained, decoder = e2e["model"], e2e["pretrained"], e2e["decoder"]
    if dataset is None or data_root is None:
        raise ValueError("--end-to-end needs --dataset NAME and --data-root PATH")
    index = load_dataset(dataset, data_root)
    # CLIP is built on the CPU first: the pair model moves to the rank's device with the trainer.
    encoder = ClipEncoder(model, pretrained=pretrained, device="cpu")
    info = encoder.describe()
    if saved is not None:
        cfg, model_cfg = _resumed_configs(saved, train_overrides, head)
    else:
        cfg = TrainConfig.from_preset(dataset, **train_overrides).replace(
            head=head or "muse", end_to_end=True
        )
        model_cfg = _new_model_config(cfg, encoder.dim, encoder.grid, pretrained is None, model_overrides, info)
    # the same identity as a cache of these frames would carry (model, weights, frames, annotations...)
    source = ExtractConfig(dataset=dataset, data_root=Path(data_root), model=model, pretrained=pretrained,
                           frames=cfg.frames, words=cfg.words, decoder=decoder)
    fp = {**extract_fingerprint(source, index, info), "mode": "end-to-end"}
    if saved is not None:
        check_fingerprints(saved.get("fingerprint") or {}, fp, data_root, resume)
    text_video = np.asarray([c.video_index for c in index.captions], dtype=np.int64)
    plan = plan_splits(
        [v.id for v in index.videos],
        [v.split for v in index.videos],
        np.full(len(index.videos), CACHED, np.uint8),
        text_video,
        cfg.val_fraction,
    )
    _check_plan(plan, data_root, cfg, require_val)
    seq_plan = None
    if saved is None:
        cfg = cfg.replace(amp=effective_amp(cfg, ctx.device))  # config.json records what really runs
        seq_plan = _seqtransf_plan(model_cfg, {"model": model, "pretrained": pretrained, "weights": info["weights_id"],
                                               "quick_gelu": info["quick_gelu"]},
                                  announce=ctx.is_main and not describe_only)
    text_ids = encoder.tokenize([c.text for c in index.captions], cfg.words)
    retrieval = _build_model(model_cfg, cfg.seed)
    init_note = None if describe_only else _initialise(retrieval, saved, init_head, seq_plan, encoder.model)
    pair = EndToEndPairModel(encoder, retrieval)
    # CLIP's own temperature (and SigLIP-style bias) are unused here: the run's temperature is the
    # RetrievalModel's logit_scale (initialised as CLIP's, trained at the CLIP lr). Frozen, so DDP
    # sees no unused grads.
    encoder.model.logit_scale.requires_grad_(False)
    if getattr(encoder.model, "logit_bias", None) is not None:
        encoder.model.logit_bias.requires_grad_(False)
    if describe_only:
        return _param_rows(pair, cfg)
    ds = EndToEndPairDataset(
        index.videos,
        text_video,
        text_ids,
        plan.train_texts,
        cfg.frames,
        encoder.image_size,
        encoder.mean,
        encoder.std,
        decoder,
    )
    validator = EndToEndValidator(ds, plan, text_video, ctx.device)
    if saved is not None:
        run_dir = Path(resume)
    else:
        run_dir = _choose_run_dir(ctx, runs_dir, name, f"{dataset}-{cfg.head}-e2e")
        config = {
            "model": model_cfg,
            "train": cfg.to_dict(),
            "cache": None,
            "fingerprint": fp,
            "end_to_end": True,
            "val_source": plan.val_source,
            "end_to_end_source": {
                "dataset": dataset,
                "data_root": str(Path(data_root).resolve()),
                "model": model,
                "pretrained": pretrained,
                "decoder": decoder,
            },
            "init_head": str(init_head) if init_head else None,
            **_run_record(plan, text_video, cfg, ctx, init_note, protocol, model_cfg),
            "runtime": runtime,
        }
        if ctx.is_main:
            atomic_write_json(run_dir / "config.json", config)
    return _fit(ctx, pair, ds, cfg, run_dir, validator, resume is not None, quiet, on_step_end, plan)
