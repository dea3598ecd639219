"""Trainer tests: schedule, config, split plan, sampler, checkpoints, exact resume, NaN stop, and (with the
real cache/model/encoder pieces) the learning test and the cache errors."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import store_videos
from torch import nn

from muse_pipeline.atomic import atomic_write_json
from muse_pipeline.models.checkpoint import load_weights, save_run_weights
from muse_pipeline.training.config import TrainConfig
from muse_pipeline.training.data import CACHED, FAILED, EpochBatchSampler, plan_splits
from muse_pipeline.training.distributed import DistContext, relaunch_command, strip_gpus_flag
from muse_pipeline.training.loop import NonFiniteLossError, Trainer, seed_everything
from muse_pipeline.training.modules import CachePairModel
from muse_pipeline.training.schedule import cosine_with_warmup, lr_factor
from muse_pipeline.training.validate import metrics_of

CPU = DistContext(0, 1, 0, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ fakes
class TinyRetrieval(nn.Module):
    """A RetrievalModel stand-in: mean of CLS tokens -> Linear -> Dropout (so RNG matters on resume)."""

    def __init__(self, dim: int = 8, drop: float = 0.2) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(drop))
        self.text_adapter = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.float()[..., None]
        pooled = (tokens[:, :, 0].float() * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(self.head(pooled), dim=-1)

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_emb + self.text_adapter(text_emb), dim=-1)


class MemoryPairs(torch.utils.data.Dataset):
    """In-memory batch dataset with the CachePairDataset interface."""

    def __init__(self, n_videos: int = 24, caps: int = 2, t: int = 3, n_tok: int = 2, d: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randn(n_videos, t, n_tok, d, generator=g).half()
        self.mask = torch.ones(n_videos, t, dtype=torch.bool)
        self.mask[::3, -1] = False
        self.text_video = np.repeat(np.arange(n_videos), caps)
        cls = self.tokens[:, :, 0].float().mean(1)
        self.text_emb = (cls[self.text_video] + 0.5 * torch.randn(len(self.text_video), d, generator=g)).half().numpy()
        self.rows = np.arange(len(self.text_video))

    def __len__(self) -> int:
        return len(self.rows)

    def read_videos(self, videos):
        idx = torch.as_tensor(np.asarray(videos))
        return self.tokens[idx], self.mask[idx]

    def __getitem__(self, positions):
        rows = self.rows[np.asarray(positions)]
        tokens, mask = self.read_videos(self.text_video[rows])
        return {"tokens": tokens, "mask": mask, "text_emb": torch.from_numpy(self.text_emb[rows])}


def _validator(data: MemoryPairs):
    def validate(pair):
        with torch.no_grad():
            pair.eval()
            v = pair.model.embed_videos(data.tokens.float(), data.mask)
            t = pair.model.embed_texts(torch.from_numpy(data.text_emb).float())
            pair.train()
        return metrics_of(t, v, data.text_video)

    return validate


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=1e-3, num_workers=0, log_every=1, frames=3, words=8)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(run_dir: Path, cfg: TrainConfig, hook=None, drop: float = 0.2) -> Trainer:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = MemoryPairs()
    seed_everything(cfg.seed)
    pair = CachePairModel(TinyRetrieval(drop=drop))
    seed_everything(cfg.seed)
    return Trainer(pair, data, cfg, CPU, run_dir, _validator(data), quiet=True, on_step_end=hook)


def _resume(run_dir: Path, cfg: TrainConfig) -> Trainer:
    tr = _trainer(run_dir, cfg)
    # a different global RNG than the interrupted process had: restoring must not depend on it
    torch.manual_seed(999)
    tr.load_state_dict(torch.load(run_dir / "state.pt", weights_only=False))
    return tr


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ------------------------------------------------------------------------------------ unit tests
def test_schedule_warmup_then_cosine_matches_formula():
    total, warm = 20, 2
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total, warm)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.5) and seen[1] == pytest.approx(1.0)
    for s in range(warm, total):  # slow, obviously-correct cosine
        assert seen[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    assert all(a >= b for a, b in zip(seen[1:], seen[2:], strict=False))
    assert lr_factor(total, total, warm) == pytest.approx(0.0)


def test_config_presets_overrides_and_errors():
    cfg = TrainConfig.from_preset("msrvtt", lr=2e-4, epochs=None)
    assert (cfg.frames, cfg.words, cfg.batch_size, cfg.epochs, cfg.lr) == (12, 32, 128, 5, 2e-4)
    assert cfg.betas == (0.9, 0.98) and cfg.eps == 1e-6 and cfg.weight_decay == 0.2 and cfg.seed == 42
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(TypeError, match="unknown TrainConfig"):
        TrainConfig.from_preset("msrvtt", learning_rate=1.0)


def test_plan_uses_val_split_and_never_test():
    ids = [f"v{i}" for i in range(6)]
    split = ["train", "train", "val", "test", "train", "val"]
    done = np.array([CACHED, CACHED, CACHED, CACHED, FAILED, CACHED])
    text_video = np.array([0, 0, 1, 2, 3, 4, 5])
    plan = plan_splits(ids, split, done, text_video, val_fraction=0.5)
    assert plan.val_source == "val split"
    assert plan.train_texts.tolist() == [0, 1, 2]  # video 4 failed, 3 is test
    assert plan.val_videos.tolist() == [2, 5] and plan.val_texts.tolist() == [3, 6]


def test_plan_held_out_slice_is_deterministic_and_keeps_captions_together():
    n = 40
    ids = [f"vid{i}" for i in range(n)]
    split = ["train"] * 30 + ["test"] * 10
    text_video = np.repeat(np.arange(n), 3)
    plan = plan_splits(ids, split, np.full(n, CACHED), text_video, val_fraction=0.2)
    assert len(plan.val_videos) == 6 and plan.val_source.startswith("held-out")
    assert set(text_video[plan.val_texts]) == set(plan.val_videos.tolist())
    assert not set(text_video[plan.train_texts]) & set(plan.val_videos.tolist())
    assert max(text_video[plan.train_texts].max(), plan.val_videos.max()) < 30  # no test video
    # the same videos are held out whatever the order of the store
    perm = np.random.default_rng(0).permutation(n)
    inv = np.argsort(perm)
    plan2 = plan_splits([ids[i] for i in perm], [split[i] for i in perm], np.full(n, CACHED), inv[text_video], 0.2)
    assert sorted(ids[perm[v]] for v in plan2.val_videos) == sorted(ids[v] for v in plan.val_videos)
    none = plan_splits(ids, split, np.full(n, CACHED), text_video, val_fraction=0.0)
    assert none.val_source == "none" and not none.has_val


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = EpochBatchSampler(50, 8, 0, 1, seed=3)
    two = [EpochBatchSampler(50, 8, r, 2, seed=3) for r in range(2)]
    for epoch in (0, 1):
        one.set_epoch(epoch)
        for s in two:
            s.set_epoch(epoch)
        single = list(one)
        split = list(zip(*[list(s) for s in two], strict=True))
        assert len(single) == len(split) == 50 // 8
        for b, (r0, r1) in zip(single, split, strict=True):
            assert sorted(b) == sorted(r0 + r1)
    one.set_epoch(1, skip=2)
    assert list(one) == single[2:]
    with pytest.raises(ValueError, match="lower --batch-size"):
        EpochBatchSampler(5, 8)


def test_gpus_relaunch_command():
    argv = ["/venv/bin/muse", "train", "--from-cache", "c.zarr", "--gpus", "4", "--epochs", "2"]
    stripped = strip_gpus_flag(argv)
    assert stripped == ["/venv/bin/muse", "train", "--from-cache", "c.zarr", "--epochs", "2"]
    cmd = relaunch_command(4, stripped)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=4" in cmd
    assert cmd[-len(stripped):] == stripped


def test_checkpoint_roundtrip_and_atomic(tmp_path):
    model = TinyRetrieval()
    path = save_run_weights(tmp_path, "best", model)
    assert path.name == "best.safetensors"
    state, clip = load_weights(tmp_path, "best")
    assert clip == {} and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    atomic_write_json(tmp_path / "config.json", {"a": 1})
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="best"):
        save_run_weights(tmp_path, "middle", model)


# --------------------------------------------------------------------------------- loop behaviour
def test_training_lowers_loss_and_writes_run_files(tmp_path):
    tr = _trainer(tmp_path, _cfg(epochs=4))
    tr.fit()
    for f in ("best.safetensors", "last.safetensors", "state.pt"):
        assert (tmp_path / f).is_file()
    steps, epochs = _records(tmp_path, "step"), _records(tmp_path, "epoch")
    assert len(steps) == tr.total_steps == 4 * (48 // 8)
    assert {"step", "epoch", "loss", "lr"} <= set(steps[0])
    assert len(epochs) == 4 and {"epoch", "train_loss", "val"} <= set(epochs[0])
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert "R1" in epochs[0]["val"]["t2v"]
    # lr: warmup ramps up, then it decays
    lrs = [s["lr"] for s in steps]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[2]


@pytest.mark.parametrize("stop_at", ["epoch", "mid-epoch"])
def test_resume_gives_the_same_weights(tmp_path, stop_at):
    cfg = _cfg()
    full = _trainer(tmp_path / "full", cfg)
    full.fit()
    want = _weights(full)

    per_epoch = full.steps_per_epoch
    stop_step = per_epoch if stop_at == "epoch" else per_epoch + 2

    def hook(state):
        if state.step == stop_step:
            raise KeyboardInterrupt

    part = _trainer(tmp_path / "part", cfg, hook=hook)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert not torch.equal(_weights(part)["head.0.weight"], want["head.0.weight"])
    resumed = _resume(tmp_path / "part", cfg)
    assert resumed.state.step == stop_step
    resumed.fit()
    got = _weights(resumed)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert _records(tmp_path / "part", "epoch")[-1]["epoch"] == cfg.epochs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import muse_pipeline.training.loop as loop

    cfg = _cfg(epochs=3)
    tr = _trainer(tmp_path, cfg)
    good_after_epoch1 = {}
    real_loss = loop.contrastive_loss
    calls = {"n": 0}

    def flaky_loss(t, v, s):
        calls["n"] += 1
        if calls["n"] == tr.steps_per_epoch + 3:
            return real_loss(t, v, s) * float("nan")
        return real_loss(t, v, s)

    def hook(state):
        if state.step == tr.steps_per_epoch:
            good_after_epoch1.update(_weights(tr))

    tr.on_step_end = hook
    monkeypatch.setattr(loop, "contrastive_loss", flaky_loss)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step \d+ .*last good checkpoint \(epoch 1\)"):
        tr.fit()
    last, _ = load_weights(tmp_path, "last")
    for k, v in good_after_epoch1.items():
        assert torch.equal(last[k], v), k
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["loop"]["epoch"] == 1 and state["loop"]["batch_in_epoch"] == 0


# ------------------------------------------------------------------------ cache checks (real store)
def _filled_cache(path: Path, fingerprint: dict, n_videos: int = 12, pending: int = 0, n_val: int = 2) -> Path:
    """A FeatureCache of random tokens (no video decoding): grid 2 (L=5), D=8, T=3, two captions/video;
    `n_val` videos in a "val" split, 2 in "test", the rest "train"."""
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem

    splits = ["train"] * (n_videos - 2 - n_val) + ["val"] * n_val + ["test"] * 2
    videos = tuple(VideoItem(f"v{i}", Path(f"v{i}.mp4"), s) for i, s in enumerate(splits))
    caps = tuple(CaptionItem(f"caption {i}{j}", i, s) for i, s in enumerate(splits) for j in range(2))
    index = DatasetIndex("synthetic", path.parent, videos, caps)
    rng = np.random.default_rng(0)
    cache = FeatureCache.create(path, index, frames=3, num_tokens=5, dim=8, words=8, fingerprint=fingerprint,
                                videos_per_shard=4, text_tokens=np.ones((len(caps), 8), np.int32))
    store_videos(cache, {i: rng.standard_normal((1 + i % 3, 5, 8)).astype(np.float16)
                         for i in range(n_videos - pending)})
    cache.write_texts(0, embeddings=rng.standard_normal((len(caps), 8)).astype(np.float16))
    return path


FP = {"dataset": "synthetic", "model": "muse-tiny", "weights": "random-init", "frames": 3, "words": 8,
      "num_tokens": 5, "dim": 8}


def test_missing_or_incomplete_cache_is_refused_before_training(tmp_path):
    from muse_pipeline.stages.train import run_train
    from muse_pipeline.training.data import CacheError

    with pytest.raises(CacheError, match="no cache at .*muse extract"):
        run_train(from_cache=tmp_path / "nope.zarr", runs_dir=tmp_path / "runs", quiet=True)
    partial = _filled_cache(tmp_path / "partial.zarr", FP, pending=3)
    with pytest.raises(CacheError, match=r"3 of 12 videos are still pending.*Re-run the same `muse extract`"):
        run_train(from_cache=partial, runs_dir=tmp_path / "runs", quiet=True)
    assert not (tmp_path / "runs").exists()


def test_resume_against_another_cache_is_refused(tmp_path):
    from muse_pipeline.stages.train import ConfigMismatch, run_train

    other = _filled_cache(tmp_path / "b16.zarr", {**FP, "model": "ViT-B-16", "frames": 3})
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    atomic_write_json(run / "config.json", {"model": {}, "train": _cfg().to_dict(), "cache": str(other),
                                            "fingerprint": FP, "end_to_end": False})
    torch.save({}, run / "state.pt")
    with pytest.raises(ConfigMismatch, match=r"model: run 'muse-tiny' vs cache 'ViT-B-16'"):
        run_train(from_cache=other, resume=run, quiet=True)
    same = _filled_cache(tmp_path / "same.zarr", FP)
    with pytest.raises(ConfigMismatch, match=r"epochs: run 3 vs given 7"):
        run_train(from_cache=same, resume=run, epochs=7, quiet=True)


def test_cache_dataset_reads_batches_with_repeated_videos(tmp_path):
    from muse_pipeline.training.data import CachePairDataset, open_cache_arrays

    arrays = open_cache_arrays(_filled_cache(tmp_path / "c.zarr", FP))
    ds = CachePairDataset(arrays, np.arange(len(arrays.text_video)))
    batch = ds[[5, 0, 1, 4]]  # texts of videos 2, 0, 0, 2
    assert batch["tokens"].shape == (4, 3, 5, 8) and batch["tokens"].dtype == torch.float16
    assert torch.equal(batch["tokens"][1], batch["tokens"][2]) and torch.equal(batch["tokens"][0], batch["tokens"][3])
    assert batch["mask"][0].tolist() == [True, True, True] and batch["mask"][1].tolist() == [True, False, False]
    assert torch.equal(batch["text_emb"], torch.from_numpy(arrays.text_emb[[5, 0, 1, 4]]))


def _record_batches(monkeypatch) -> dict[int, list[np.ndarray]]:
    """Every batch each training dataset instance serves, as cache text rows (num_workers=0), whether
    the tokens are read from the cache or held in memory (`--cache-memory`)."""
    from muse_pipeline.training.data import CachePairDataset, InMemoryCachePairDataset

    seen: dict[int, list[np.ndarray]] = {}

    def recording(original):
        def getitem(self, positions):
            seen.setdefault(id(self), []).append(self.text_rows[np.asarray(positions)])
            return original(self, positions)
        return getitem

    for cls in (CachePairDataset, InMemoryCachePairDataset):
        monkeypatch.setattr(cls, "__getitem__", recording(cls.__dict__["__getitem__"]))
    return seen


def test_refit_trains_on_every_training_video(tmp_path, monkeypatch, caplog):
    """--refit: selection on a held-out slice of train, then a run on ALL training videos (every caption
    of every train video) for the selected number of epochs; the last epoch is its model."""
    from muse_pipeline.stages.train import run_train
    from muse_pipeline.training.data import open_cache_arrays

    cache = _filled_cache(tmp_path / "c.zarr", FP, n_videos=12, n_val=0)  # 10 train videos, no val split
    arrays = open_cache_arrays(cache)
    train_rows = {int(r) for r in np.flatnonzero(arrays.video_split[arrays.text_video] == "train")}
    assert len(train_rows) == 20
    seen = _record_batches(monkeypatch)
    # on our logger itself: an earlier CLI test in this process may have left it at WARNING (--quiet)
    caplog.set_level(logging.INFO, logger="muse_pipeline")
    refit = run_train(from_cache=cache, runs_dir=tmp_path / "runs", name="sel", head="meanP", epochs=3,
                      batch_size=4, val_fraction=0.2, num_workers=0, quiet=True, refit=True)
    said = [r.getMessage() for r in caplog.records]
    # the refit run says what it does, not that a validation set is missing
    assert not [m for m in said if "no validation set" in m]
    assert [m for m in said if m.startswith("refit: training on all 20 training pairs for ")]
    selection = tmp_path / "runs" / "sel"
    assert refit == tmp_path / "runs" / "sel-refit"
    sel_cfg = json.loads((selection / "config.json").read_text())
    cfg = json.loads((refit / "config.json").read_text())
    assert sel_cfg["protocol"]["kind"] == "selection" and sel_cfg["n_train_videos"] == 8
    best = [r["epoch"] for r in _records(selection, "epoch") if r["best"]][-1]
    assert cfg["protocol"] == {**cfg["protocol"], "kind": "refit", "selected_epochs": best,
                               "selection_run": str(selection.resolve())}
    assert cfg["train"]["epochs"] == best and cfg["train"]["refit"] is True and cfg["train"]["val_fraction"] == 0
    assert cfg["n_train_videos"] == 10 and cfg["n_train_texts"] == 20 and cfg["val_source"] == "none"
    # what the two runs really read: selection 16 pairs x 3 epochs, refit all 20 pairs x `best` epochs
    first, second = (np.concatenate(b) for b in seen.values())
    assert len(first) == 16 * 3 and set(first.tolist()) < train_rows
    assert len(second) == 20 * best and set(second.tolist()) == train_rows
    assert sorted(np.bincount(second, minlength=24)[sorted(train_rows)].tolist()) == [best] * 20
    epochs = _records(refit, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(1, best + 1)) and all(r["best"] for r in epochs)
    # running it again resumes both finished runs: nothing trains twice
    seen.clear()
    assert run_train(resume=selection, quiet=True, refit=True, num_workers=0) == refit
    assert not seen


def test_refit_without_validation_is_refused_before_training(tmp_path):
    from muse_pipeline.stages.train import run_train
    from muse_pipeline.training.data import CacheError

    cache = _filled_cache(tmp_path / "c.zarr", FP, n_videos=12, n_val=0)
    with pytest.raises(CacheError, match="--refit .* no validation set"):
        run_train(from_cache=cache, runs_dir=tmp_path / "runs", head="meanP", epochs=1, batch_size=4,
                  val_fraction=0.0, num_workers=0, quiet=True, refit=True)
    assert not (tmp_path / "runs").exists()


def test_config_records_what_ran_and_logit_scale(tmp_path):
    """CPU: amp false in config.json (autocast never ran); logit_scale at the CLIP lr stays put and is
    recorded per epoch; init ln(1/0.07) for random-init CLIP (spec section 7)."""
    from muse_pipeline.stages.train import run_train

    cache = _filled_cache(tmp_path / "c.zarr", FP)
    run = run_train(from_cache=cache, runs_dir=tmp_path / "runs", head="meanP", epochs=2, batch_size=4,
                    num_workers=0, quiet=True, device="cpu")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["amp"] is False
    assert [r["amp"] for r in _records(run, "start")] == [False]
    assert cfg["logit_scale"]["init"] == pytest.approx(math.log(1 / 0.07)) and cfg["logit_scale"]["lr"] == 1e-7
    values = [r["logit_scale"] for r in _records(run, "epoch")]
    assert len(values) == 2 and all(abs(v - math.log(1 / 0.07)) < 1e-5 for v in values)
    assert cfg["init"]["head"].startswith("seeded random init")


def _seqtransf_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A cache whose fingerprint names a tiny CLIP saved to a weights FILE (D=64, 7x7 grid)."""
    import open_clip

    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem
    from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config

    register_tiny_config()
    torch.manual_seed(5)
    weights = tmp_path / "tiny.pt"
    clip = open_clip.create_model("muse-tiny")
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)  # neither ln(100) nor open_clip's ln(1/0.07): it must come from the file
    torch.save(clip.state_dict(), weights)
    info = ClipEncoder("muse-tiny", pretrained=str(weights)).describe()
    fp = {**FP, "pretrained": str(weights), "weights": info["weights_id"], "num_tokens": 50, "dim": 64,
          "encoder": info}
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    videos = tuple(VideoItem(f"v{i}", Path(f"v{i}.mp4"), s) for i, s in enumerate(splits))
    caps = tuple(CaptionItem(f"caption {i}", i, s) for i, s in enumerate(splits))
    path = tmp_path / "seq.zarr"
    cache = FeatureCache.create(path, DatasetIndex("synthetic", tmp_path, videos, caps), frames=3, num_tokens=50,
                                dim=64, words=8, fingerprint=fp, videos_per_shard=4,
                                text_tokens=np.ones((len(caps), 8), np.int32))
    rng = np.random.default_rng(0)
    store_videos(cache, {i: rng.standard_normal((1 + i % 3, 50, 64)).astype(np.float16) for i in range(len(videos))})
    cache.write_texts(0, embeddings=rng.standard_normal((len(caps), 64)).astype(np.float16))
    return path, weights


