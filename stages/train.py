"""Train stage: build data, model and trainer from a cache (or end to end), run, write `runs/<name>/`.

Single process: `run_train(from_cache=...)`. Multi-GPU: the same call in every torchrun process
(see muse_pipeline.training.distributed); rank 0 writes the run directory.

The decisions (configs, seqTransf plan, initialisation, run record, run-dir choice, resume checks)
live in `muse_pipeline.training.run_setup`; the call's options are one `TrainRequest`. This module
wires them: it prepares the mode's data source (`_prepare_from_cache` / `_prepare_end_to_end`), then
one shared body (`_run`) builds the model, writes config.json and trains.

Mid-epoch resume skips the batches the interrupted epoch had already trained (their order is a
function of seed and epoch), so it does not redo them; the result equals an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse_pipeline.atomic import atomic_write_json
from muse_pipeline.models.checkpoint import read_run_config
from muse_pipeline.training.config import TrainConfig
from muse_pipeline.training.data import SplitPlan, plan_splits
from muse_pipeline.training.distributed import DistContext, barrier, setup
from muse_pipeline.training.loop import LoopState, NonFiniteLossError, Trainer, effective_amp, seed_everything
from muse_pipeline.training.request import TrainRequest
from muse_pipeline.training.run_setup import (
    ConfigMismatch,
    build_model,
    check_fingerprints,
    check_plan,
    choose_run_dir,
    clip_source_of,
    grid_of,
    initialise,
    is_random_init,
    new_model_config,
    param_rows,
    preset_names,
    resumed_configs,
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
        return _run(ctx, req, saved, runtime, _prepare_end_to_end(ctx, req, saved))
    if from_cache is None:
        if saved is None:
            raise ValueError("give --from-cache CACHE (or --end-to-end --dataset NAME --data-root PATH)")
        from_cache = saved["cache"]
    return _run(ctx, req, saved, runtime, _prepare_from_cache(ctx, req, saved, Path(from_cache)))


@dataclass
class _Prepared:
    """What a data source contributes before the shared body of a run (`_run`).

    cfg / model_cfg: the run's configs (resumed ones as saved); seq_source: the CLIP identity seqTransf's
    plan starts from; plan_inputs: (video ids, splits, done flags, text_video) for `plan_splits`;
    where: what errors name; make_pair(retrieval) -> the trained module; make_data(plan, cfg, runtime) ->
    (dataset, validator); clip_model: CLIP for seqTransf's copy (None: read from the fingerprint's
    weights); config: the source's config.json fields (cache, end_to_end, ...)."""

    fp: dict
    cfg: TrainConfig
    model_cfg: dict
    seq_source: dict
    plan_inputs: tuple
    text_video: np.ndarray
    where: Path | str
    default_name: str
    make_pair: Callable[[Any], Any]
    make_data: Callable[[SplitPlan, TrainConfig, dict], tuple[Any, Any]]
    clip_model: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    config_tail: dict[str, Any] = field(default_factory=dict)


def _prepare_from_cache(ctx: DistContext, req: TrainRequest, saved: dict | None, cache_path: Path) -> _Prepared:
    from muse_pipeline.training.data import cache_dataset, choose_cache_memory, open_cache_arrays
    from muse_pipeline.training.modules import CachePairModel
    from muse_pipeline.training.validate import CacheValidator

    choose_cache_memory(req.cache_memory, 0, ctx.device)  # a bad mode is refused before the cache is read
    arrays = open_cache_arrays(cache_path)
    fp = arrays.fingerprint
    overrides = dict(req.train_overrides)
    if saved is not None:
        check_fingerprints(saved.get("fingerprint") or {}, fp, cache_path, req.resume)
        cfg, model_cfg = resumed_configs(saved, overrides, req.head)
    else:
        for key, have in (("frames", arrays.frames), ("words", fp.get("words"))):
            given = overrides.get(key)
            if given is not None and have is not None and int(given) != int(have):
                raise ConfigMismatch(
                    f"--{key} {given} differs from the cache's {have} ({cache_path}); "
                    f"re-extract with --{key} {given} or drop the option"
                )
        ds = str(fp.get("dataset", "synthetic"))
        preset_name = ds if ds in preset_names() else "folder"
        cfg = TrainConfig.from_preset(preset_name, **overrides).replace(
            dataset=ds,
            frames=arrays.frames,
            words=int(fp.get("words", 32)),
            head=req.head or overrides.get("head") or "muse",
        )
        model_cfg = new_model_config(cfg, arrays.dim, grid_of(arrays.num_tokens), is_random_init(fp),
                                     req.model_overrides, fp.get("encoder"))

    def make_data(plan: SplitPlan, cfg: TrainConfig, runtime: dict) -> tuple[Any, Any]:
        dataset, memory = cache_dataset(arrays, plan.train_texts, req.cache_memory, ctx.device, ctx.world_size)
        runtime["cache_memory"] = memory.to_dict()
        if ctx.is_main:
            log.info("%s", memory.describe())
        return dataset, CacheValidator(dataset, plan, arrays.text_video, arrays.text_emb, ctx.device)

    return _Prepared(
        fp=fp, cfg=cfg, model_cfg=model_cfg, seq_source=clip_source_of(fp),
        plan_inputs=(arrays.video_ids, arrays.video_split, arrays.video_done, arrays.text_video),
        text_video=arrays.text_video, where=cache_path, default_name=f"{cfg.dataset}-{cfg.head}",
        make_pair=CachePairModel, make_data=make_data,
        config={"cache": str(cache_path.resolve()), "fingerprint": fp, "end_to_end": False},
    )


