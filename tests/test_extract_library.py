"""The extraction library's parts on their own: encoder groups, decode + preprocess (in a thread and
in a decode process), crash counting in a shard's staging folder, the encoder cache, choice lists.
The stage end to end is tests/test_extract.py."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from muse_pipeline.data.synthetic import generate_synthetic
from muse_pipeline.extract.decode_pool import (
    decode_and_preprocess,
    decode_pool,
    decode_retrying,
    shutdown_decode_pools,
)
from muse_pipeline.extract.jobs import ShardJob
from muse_pipeline.extract.staging import ShardStaging
from muse_pipeline.extract.worker import encoder_groups

SIZE, MEAN, STD = 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from muse_pipeline.data import load_dataset

    root = generate_synthetic(tmp_path_factory.mktemp("lib-synth"), n_videos=1, seed=11)
    return Path(load_dataset("synthetic", root).videos[0].path)


def test_encoder_groups_depend_only_on_offsets_and_keep_pending_videos():
    done = np.array([0, 1, 0, 0, 0, 2, 0], np.uint8)
    # groups of three from offset 0, 3, 6; cached (1) and failed (2) videos left out
    assert encoder_groups(7, done, 3) == [[0, 2], [3, 4], [6]]
    assert encoder_groups(3, np.array([1, 2, 1]), 2) == []
    assert encoder_groups(4, np.zeros(4), 1) == [[0], [1], [2], [3]]


def _expected_pixels(path: Path, frames: int) -> np.ndarray:
    from muse_pipeline.video.decode import decode_clip
    from muse_pipeline.video.transforms import preprocess_frames

    return preprocess_frames(decode_clip(path, frames), SIZE, MEAN, STD).numpy()


def test_decode_and_preprocess_returns_pixels_or_the_failure_as_data(video, tmp_path):
    decoded = decode_and_preprocess(str(video), 3, None, None, "pyav", SIZE, MEAN, STD)
    assert decoded.ok and decoded.failure is None
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.shape[1:] == (3, SIZE, SIZE)
    assert np.array_equal(decoded.pixels, _expected_pixels(video, 3))

    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video\n" * 20)
    failed = decode_and_preprocess(str(not_a_video), 3, None, None, "pyav", SIZE, MEAN, STD)
    assert not failed.ok and failed.pixels is None and failed.failure
    assert pickle.loads(pickle.dumps(failed)) == failed  # results cross process boundaries


def test_a_decode_process_gives_the_same_pixels_as_a_thread(video):
    args = (str(video), 3, None, None, "pyav", SIZE, MEAN, STD)
    try:
        future = decode_pool(1).submit(decode_and_preprocess, *args)
        decoded = decode_retrying(future, 1, args)
    finally:
        shutdown_decode_pools()
    assert decoded.ok
    assert np.array_equal(decoded.pixels, _expected_pixels(video, 3))


def _kill_decoder(*args):
    os._exit(1)  # what a decoder that segfaults on a file does to its decode process


def test_a_decode_process_that_dies_twice_gives_the_callers_failure_and_a_fresh_pool(video):
    args = (str(video), 3, None, None, "pyav", SIZE, MEAN, STD)
    try:
        future = decode_pool(1).submit(_kill_decoder, *args)
        result = decode_retrying(future, 1, args, _kill_decoder, lambda reason: ("failed", reason))
        assert result == ("failed", "the decoder process died on this video")
        decoded = decode_retrying(decode_pool(1).submit(decode_and_preprocess, *args), 1, args)
    finally:
        shutdown_decode_pools()
    assert decoded.ok and np.array_equal(decoded.pixels, _expected_pixels(video, 3))


class _DeadPool:
    """An executor whose decode processes always die (what a file that crashes the decoder does)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        future = Future()
        future.set_exception(BrokenProcessPool("a decode process died"))
        return future


def test_a_long_files_rows_fail_when_its_decode_process_dies_and_the_shard_goes_on(monkeypatch):
    import muse_pipeline.extract.decode_pool as decode_pool_module
    import muse_pipeline.extract.grid as grid_module
    from muse_pipeline.extract.grid import GridUnit, process_unit

    monkeypatch.setattr(decode_pool_module, "decode_pool", lambda n: _DeadPool())
    monkeypatch.setattr(grid_module, "decode_pool", lambda n: _DeadPool())
    unit = GridUnit("long.mp4", 2, (3, 4), (np.arange(0, 4), np.arange(2, 6)))
    failed = []
    result = process_unit(unit, {3, 4}, None, ("pyav", SIZE, MEAN, STD), 8, 1,
                          lambda *a: pytest.fail("nothing was decoded"), lambda o, r: failed.append((o, r)))
    assert result == (0, [])
    assert failed == [(3, "the decoder process died on this video"), (4, "the decoder process died on this video")]


