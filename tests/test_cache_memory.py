"""`muse train --cache-memory`: training tokens held in RAM (or on the GPU) give the same batches and
the same training as reading the cache; `auto` decides from sizes and free memory; runtime choices
(kernel backends, cache memory) are recorded in config.json; DDP timeout and --require-kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import store_videos
from safetensors.torch import load_file

from muse_pipeline.errors import InputError
from muse_pipeline.training.data import (
    CachePairDataset,
    InMemoryCachePairDataset,
    choose_cache_memory,
    make_loader,
    open_cache_arrays,
    plan_splits,
)

FP = {"dataset": "synthetic", "model": "muse-tiny", "weights": "random-init", "frames": 3, "words": 8,
      "num_tokens": 5, "dim": 8}
GIB = 2**30


def _cache(path: Path, n_videos: int = 14) -> Path:
    """Random tokens, 1-3 real frames per video, two captions per video; shards of 4 videos."""
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem

    splits = ["train"] * (n_videos - 4) + ["val"] * 2 + ["test"] * 2
    videos = tuple(VideoItem(f"v{i}", Path(f"v{i}.mp4"), s) for i, s in enumerate(splits))
    caps = tuple(CaptionItem(f"caption {i}{j}", i, s) for i, s in enumerate(splits) for j in range(2))
    rng = np.random.default_rng(0)
    cache = FeatureCache.create(path, DatasetIndex("synthetic", path.parent, videos, caps), frames=3,
                                num_tokens=5, dim=8, words=8, fingerprint=FP, videos_per_shard=4,
                                text_tokens=np.ones((len(caps), 8), np.int32))
    store_videos(cache, {i: rng.standard_normal((1 + i % 3, 5, 8)).astype(np.float16) for i in range(n_videos)})
    cache.write_texts(0, embeddings=rng.standard_normal((len(caps), 8)).astype(np.float16))
    return path


def test_ram_and_off_give_identical_batches(tmp_path):
    arrays = open_cache_arrays(_cache(tmp_path / "c.zarr"))
    plan = plan_splits(arrays.video_ids, arrays.video_split, arrays.video_done, arrays.text_video, 0.0)
    off = CachePairDataset(arrays, plan.train_texts)
    ram = InMemoryCachePairDataset(arrays, plan.train_texts, torch.device("cpu"), pin=False)
    assert ram.tokens.shape[0] == 10  # the training videos only
    for positions in ([0, 1, 2, 3], [7, 7, 0, 19], list(range(20))[::-1]):
        a, b = off[positions], ram[positions]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # validation videos are not held: read from the cache, still equal
    for videos in (plan.val_videos, np.array([11, 0, 10])):
        for x, y in zip(off.read_videos(videos), ram.read_videos(videos), strict=True):
            assert torch.equal(x, y)
    # the loader gathers in the main process (no workers copying the tensor)
    from muse_pipeline.training.data import EpochBatchSampler

    loader = make_loader(ram, EpochBatchSampler(len(ram), 4), num_workers=2)
    assert loader.num_workers == 0 and not loader.pin_memory
    assert len(list(loader)) == 5


def test_auto_decides_from_sizes_and_says_why():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    got = choose_cache_memory("auto", 5 * GIB, cuda, free_device=70 * GIB, free_ram=100 * GIB)
    assert got.mode == "device" and "free on cuda:0" in got.describe()
    assert choose_cache_memory("auto", 5 * GIB, cuda, free_device=10 * GIB, free_ram=100 * GIB).mode == "ram"
    assert choose_cache_memory("auto", 5 * GIB, cpu, free_ram=100 * GIB).mode == "ram"
    assert choose_cache_memory("auto", 5 * GIB, cpu, 8, free_ram=60 * GIB).mode == "off"  # 8 ranks' copies
    off = choose_cache_memory("auto", 50 * GIB, cpu, free_ram=60 * GIB)
    assert off.mode == "off" and "too large" in off.reason
    assert off.to_dict() == {"mode": "off", "requested": "auto", "token_bytes": 50 * GIB, "reason": off.reason}
    assert choose_cache_memory("off", 1, cpu).mode == "off"
    with pytest.raises(InputError, match="needs a CUDA device"):
        choose_cache_memory("device", 1, cpu)
    with pytest.raises(InputError, match="do not fit"):
        choose_cache_memory("device", 5 * GIB, cuda, free_device=GIB)
    with pytest.raises(InputError, match="exceed"):
        choose_cache_memory("ram", 5 * GIB, cpu, free_ram=GIB)
    with pytest.raises(InputError, match="must be one of"):
        choose_cache_memory("gpu", 1, cpu)


def _train(cache: Path, runs: Path, name: str, mode: str) -> Path:
    from muse_pipeline.stages.train import run_train

    # seqTransf: a head with real weights that trains fast on CPU (the data path is what is compared)
    return run_train(from_cache=cache, runs_dir=runs, name=name, head="seqTransf", epochs=2, batch_size=4,
                     num_workers=1, quiet=True, device="cpu", cache_memory=mode,
                     model_overrides={"transformer_layers": 1})


def test_ram_and_off_train_to_identical_weights_and_record_the_choice(tmp_path):
    cache = _cache(tmp_path / "c.zarr")
    runs = {mode: _train(cache, tmp_path / "runs", mode, mode) for mode in ("off", "ram")}
    for kind in ("last", "best"):
        a = load_file(runs["off"] / f"{kind}.safetensors")
        b = load_file(runs["ram"] / f"{kind}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (kind, key)
    metrics = [(runs[m] / "metrics.jsonl").read_text().splitlines() for m in ("off", "ram")]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines] for lines in metrics]
    assert strip[0] == strip[1]
    for mode, run in runs.items():
        runtime = json.loads((run / "config.json").read_text())["runtime"]
        assert runtime["cache_memory"]["mode"] == mode and runtime["cache_memory"]["requested"] == mode
        assert runtime["backends"]["device"] == "cpu" and runtime["backends"]["scan"]
        assert runtime["backends"]["mixer"] == ("fused-cpu" if runtime["backends"]["scan"] == "numba" else "autograd")


def test_bad_runtime_options_are_refused_before_anything_is_written(tmp_path):
    from muse_pipeline.models.backends import KernelsMissing
    from muse_pipeline.stages.train import run_train

    cache = _cache(tmp_path / "c.zarr")
    runs = tmp_path / "runs"
    with pytest.raises(InputError, match="--nccl-timeout"):
        run_train(from_cache=cache, runs_dir=runs, nccl_timeout=0, quiet=True, device="cpu")
    with pytest.raises(KernelsMissing, match="--require-kernels"):
        run_train(from_cache=cache, runs_dir=runs, require_kernels=True, quiet=True, device="cpu")
    with pytest.raises(InputError, match="--cache-memory device needs a CUDA device"):
        run_train(from_cache=cache, runs_dir=runs, cache_memory="device", quiet=True, device="cpu")
    assert not runs.exists()


def test_process_group_timeout():
    from datetime import timedelta

    from muse_pipeline.training.distributed import DEFAULT_TIMEOUT_S, process_group_timeout

    assert process_group_timeout(None) == timedelta(seconds=DEFAULT_TIMEOUT_S) >= timedelta(hours=1)
    assert process_group_timeout(90) == timedelta(seconds=90)
    for bad in (0, -5, float("nan")):
        with pytest.raises(InputError, match="positive"):
            process_group_timeout(bad)


def test_cli_options_reach_the_trainer_and_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from muse_pipeline.cli.main import app

    cache = _cache(tmp_path / "c.zarr")
    runner = CliRunner()
    base = ["train", "--from-cache", str(cache), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "-q"]
    for extra, message in ((["--require-kernels"], "--require-kernels needs a CUDA device"),
                           (["--cache-memory", "gpu"], "--cache-memory must be one of"),
                           (["--nccl-timeout", "-1"], "--nccl-timeout must be a positive number")):
        res = runner.invoke(app, base + extra)
        assert res.exit_code != 0
        assert f"error: {message}" in res.output.replace("\n", " "), res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()