def test_seqtransf_run_starts_from_the_cache_clip_text_layers(tmp_path, caplog):
    """A from-cache seqTransf run loads the CLIP the fingerprint names (a weights file here) and starts
    from its text layers; config.json says so, and the console says that layers 2-3 stay random (this
    CLIP has 2 text layers). logit_scale starts from the file's value (recorded at extraction)."""
    from muse_pipeline.models.checkpoint import load_run
    from muse_pipeline.stages.train import run_train

    cache, weights = _seqtransf_cache(tmp_path)
    clip_sd = torch.load(weights, weights_only=True)
    caplog.set_level(logging.WARNING)
    run = run_train(from_cache=cache, runs_dir=tmp_path / "runs", head="seqTransf", epochs=1, batch_size=4,
                    lr=1e-12, clip_lr=0.0, num_workers=0, quiet=True)
    assert [r.getMessage() for r in caplog.records if "random init" in r.getMessage()] == [
        "seqTransf layers 2-3 start from random init: CLIP muse-tiny has only 2 text layers to copy (CLIP4Clip copies 4)"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"]["seqtransf"]["copy"] is True and cfg["init"]["seqtransf"]["copied_layers"] == 2
    assert cfg["logit_scale"]["init"] == pytest.approx(3.0) and cfg["model"]["logit_scale_init"] == pytest.approx(3.0)
    assert float(load_run(run, "last")[0].logit_scale.detach()) == pytest.approx(3.0)
    assert cfg["model"]["transformer_heads"] == 2 and cfg["model"]["transformer_act"] == "gelu"
    model, _ = load_run(run, "last")
    sd = model.head.state_dict()
    # lr 1e-12 for 2 steps: the weights are still CLIP's to float precision
    torch.testing.assert_close(sd["transformer.0.attn.qkv.weight"], clip_sd["transformer.resblocks.0.attn.in_proj_weight"])
    torch.testing.assert_close(sd["transformer.1.mlp.2.weight"], clip_sd["transformer.resblocks.1.mlp.c_proj.weight"])
    torch.testing.assert_close(sd["frame_position_embeddings.weight"], clip_sd["positional_embedding"][:3])


@pytest.mark.parametrize("damage", ["junk", "other weights"])
def test_seqtransf_weights_file_replaced_after_extraction_is_one_error_line(tmp_path, damage):
    """The CLIP file the cache names was overwritten (junk bytes, or other weights): one error line
    naming the file and what to do, before a run directory is written."""
    from muse_pipeline.errors import UserError
    from muse_pipeline.stages.train import run_train

    cache, weights = _seqtransf_cache(tmp_path)
    if damage == "junk":
        weights.write_bytes(b"\x80\x04 not a checkpoint any more" * 100)
    else:
        sd = torch.load(weights, weights_only=True)
        sd["logit_scale"] = sd["logit_scale"] + 1.0
        torch.save(sd, weights)
    with pytest.raises(UserError) as err:
        run_train(from_cache=cache, runs_dir=tmp_path / "runs", head="seqTransf", epochs=1, batch_size=4,
                  num_workers=0, quiet=True)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message
    assert "changed after extraction; restore the original weights file" in message
    assert not (tmp_path / "runs").exists()


def test_logit_scale_init_from_the_cache_record():
    """spec section 7: CLIP's own value, clamped to ln(100); caches without the record keep ln(100)
    for pretrained CLIP and ln(1/0.07) for random init."""
    from muse_pipeline.models.retrieval import initial_logit_scale

    assert initial_logit_scale({"logit_scale": 2.5}, random_init=False) == 2.5
    assert initial_logit_scale({"logit_scale": 4.60546875}, random_init=False) == math.log(100)  # OpenAI's, in fp16
    assert initial_logit_scale({"weights_id": "x"}, random_init=False) == math.log(100)
    assert initial_logit_scale(None, random_init=True) == math.log(1 / 0.07)


def test_refit_note_says_what_the_run_does():
    cfg = TrainConfig(epochs=3, batch_size=4, refit=True)
    assert cfg.refit_note(20) == ("refit: training on all 20 training pairs for 3 epoch(s) (the count validation "
                                  "selected); no selection, the last epoch is kept (best = last)")
    assert cfg.refit_note(22).endswith("; 2 of the 22 pairs are left out of each epoch by drop_last "
                                       "(a different set each epoch)")


def test_print_param_groups_lists_recipe_groups(tmp_path):
    """`muse train --print-param-groups`: name, shape, group, lr, wd per parameter; no run is written."""
    from typer.testing import CliRunner

    from muse_pipeline.cli.main import app

    cache = _filled_cache(tmp_path / "c.zarr", FP)
    runner = CliRunner()

    def table(head: str) -> dict[str, dict]:
        res = runner.invoke(app, ["train", "--from-cache", str(cache), "--head", head, "--print-param-groups",
                                  "--lr", "1e-4", "--runs-dir", str(tmp_path / "runs")])
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        assert lines[0].split() == ["name", "shape", "group", "lr", "weight_decay"]
        rows = {}
        for line in lines[1:lines.index("")]:
            name, shape, group, lr, wd = line.split()
            rows[name] = {"shape": shape, "group": group, "lr": float(lr), "wd": float(wd)}
        return rows

    seq = table("seqTransf")
    muse = table("muse")
    assert not (tmp_path / "runs").exists()
    for rows in (seq, muse):
        for name, r in rows.items():
            leaf = name.rsplit(".", 1)[-1]
            # biases and norm weights are the 1-D tensors (matrices are "AxB")
            no_decay = leaf in ("bias", "A_log", "D", "logit_scale") or "x" not in r["shape"]
            assert (r["wd"] == 0.0) == no_decay, name
            assert (r["wd"] == 0.2) == (not no_decay), name
        assert rows["model.logit_scale"]["lr"] == pytest.approx(1e-7) and rows["model.logit_scale"]["shape"] == "scalar"
        assert rows["model.text_adapter.fc.weight"]["lr"] == pytest.approx(1e-3)
    assert all(r["lr"] == pytest.approx(1e-4) for n, r in seq.items() if n.startswith("model.head."))
    assert seq["model.head.transformer.0.attn.qkv.weight"]["shape"] == "24x8"
    assert all(r["lr"] == pytest.approx(1e-3) for n, r in muse.items() if n.startswith("model.head."))
    assert muse["model.head.fusion.blocks.0.mixer.fwd.A_log"]["wd"] == 0.0


def _spy_trainers(monkeypatch) -> list[Trainer]:
    """Every Trainer a run builds (its real optimizer is what the test reads)."""
    built: list[Trainer] = []
    real_init = Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Trainer, "__init__", init)
    return built