def _job(staging: Path, run: str) -> ShardJob:
    return ShardJob(store="unused.zarr", staging=str(staging), shard=4, lo=12, hi=15,
                    paths=("a.mp4", "b.mp4", "c.mp4"), windows=((None, None),) * 3, ids=("a", "b", "c"),
                    model="muse-tiny", pretrained=None, device="cpu", decoder="pyav", frames=2, run=run)


@pytest.mark.parametrize(("recorded_run", "recorded_pid", "crashes"), [
    ("run-1", -1, {"0": 1, "2": 2}),  # a dead worker of this run: a crash for each video in flight
    ("run-0", -1, {"2": 1}),  # an earlier, interrupted run: never a crash
    ("run-1", "self", {"2": 1}),  # this very process (a record it left itself): no crash
])
def test_shard_staging_counts_crashes_only_of_its_own_run(tmp_path, recorded_run, recorded_pid, crashes):
    folder = tmp_path / "shard-000004"
    folder.mkdir()
    (folder / "crashes.json").write_text(json.dumps({"2": 1}))
    pid = os.getpid() if recorded_pid == "self" else recorded_pid
    (folder / "inflight.json").write_text(json.dumps({"run": recorded_run, "pid": pid, "offsets": [0, 2]}))
    staging = ShardStaging(_job(tmp_path, "run-1"))
    assert staging.crashes == crashes
    assert json.loads((folder / "crashes.json").read_text()) == crashes
    assert not (folder / "inflight.json").exists()


def test_a_video_at_the_crash_limit_is_staged_as_failed(tmp_path):
    folder = tmp_path / "shard-000004"
    folder.mkdir()
    (folder / "crashes.json").write_text(json.dumps({"1": 2, "2": 1}))
    staging = ShardStaging(_job(tmp_path, "run-1"))
    staging.fail_repeat_crashers(np.zeros(3, np.uint8))
    assert sorted(p.name for p in folder.glob("*.fail")) == ["000001.fail"]
    record = json.loads((folder / "000001.fail").read_text())
    assert record["reason"] == "worker process died 2 times while processing this video"
    assert staging.crashes == {"2": 1}


def test_encoder_cache_keeps_what_was_put_until_cleared():
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.extract.encoders import EncoderCache

    cache = EncoderCache()
    stand_in = object()
    cache.put(stand_in, "muse-tiny", None, "cpu")
    assert cache.get("muse-tiny", None, "cpu") is stand_in
    assert cache.get("muse-tiny", None, "cpu", "fp32") is stand_in  # fp32 is the default
    cache.clear()
    built = cache.get("muse-tiny", None, "cpu")
    assert isinstance(built, ClipEncoder) and cache.get("muse-tiny", None, "cpu") is built


def test_choice_lists_are_the_decoders_and_precisions_that_exist():
    from muse_pipeline.cli.extract import Decoder, Precision
    from muse_pipeline.encoders.clip import PRECISIONS
    from muse_pipeline.extract.config import DECODERS, PRECISION_CHOICES
    from muse_pipeline.video.decode import BACKENDS

    assert set(DECODERS) == set(BACKENDS)
    assert set(PRECISION_CHOICES) == {"auto", *PRECISIONS}
    assert [d.value for d in Decoder] == list(DECODERS)
    assert [p.value for p in Precision] == list(PRECISION_CHOICES)


@pytest.mark.parametrize("cores, workers, scheduler, in_process, local", [
    (2, None, None, True, None),   # a LocalCluster would get one worker: this process instead
    (3, None, None, True, None),
    (16, None, None, False, 8),    # enough cores: dask, sized to the machine
    (2, 1, None, False, 1),        # --workers 1 asks for dask
    (16, 0, None, True, None),     # --workers 0
    (2, None, "tcp://h:8786", False, None),
])
def test_the_default_runs_in_process_where_dask_would_get_one_cpu_worker(monkeypatch, tmp_path, cores, workers,
                                                                          scheduler, in_process, local):
    from muse_pipeline.extract.config import ExtractConfig, choose_work_plan

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    cfg = ExtractConfig(dataset="synthetic", data_root=tmp_path, workers=workers, scheduler=scheduler)
    plan = choose_work_plan(cfg)
    assert (plan.in_process, plan.local_workers) == (in_process, local)
    assert "\n" not in plan.reason and ("this process" in plan.reason) == in_process
