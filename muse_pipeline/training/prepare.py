"""A training run's data source, prepared before the run is built: from a feature cache or end to end.

`prepare_from_cache` / `prepare_end_to_end` (ctx, TrainRequest, saved config.json or None) ->
`PreparedSource`: the run's configs, the split inputs, what errors name, and two factories the run
body calls once the split plan is made: `make_pair(RetrievalModel)` -> the trained module,
`make_data(SplitPlan, TrainConfig, runtime dict)` -> (training dataset, validator). A resumed run
(`saved`) keeps its saved configs and must match its fingerprint (ConfigMismatch otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muse_pipeline.training.config import TrainConfig
from muse_pipeline.training.data import SplitPlan
from muse_pipeline.training.distributed import DistContext
from muse_pipeline.training.request import TrainRequest
from muse_pipeline.training.run_setup import (
    ConfigMismatch,
    check_fingerprints,
    clip_source_of,
    grid_of,
    is_random_init,
    new_model_config,
    preset_names,
    resumed_configs,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedSource:
    """What a data source contributes before the shared body of a run (stages/train.py `_run`).

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


def prepare_from_cache(ctx: DistContext, req: TrainRequest, saved: dict | None, cache_path: Path) -> PreparedSource:
    """A run from a feature cache: the configs (new from the preset and the cache, or `saved`'s
    after the fingerprint check), the cache's splits, and cache-backed data (CLIP is not loaded).
    ConfigMismatch for --frames / --words that differ from the cache's."""
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

    return PreparedSource(
        fp=fp, cfg=cfg, model_cfg=model_cfg, seq_source=clip_source_of(fp),
        plan_inputs=(arrays.video_ids, arrays.video_split, arrays.video_done, arrays.text_video),
        text_video=arrays.text_video, where=cache_path, default_name=f"{cfg.dataset}-{cfg.head}",
        make_pair=CachePairModel, make_data=make_data,
        config={"cache": str(cache_path.resolve()), "fingerprint": fp, "end_to_end": False},
    )


def prepare_end_to_end(ctx: DistContext, req: TrainRequest, saved: dict | None) -> PreparedSource:
    """An end-to-end run: the dataset's annotations, CLIP built on the CPU (trained with the head),
    the fingerprint a cache of these frames would carry, and data decoded from the video files.
    ValueError without a dataset and data root (new run)."""
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

    return PreparedSource(
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