def _prepare_end_to_end(ctx: DistContext, req: TrainRequest, saved: dict | None) -> _Prepared:
    from muse_pipeline.cache.fingerprint import build_fingerprint as extract_fingerprint
    from muse_pipeline.data import load_dataset
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.extract.config import ExtractConfig
    from muse_pipeline.training.data import CACHED, EndToEndPairDataset
    from muse_pipeline.training.modules import EndToEndPairModel
    from muse_pipeline.training.validate import EndToEndValidator

    dataset, data_root = req.dataset, req.data_root
    model, pretrained, decoder = req.model, req.pretrained, req.decoder
    overrides = dict(req.train_overrides)
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
        cfg, model_cfg = resumed_configs(saved, overrides, req.head)
    else:
        cfg = TrainConfig.from_preset(dataset, **overrides).replace(head=req.head or "muse", end_to_end=True)
        model_cfg = new_model_config(cfg, encoder.dim, encoder.grid, pretrained is None, req.model_overrides, info)
    # the same identity as a cache of these frames would carry (model, weights, frames, annotations...)
    source = ExtractConfig(dataset=dataset, data_root=Path(data_root), model=model, pretrained=pretrained,
                           frames=cfg.frames, words=cfg.words, decoder=decoder)
    fp = {**extract_fingerprint(source, index, info), "mode": "end-to-end"}
    if saved is not None:
        check_fingerprints(saved.get("fingerprint") or {}, fp, data_root, req.resume)
    text_video = np.asarray([c.video_index for c in index.captions], dtype=np.int64)

    def make_pair(retrieval: Any) -> Any:
        pair = EndToEndPairModel(encoder, retrieval)
        # CLIP's own temperature (and SigLIP-style bias) are unused here: the run's temperature is the
        # RetrievalModel's logit_scale (initialised as CLIP's, trained at the CLIP lr). Frozen, so DDP
        # sees no unused grads.
        encoder.model.logit_scale.requires_grad_(False)
        if getattr(encoder.model, "logit_bias", None) is not None:
            encoder.model.logit_bias.requires_grad_(False)
        return pair

    def make_data(plan: SplitPlan, cfg: TrainConfig, runtime: dict) -> tuple[Any, Any]:
        text_ids = encoder.tokenize([c.text for c in index.captions], cfg.words)
        ds = EndToEndPairDataset(index.videos, text_video, text_ids, plan.train_texts, cfg.frames,
                                 encoder.image_size, encoder.mean, encoder.std, decoder)
        return ds, EndToEndValidator(ds, plan, text_video, ctx.device)

    return _Prepared(
        fp=fp, cfg=cfg, model_cfg=model_cfg,
        seq_source={"model": model, "pretrained": pretrained, "weights": info["weights_id"],
                    "quick_gelu": info["quick_gelu"]},
        plan_inputs=([v.id for v in index.videos], [v.split for v in index.videos],
                     np.full(len(index.videos), CACHED, np.uint8), text_video),
        text_video=text_video, where=data_root, default_name=f"{dataset}-{cfg.head}-e2e",
        make_pair=make_pair, make_data=make_data, clip_model=encoder.model,
        config={"cache": None, "fingerprint": fp, "end_to_end": True},
        config_tail={
            "end_to_end_source": {"dataset": dataset, "data_root": str(Path(data_root).resolve()), "model": model,
                                  "pretrained": pretrained, "decoder": decoder},
            "init_head": str(req.init_head) if req.init_head else None,
        },
    )


def _run(ctx: DistContext, req: TrainRequest, saved: dict | None, runtime: dict[str, Any], prep: _Prepared) -> Any:
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
