"""The training loop (spec section 7): AdamW + warmup/cosine per step, grad clip, global-batch loss,
per-epoch validation and checkpoints, exact resume, NaN stop, Ctrl-C save.

Resume is exact: `state.pt` holds the CURRENT weights, optimizer, scheduler, every rank's RNG states
and the position in the epoch (the sampler order is a function of (seed, epoch), so the finished
batches of an interrupted epoch are skipped, not redone). A run stopped after epoch k, or in the
middle of an epoch by Ctrl-C, and resumed, ends with the same weights as an uninterrupted run.

Ctrl-C: the first one finishes the current step, saves `state.pt` and stops (KeyboardInterrupt is
re-raised); a second one aborts at once. `last.safetensors`/`best.safetensors` are only ever written
at epoch ends, so they always hold finished epochs.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from muse_pipeline.errors import UserError
from muse_pipeline.models.checkpoint import atomic_torch_save, save_run_weights
from muse_pipeline.models.loss import contrastive_loss
from muse_pipeline.models.params import param_groups, recipe_lr_mult
from muse_pipeline.training.config import MAX_LOGIT_SCALE, TrainConfig
from muse_pipeline.training.data import EpochBatchSampler, make_loader
from muse_pipeline.training.distributed import DistContext, barrier
from muse_pipeline.training.schedule import cosine_with_warmup, lr_factor, warmup_steps_for

STATE_VERSION = 1


class NonFiniteLossError(UserError, RuntimeError):
    """The loss (or gradient norm) became NaN/inf: the run stopped, the last good checkpoint is kept."""

    exit_code = 1


@dataclass
class LoopState:
    epoch: int = 0  # next epoch to run (0-based); == epochs when the run is finished
    batch_in_epoch: int = 0  # batches of `epoch` already trained (non-zero only after an interrupt)
    step: int = 0  # optimizer steps done in total
    best_score: float = -math.inf
    best_epoch: int = -1
    loss_sum: float = 0.0  # train loss summed over the finished batches of `epoch`
    loss_count: int = 0


StepHook = Callable[[LoopState], None]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def _graceful_sigint(flag: dict[str, bool]):
    """First SIGINT sets flag["stop"]; the second raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def training_param_groups(pair: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The AdamW groups of spec sections 6-7 for a pair model (`model.` = the RetrievalModel, `clip.` =
    CLIP in end-to-end mode): fusion head and text adapter at lr x head_lr_mult, a head whose
    LR_GROUP is "base" (seqTransf) at lr, logit_scale and CLIP at clip_lr, everything else at lr."""
    head = getattr(pair.model, "head", None)
    mult = recipe_lr_mult(lr=cfg.lr, head_lr_mult=cfg.head_lr_mult, clip_lr=cfg.clip_lr,
                          head_lr_group=getattr(head, "LR_GROUP", "fusion"))
    return param_groups(pair, cfg.lr, cfg.weight_decay, lr_mult=mult)


def effective_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether bf16 autocast really runs: requested AND on CUDA (CPU runs never autocast)."""
    return bool(cfg.amp) and device.type == "cuda"


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """Trains `pair` (a CachePairModel or EndToEndPairModel) on `dataset` (a batch dataset)."""

    def __init__(
        self,
        pair: nn.Module,
        dataset,
        cfg: TrainConfig,
        ctx: DistContext,
        run_dir: Path,
        validate: Callable[[nn.Module], dict | None],
        *,
        quiet: bool = False,
        on_step_end: StepHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = Path(run_dir)
        self.validate = validate
        self.quiet = quiet or not ctx.is_main
        self.on_step_end = on_step_end
        self.dataset = dataset
        self.pair = pair.to(ctx.device)
        self.model = pair.model  # the RetrievalModel: what best/last.safetensors hold
        self.clip = getattr(pair, "clip", None)

        if self.clip is not None and cfg.clip_lr == 0:
            self.clip.requires_grad_(False)
        groups = training_param_groups(self.pair, cfg)
        self.params = [p for g in groups for p in g["params"]]
        for g in groups:
            g.pop("param_names", None)  # keep state.pt independent of torch's named-optimizer format
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

        self.sampler = EpochBatchSampler(len(dataset), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = warmup_steps_for(self.total_steps, cfg.warmup_fraction)
        self.scheduler = cosine_with_warmup(self.optimizer, self.total_steps, self.warmup_steps)

        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.net: nn.Module = DistributedDataParallel(self.pair, device_ids=ids)
        else:
            self.net = self.pair
        self.amp = effective_amp(cfg, ctx.device)
        self.state = LoopState()
        self._last_lr = cfg.lr
        self._rank_rng: list[dict] | None = None

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.pair.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loop": asdict(self.state),
            "world_size": self.ctx.world_size,
            "rng": self._gather_rng(),
            "train": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything saved by `state_dict` (call before `fit`)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state.pt has version {state.get('version')}, this trainer reads {STATE_VERSION}")
        self.pair.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = LoopState(**state["loop"])
        rngs = state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            self._rank_rng = rngs
        else:
            # Another world size: the data order is unchanged (it depends on the global batch only),
            # but per-rank dropout streams cannot be carried over.
            self._rank_rng = None
            seed_everything(self.cfg.seed + 1000 * self.state.epoch + self.ctx.rank)

    def _gather_rng(self) -> list[dict] | None:
        mine = _rng_state()
        if not self.ctx.distributed:
            return [mine]
        out: list | None = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(mine, out, dst=0)
        return out

    def _save_state(self) -> None:
        state = self.state_dict()  # collective under DDP (RNG gather): every rank calls it
        if self.ctx.is_main:
            atomic_torch_save(self.run_dir / "state.pt", state)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------------------------- step
    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self, batch: dict[str, torch.Tensor], stop_requested: bool) -> tuple[float, bool]:
        """One optimizer step; returns (global loss, whether any rank asked to stop)."""
        batch = _to_device(batch, self.ctx.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with autocast:
            text, video = self.net(batch)
        loss = contrastive_loss(text.float(), video.float(), self.model.logit_scale)
        # base lr used by this step (a group's own lr may be 0, e.g. clip_lr 0)
        self._last_lr = self.cfg.lr * lr_factor(self.scheduler.last_epoch, self.total_steps, self.warmup_steps)
        # The mean of the per-rank losses is the global-batch loss (see models/loss.py); the stop
        # flag rides along so every rank takes the same decision at the same step.
        loss_sum, stops = self._reduce([float(loss.detach()), float(stop_requested)])
        global_loss = loss_sum / self.ctx.world_size
        if not math.isfinite(global_loss):
            raise NonFiniteLossError(self._nan_message("loss", global_loss))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            if not torch.isfinite(norm):
                raise NonFiniteLossError(self._nan_message("gradient norm", float(norm)))
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
        return global_loss, stops > 0

    def _nan_message(self, what: str, value: float) -> str:
        kept = (
            f"the last good checkpoint (epoch {self.state.epoch}) is kept in {self.run_dir}"
            if self.state.epoch > 0
            else "no epoch had finished, so there is no checkpoint"
        )
        return (
            f"{what} became {value} at step {self.state.step + 1} (epoch {self.state.epoch + 1}); "
            f"training stopped and {kept}. Try a lower --lr or check the cache for corrupt tokens."
        )

    # ------------------------------------------------------------------------------- epochs
    def _end_epoch(self, epoch: int) -> dict[str, Any]:
        train_loss = self.state.loss_sum / max(1, self.state.loss_count)
        val = self.validate(self.pair) if self.ctx.is_main else None
        score = float(val["t2v"]["R1"]) if val is not None else None
        # Without a validation set, or in a refit run (trained for an epoch count selected before),
        # the latest epoch is the model: no selection here.
        select = score is not None and not self.cfg.refit
        is_best = not select or score > self.state.best_score
        if is_best:
            self.state.best_score = score if select else -math.inf
            self.state.best_epoch = epoch
        self.state.epoch = epoch + 1
        self.state.batch_in_epoch = 0
        self.state.loss_sum, self.state.loss_count = 0.0, 0
        record = {"kind": "epoch", "epoch": epoch + 1, "step": self.state.step, "train_loss": train_loss,
                  "val": val, "best": bool(is_best), "logit_scale": self.logit_scale_value()}
        if self.ctx.is_main:
            save_run_weights(self.run_dir, "last", self.model, clip=self.clip)
            if is_best:
                save_run_weights(self.run_dir, "best", self.model, clip=self.clip)
            self._log(record)
        self._save_state()
        barrier(self.ctx)
        return record

    def logit_scale_value(self) -> float:
        """The (clamped) log temperature now; exp of it multiplies the cosine similarities."""
        return float(self.model.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE))

    def fit(self) -> LoopState:
        """Train from `self.state` to the last epoch. Raises NonFiniteLossError or KeyboardInterrupt."""
        if self._rank_rng is not None:
            _set_rng_state(self._rank_rng[self.ctx.rank])
        # What this process really runs (a resumed run may be on another device than the one that
        # wrote config.json).
        self._log({"kind": "start", "epoch": self.state.epoch + 1, "step": self.state.step,
                   "device": str(self.ctx.device), "amp": self.amp, "world_size": self.ctx.world_size,
                   "logit_scale": self.logit_scale_value()})
        flag = {"stop": False}
        from muse_pipeline.training.progress import TrainProgress

        progress = TrainProgress(self.total_steps, self.state.step, quiet=self.quiet)
        with _graceful_sigint(flag), progress:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                self.sampler.set_epoch(epoch, skip=self.state.batch_in_epoch)
                loader = make_loader(self.dataset, self.sampler, self.cfg.num_workers,
                                     pin_memory=self.ctx.device.type == "cuda")
                self.net.train()
                try:
                    for batch in loader:
                        loss, stop = self.train_step(batch, flag["stop"])
                        self._after_step(epoch, loss, progress)
                        if stop:
                            raise KeyboardInterrupt
                except KeyboardInterrupt:
                    self._save_state()
                    self._log({"kind": "interrupted", "epoch": epoch + 1, "step": self.state.step,
                               "batch_in_epoch": self.state.batch_in_epoch})
                    raise
                finally:
                    del loader
                record = self._end_epoch(epoch)
                progress.epoch_done(record)
        return self.state

    def _after_step(self, epoch: int, loss: float, progress) -> None:
        s = self.state
        s.step += 1
        s.batch_in_epoch += 1
        s.loss_sum += loss
        s.loss_count += 1
        lr = self._last_lr
        if s.step % self.cfg.log_every == 0 or s.batch_in_epoch == self.steps_per_epoch:
            self._log({"kind": "step", "step": s.step, "epoch": epoch + 1, "loss": loss, "lr": lr,
                       "time": time.time()})
        progress.step(loss, lr, epoch + 1)
        if self.on_step_end is not None:
            self.on_step_end(s)