def assert_recipe_optimizer(trainer: Trainer, lr: float, head_mult: float, clip_lr: float, wd: float) -> None:
    """The optimizer that trained: each parameter's group lr (before the schedule) and weight decay are
    spec section 7's, written out here by name; the schedule scaled every group alike."""
    names = {id(p): n for n, p in trainer.pair.named_parameters() if p.requires_grad}
    seen = []
    factors = set()
    for group in trainer.optimizer.param_groups:
        factors.add(round(group["lr"] / group["initial_lr"], 12))
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            if name == "model.logit_scale" or name.startswith("clip."):
                want_lr = clip_lr
            elif name.startswith(("model.head.", "model.text_adapter.")):
                want_lr = lr * head_mult
            else:
                want_lr = lr
            leaf = name.rsplit(".", 1)[-1]
            no_decay = p.ndim < 2 or leaf in ("A_log", "D") or "norm" in name.lower()
            assert group["initial_lr"] == pytest.approx(want_lr, rel=1e-12), name
            assert group["weight_decay"] == (0.0 if no_decay else wd), name
    assert sorted(seen) == sorted(names.values())  # every trainable parameter, exactly once
    assert len(factors) == 1


def test_the_real_optimizer_has_the_recipe_groups(tmp_path, monkeypatch):
    """Not the rows a helper computes: the param groups of the AdamW that a `muse` run trained with."""
    from muse_pipeline.stages.train import run_train

    cache = _filled_cache(tmp_path / "c.zarr", FP)
    trainers = _spy_trainers(monkeypatch)
    run_train(from_cache=cache, runs_dir=tmp_path / "runs", head="muse", epochs=1, batch_size=4, lr=2e-4,
              clip_lr=3e-7, weight_decay=0.1, num_workers=0, quiet=True, model_overrides={"depth": 1, "d_state": 4})
    (trainer,) = trainers
    assert trainer.state.step > 0  # it trained
    names = [n for n, _ in trainer.pair.named_parameters()]
    assert any(n.endswith("A_log") for n in names) and any("norm" in n for n in names)
    assert_recipe_optimizer(trainer, lr=2e-4, head_mult=10.0, clip_lr=3e-7, wd=0.1)


