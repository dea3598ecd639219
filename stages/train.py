"""Train stage: build data, model and trainer from a cache (or end to end), run, write `runs/<name>/`.

Single process: `run_train(from_cache=...)`. Multi-GPU: the same call in every torchrun process
(see muse_pipeline.training.distributed); rank 0 writes the run directory.

The decisions (configs, seqTransf plan, initialisation, run record, run-dir choice, resume checks)
live in `muse_pipeline.training.run_setup`; the call's options are one `TrainRequest`; the mode's
data source is `muse_pipeline.training.prepare`. This module wires them: it prepares the source
(`prepare_from_cache` / `prepare_end_to_end`), then one shared body (`_run`) builds the model,
writes config.json and trains.

Mid-epoch resume skips the batches the interrupted epoch had already trained (their order is a
function of seed and epoch), so it does not redo them; the result equals an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from muse_pipeline.atomic import atomic_write_json
from muse_pipeline.models.checkpoint import read_run_config
from muse_pipeline.training.data import SplitPlan, plan_splits
from muse_pipeline.training.distributed import DistContext, barrier, setup
from muse_pipeline.training.loop import LoopState, NonFiniteLossError, Trainer, effective_amp, seed_everything
from muse_pipeline.training.prepare import PreparedSource, prepare_end_to_end, prepare_from_cache
from muse_pipeline.training.request import TrainRequest
from muse_pipeline.training.run_setup import (
    ConfigMismatch,
    build_model,
    check_plan,
    choose_run_dir,
    initialise,
    param_rows,
    run_record,
    seqtransf_plan,
)

log = logging.getLogger(__name__)


def run_train(*, refit: bool = False, **options: Any) -> Path:
    """Train (or resume) a run and return its directory.

    Keywords: the fields of `TrainRequest` (from_cache, end_to_end, dataset, data_root, model,
    pretrained, decoder, head, name, runs_dir, resume, init_head, device, quiet, model_overrides,
    on_step_end, cache_memory, require_kernels, nccl_timeout); every other keyword is a TrainConfig
    field (None = preset).

    `refit`: after this (selection) run, train again on ALL training videos (no held-out slice) for
    the number of epochs that validation selected, in `<run>-refit`, and return that directory
    (spec section 7; see `refit_run`). The selection run needs a validation set.

    Modes: `from_cache` (CLIP not loaded; tokens and text embeddings from the cache) or
    `end_to_end=True` with `dataset` and `data_root` (frames decoded, CLIP towers trained at
    `clip_lr`). Raises CacheError, ConfigMismatch, NonFiniteLossError, KeyboardInterrupt (after
    saving a resumable state.pt). `cache_memory` (auto | ram | device | off): where from-cache
    training tokens live; `require_kernels`: KernelsMissing unless the CUDA kernels run;
    `nccl_timeout`: seconds a DDP collective may wait (default distributed.DEFAULT_TIMEOUT_S).
    """
    request = TrainRequest.from_kwargs(**options).replace(needs_val=refit)
    run_dir = _train_once(request)
    if not refit:
        return run_dir
    return refit_run(run_dir, device=request.device, quiet=request.quiet, on_step_end=request.on_step_end,
                     cache_memory=request.cache_memory, require_kernels=request.require_kernels,
                     nccl_timeout=request.nccl_timeout)


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
    return _train_once(TrainRequest.from_kwargs(**kwargs).replace(describe_only=True))


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
    `<selection>-refit` beside the selection run and returns it. `runtime_opts`: cache_memory,
    require_kernels, nccl_timeout."""
    selection_dir = Path(selection_dir)
    selected, record = selected_epochs(selection_dir)
    refit_dir = selection_dir.parent / f"{selection_dir.name}-refit"
    runtime = TrainRequest(device=device, quiet=quiet, on_step_end=on_step_end, **runtime_opts)
    if (refit_dir / "config.json").exists():
        done = read_run_config(refit_dir)
        if (done.get("protocol") or {}).get("selection_run") != record["selection_run"]:
            raise ConfigMismatch(f"{refit_dir} exists but refits another run; move it away")
        return _train_once(runtime.replace(resume=refit_dir))
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
    return _train_once(runtime.replace(**source, head=config["train"]["head"], name=refit_dir.name,
                                       runs_dir=selection_dir.parent, model_overrides=config["model"],
                                       protocol=record, train_overrides=train))


def _train_once(req: TrainRequest) -> Any:
    """One run (see run_train); with `req.describe_only` the parameter table instead of a run."""
    from muse_pipeline.models.backends import check_kernels

    ctx = setup(req.device, req.nccl_timeout)
    # before anything is written: the scan/conv implementations this run gets (config.json "runtime")
    runtime: dict[str, Any] = {
        "backends": check_kernels(ctx.device, req.require_kernels, warn=ctx.is_main and not req.describe_only)
    }
    saved: dict[str, Any] | None = None
    end_to_end, from_cache = req.end_to_end, req.from_cache
    if req.resume is not None:
        resume = Path(req.resume)
        saved = read_run_config(resume)
        if not (resume / "state.pt").is_file():
            raise FileNotFoundError(f"{resume} has no state.pt: nothing to resume")
        end_to_end = bool(saved.get("end_to_end", False))
    if end_to_end:
        if from_cache is not None:
            raise ValueError("--from-cache and --end-to-end exclude each other")
        return _run(ctx, req, saved, runtime, prepare_end_to_end(ctx, req, saved))
    if from_cache is None:
        if saved is None:
            raise ValueError("give --from-cache CACHE (or --end-to-end --dataset NAME --data-root PATH)")
        from_cache = saved["cache"]
    return _run(ctx, req, saved, runtime, prepare_from_cache(ctx, req, saved, Path(from_cache)))


def _run(ctx: DistContext, req: TrainRequest, saved: dict | None, runtime: dict[str, Any], prep: PreparedSource) -> Any:
    """The part both sources share: seqTransf plan, split plan, model, init, config.json, training."""
    cfg, model_cfg = prep.cfg, prep.model_cfg
    seq_plan = None
    if saved is None:
        cfg = cfg.replace(amp=effective_amp(cfg, ctx.device))  # config.json records what really runs
        seq_plan = seqtransf_plan(model_cfg, prep.seq_source, announce=ctx.is_main and not req.describe_only)
    plan = plan_splits(*prep.plan_inputs, cfg.val_fraction)
    check_plan(plan, prep.where, cfg, req.needs_val)
    retrieval = build_model(model_cfg, cfg.seed)
    if req.describe_only:
        return param_rows(prep.make_pair(retrieval), cfg)
    init_note = initialise(retrieval, saved, req.init_head, seq_plan, prep.clip_model)
    pair = prep.make_pair(retrieval)
    dataset, validator = prep.make_data(plan, cfg, runtime)
    if saved is not None:
        run_dir = Path(req.resume)
    else:
        run_dir = choose_run_dir(ctx, Path(req.runs_dir), req.name, prep.default_name)
        config = {
            "model": model_cfg,
            "train": cfg.to_dict(),
            **prep.config,
            "val_source": plan.val_source,
            **prep.config_tail,
            **run_record(plan, prep.text_video, cfg, ctx, init_note, req.protocol, model_cfg),
            "runtime": runtime,
        }
        if ctx.is_main:
            atomic_write_json(run_dir / "config.json", config)
    return _fit(ctx, pair, dataset, cfg, run_dir, validator, req.resume is not None, req.quiet, req.on_step_end, plan)


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