# ------------------------------------------------------------------------------- learning works
LEARN_VIDEOS = 192  # synthetic splits 50/25/25 -> 96 train, 48 val, 48 test videos (24 were too noisy)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    from muse_pipeline.data.synthetic import generate_synthetic
    from muse_pipeline.stages.extract import run_extract

    base = tmp_path_factory.mktemp("learn")
    root = generate_synthetic(base / "data", n_videos=LEARN_VIDEOS, seed=0)
    summary = run_extract(dataset="synthetic", data_root=root, out=base / "cache.zarr", model="muse-tiny",
                          frames=4, workers=0, quiet=True)
    assert summary.n_failed == 0
    return Path(summary.store)


@pytest.mark.slow
def test_muse_head_learns_beyond_chance_and_zero_shot(tiny_cache, tmp_path):
    """Random-init muse-tiny CLIP: the head + text adapter trained from the cache beat chance and
    zero-shot meanP on held-out TEST videos (model selection used the val split only)."""
    from muse_pipeline.models.checkpoint import load_run
    from muse_pipeline.stages.evaluate import evaluate_run, evaluate_zero_shot
    from muse_pipeline.stages.train import run_train

    torch.set_num_threads(2)
    # A one-block, d_state-4 MUSE head keeps the pure-torch scan affordable on 2 CPU cores.
    # lr 3e-3 (head 3e-2), 10 epochs: measured on 2 CPUs, R@1 ~20% against 2% chance, in ~70 s.
    run = run_train(from_cache=tiny_cache, runs_dir=tmp_path, name="learn", head="muse", epochs=10,
                    batch_size=16, lr=3e-3, num_workers=0, quiet=True,
                    model_overrides={"depth": 1, "d_state": 4})
    config = json.loads((run / "config.json").read_text())
    assert config["val_source"] == "val split" and config["model"]["head"] == "muse"
    model, _ = load_run(run, "best")
    assert model.cfg.head == "muse"
    trained = evaluate_run(run)["metrics"]["t2v"]["R1"]
    zero_shot = evaluate_zero_shot(tiny_cache)["metrics"]["t2v"]["R1"]
    chance = 100.0 / (LEARN_VIDEOS // 4)
    assert trained >= 4 * chance, (trained, zero_shot)
    assert trained >= zero_shot + 8.0, (trained, zero_shot)


def test_end_to_end_run_trains_clip_and_evaluates(synthetic_root, tmp_path, monkeypatch):
    """CLIP in the loop: a real end-to-end run through run_train, then muse eval on its own CLIP."""
    from muse_pipeline.stages.evaluate import evaluate_run
    from muse_pipeline.stages.train import run_train

    trainers = _spy_trainers(monkeypatch)
    run = run_train(end_to_end=True, dataset="synthetic", data_root=synthetic_root, model="muse-tiny",
                    head="meanP", runs_dir=tmp_path, name="e2e", epochs=1, batch_size=4, frames=2,
                    clip_lr=1e-3, num_workers=0, quiet=True)
    # CLIP's towers and logit_scale at the CLIP lr, in the optimizer that trained them
    (trainer,) = trainers
    assert any(n.startswith("clip.") for n, _ in trainer.pair.named_parameters())
    assert_recipe_optimizer(trainer, lr=TrainConfig.from_preset("synthetic").lr, head_mult=10.0, clip_lr=1e-3, wd=0.2)
    config = json.loads((run / "config.json").read_text())
    assert config["end_to_end"] is True
    _, clip_tensors = load_weights(run, "last")
    assert clip_tensors, "an end-to-end run must save its fine-tuned CLIP"
    from muse_pipeline.encoders.clip import ClipEncoder, register_tiny_config

    register_tiny_config()
    initial = ClipEncoder("muse-tiny").model.state_dict()
    moved = [k for k, v in clip_tensors.items() if not torch.equal(v, initial[k])]
    assert moved, "CLIP weights did not change in end-to-end training"
    # The evaluation half: `muse eval` of the run vs a brute-force recomputation from the run's BEST
    # weights (open_clip's own encode_image/encode_text of the fine-tuned CLIP, meanP and the text
    # adapter written out here), per query and in R@1, on the test split and on the larger train split.
    model_sd, best_clip = load_weights(run, "best")
    clip = open_clip_model("muse-tiny", best_clip)
    initial_clip = open_clip_model("muse-tiny", initial)
    for split in ("test", "train"):
        result = evaluate_run(run, split=split)
        ranks, sim = brute_force_t2v(synthetic_root, split, clip, model_sd, frames=2, words=config["train"]["words"])
        assert result["counts"]["videos"] == sim.shape[1] and result["counts"]["texts"] == sim.shape[0]
        assert result["per_query"]["t2v"]["rank"] == ranks.tolist(), split
        assert result["metrics"]["t2v"]["R1"] == pytest.approx(100.0 * float(np.mean(ranks == 1)))
        # and the similarities are the fine-tuned CLIP's: the initial one gives other numbers
        _, sim0 = brute_force_t2v(synthetic_root, split, initial_clip, model_sd, frames=2, words=config["train"]["words"])
        assert not torch.allclose(sim, sim0, atol=1e-4)


def open_clip_model(name: str, state: dict) -> nn.Module:
    import open_clip

    from muse_pipeline.encoders.clip import register_tiny_config

    register_tiny_config()
    model = open_clip.create_model(name)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def brute_force_t2v(root: Path, split: str, clip: nn.Module, head_sd: dict, frames: int, words: int):
    """(t2v ranks [M], sim [M, N]) of a meanP end-to-end run on `split`, from first principles: rank = 1 +
    the number of OTHER videos scoring >= the caption's own (ties count against the query)."""
    import open_clip

    from muse_pipeline.data import load_dataset
    from muse_pipeline.training.data import EndToEndPairDataset

    index = load_dataset("synthetic", root)
    rows = [i for i, v in enumerate(index.videos) if v.split == split]
    captions = [c for c in index.captions if c.video_index in rows]
    pp = open_clip.get_model_preprocess_cfg(clip)
    empty = np.zeros(0, np.int64)
    decoded = EndToEndPairDataset(index.videos, empty, empty, empty, frames, 224, pp["mean"], pp["std"], "pyav")
    videos = []
    for row in rows:  # meanP: mean of the unit CLS features of the real frames, made unit again
        pixels, mask = decoded.video_batch([row])
        cls = F.normalize(clip.encode_image(pixels[0][mask[0]]), dim=-1)
        videos.append(F.normalize(cls.mean(0), dim=-1))
    tokenizer = open_clip.get_tokenizer("muse-tiny")
    ids = torch.zeros(len(captions), 77, dtype=torch.long)
    for i, c in enumerate(captions):  # <sot> + bpe[:words-2] + <eot>, as the cache stores them
        bpe = [tokenizer.sot_token_id, *tokenizer.encode(c.text)[: words - 2], tokenizer.eot_token_id]
        ids[i, : len(bpe)] = torch.tensor(bpe)
    text = clip.encode_text(ids)
    text = F.normalize(text + text @ head_sd["text_adapter.fc.weight"].T + head_sd["text_adapter.fc.bias"], dim=-1)
    sim = text @ torch.stack(videos).T
    own = torch.tensor([rows.index(c.video_index) for c in captions])
    true_score = sim[torch.arange(len(captions)), own]
    ranks = 1 + (sim >= true_score[:, None]).sum(1) - 1  # the >= count includes the true video itself
    return ranks.numpy(), sim


def test_train_request_takes_run_train_keywords_and_collects_train_fields():
    from muse_pipeline.training.request import TrainRequest

    req = TrainRequest.from_kwargs(from_cache="c.zarr", head="muse", quiet=True, epochs=3, lr=None, frames=8)
    assert (req.from_cache, req.head, req.quiet) == ("c.zarr", "muse", True)
    assert dict(req.train_overrides) == {"epochs": 3, "lr": None, "frames": 8}
    assert req.replace(describe_only=True).describe_only and not req.describe_only  # frozen: replace copies


def test_padded_frame_tokens_encodes_only_real_frames() -> None:
    from muse_pipeline.training.modules import padded_frame_tokens

    class CountingEncoder:
        seen = 0

        def frame_tokens(self, pixels):  # [n, 3, S, S] -> [n, L=2, D=3]: the frame's pixel sum, twice
            CountingEncoder.seen += len(pixels)
            return pixels.sum(dim=(1, 2, 3))[:, None, None].expand(-1, 2, 3).clone()

    pixels = torch.arange(2 * 3 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 3, 2, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.uint8)
    tokens = padded_frame_tokens(CountingEncoder(), pixels, mask)
    assert tokens.shape == (2, 3, 2, 3) and CountingEncoder.seen == 3
    for b in range(2):
        for t in range(3):
            want = float(pixels[b, t].sum()) if mask[b, t] else 0.0
            assert torch.all(tokens[b, t] == want)
