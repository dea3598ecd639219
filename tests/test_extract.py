"""The extract stage end to end: resume, failure ledger, dask parity, fingerprint refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from muse_pipeline.data.synthetic import generate_synthetic
from muse_pipeline.extract.config import ExtractConfig
from muse_pipeline.extract.worker import CRASH_ENV, PAUSE_ENV, PAUSED_MARKER
from muse_pipeline.stages.extract import run_extract

MODEL = "muse-tiny"
ARRAYS = ("videos/tokens", "videos/mask", "videos/done", "texts/tokens", "texts/embeddings",
          "texts/video_index")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, n_videos=8, seed=3)
    return root


def _cfg(root: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(dataset="synthetic", data_root=root, model=MODEL, frames=4, out=out, workers=0,
                videos_per_shard=3, quiet=True)
    base.update(kw)
    return ExtractConfig(**base)


def _arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][...]) for name in ARRAYS}


def _assert_identical(a: Path, b: Path) -> None:
    left, right = _arrays(a), _arrays(b)
    for name in ARRAYS:
        assert left[name].dtype == right[name].dtype, name
        assert np.array_equal(left[name], right[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference_store(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    summary = run_extract(_cfg(synth, out))
    assert summary.n_cached == summary.n_videos == 8
    assert summary.ok
    return out


def test_cache_contents(reference_store):
    group = zarr.open_group(str(reference_store), mode="r")
    tokens = group["videos/tokens"]
    assert tokens.dtype == np.float16 and tokens.shape[1:] == (4, 50, 64)
    mask = np.asarray(group["videos/mask"][...])
    assert (mask.sum(1) >= 1).all()
    # real frames hold tokens, padded frames are exact zeros
    data = np.asarray(tokens[...])
    assert np.all(np.abs(data[mask == 1]).sum(axis=(-1, -2)) > 0)
    assert np.all(data[mask == 0] == 0)
    assert np.asarray(group["texts/embeddings"][...]).any(axis=1).all()
    assert not Path(str(reference_store) + ".staging").exists(), "staging must be cleaned up"


def _cli(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muse_pipeline.cli.main", "extract", "--dataset", "synthetic",
            "--data-root", str(root), "--model", MODEL, "--frames", "4", "--out", str(out),
            "--videos-per-shard", "3", "--quiet", *extra]


def _start_paused(cmd: list[str], out: Path, after: int) -> subprocess.Popen:
    """Start an extraction that stops for good once `after` videos are staged by its worker process,
    with the next group marked in flight (the test-only PAUSE_ENV hook): the test, not the machine's
    speed, decides when it is interrupted."""
    marker = Path(str(out) + ".staging") / PAUSED_MARKER
    marker.unlink(missing_ok=True)
    # A shell that starts a job in the background (CI runners may) leaves SIGINT ignored, and Python
    # then never installs its Ctrl-C handler: the child gets SIGINT's default back, as in a terminal.
    proc = subprocess.Popen(cmd, env={**os.environ, PAUSE_ENV: str(after)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600  # a safety net for a broken hook, not a timing assumption
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it paused: {proc.stderr.read()!r}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run never paused")
        time.sleep(0.05)
    return proc


def test_resume_after_sigkill_is_bit_identical(synth, reference_store, tmp_path):
    out = tmp_path / "killed.zarr"
    staging = Path(str(out) + ".staging")
    proc = _start_paused(_cli(synth, out, "--workers", "0"), out, after=2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    staged_before = {p.name for p in staging.glob("shard-*/*.npy")}
    assert len(staged_before) == 2

    summary = run_extract(_cfg(synth, out))
    assert summary.n_cached == 8 and not summary.failures
    # finished work was not redone: fewer frames encoded than a full run
    assert summary.frames_encoded < _arrays(reference_store)["videos/mask"].sum()
    _assert_identical(out, reference_store)
    assert not staging.exists() and not Path(str(out) + ".lock").exists()


@pytest.mark.slow
def test_interrupts_never_count_as_crashes(synth, reference_store, tmp_path):
    """Ctrl-C (on dask workers) and then SIGTERM (in process), both while the same video is in
    flight: the third run finishes with no failure and the store equals an uninterrupted run."""
    out = tmp_path / "interrupted.zarr"
    one_shard = ("--videos-per-shard", "8")  # one shard task: the same video is next in both runs
    first = _start_paused(_cli(synth, out, "--workers", "1", *one_shard), out, after=2)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 130
    assert err.strip().splitlines() == [
        "error: interrupted: finished videos are kept; run the same command again to resume."
    ], "--quiet: only the one error line, no dask chatter"
    inflight = json.loads((Path(str(out) + ".staging") / "shard-000000" / "inflight.json").read_text())
    assert 2 in inflight["offsets"]

    second = _start_paused(_cli(synth, out, "--workers", "0", *one_shard), out, after=0)
    inflight_again = json.loads((Path(str(out) + ".staging") / "shard-000000" / "inflight.json").read_text())
    assert inflight_again["offsets"] == inflight["offsets"] and inflight_again["run"] != inflight["run"]
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=600)
    assert second.returncode == 130

    summary = run_extract(_cfg(synth, out, videos_per_shard=8))
    assert summary.failures == [] and summary.n_cached == 8
    _assert_identical(out, reference_store)


@pytest.mark.slow
def test_a_worker_that_dies_is_a_crash_and_only_its_video_fails(synth, reference_store, tmp_path):
    """A video that kills its worker process (the test-only CRASH_ENV hook: SIGKILL) is ledgered after
    two crashes; its neighbours, in flight with it the first time, are cached. --retry-failed later
    redoes it (here without the hook) and the ledger keeps the old record as history."""
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data import load_dataset

    victim = load_dataset("synthetic", synth).videos[1].id
    out = tmp_path / "crash.zarr"
    run = subprocess.run(_cli(synth, out, "--workers", "1", "--max-failures", "0.5"),
                         env={**os.environ, CRASH_ENV: victim}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    cache = FeatureCache.open(out)
    assert [(f["id"], f["reason"]) for f in cache.failures] == [
        (victim, "worker process died 2 times while processing this video")
    ]
    done = cache.read_done()
    assert done[1] == 2 and (np.delete(done, 1) == 1).all()
    ref = _arrays(reference_store)["videos/tokens"]
    assert np.array_equal(np.delete(_arrays(out)["videos/tokens"], 1, axis=0), np.delete(ref, 1, axis=0))

    again = run_extract(_cfg(synth, out))
    assert again.frames_encoded == 0 and again.n_failed == 1, "an unchanged failed file is not retried"
    retried = run_extract(_cfg(synth, out, retry_failed=True))
    assert retried.retried == 1 and retried.failures == [] and retried.n_cached == 8
    assert [f["id"] for f in FeatureCache.open(out).failure_history] == [victim]
    _assert_identical(out, reference_store)


def test_failed_video_is_retried_when_its_file_changes(synth, reference_store, tmp_path):
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data import load_dataset

    root = tmp_path / "data"
    shutil.copytree(synth, root)
    video = Path(load_dataset("synthetic", root).videos[4].path)
    good = video.read_bytes()
    video.write_bytes(b"")
    out = tmp_path / "retry.zarr"
    first = run_extract(_cfg(root, out, max_failures=1.0))
    assert first.n_failed == 1
    assert {"size", "mtime_ns", "reason"} <= set(first.failures[0])
    unchanged = run_extract(_cfg(root, out, max_failures=1.0))
    assert unchanged.frames_encoded == 0 and unchanged.n_failed == 1 and unchanged.retried == 0
    video.write_bytes(good)  # the user fixed the file
    fixed = run_extract(_cfg(root, out))
    assert fixed.retried == 1 and fixed.n_failed == 0 and fixed.failures == []
    history = FeatureCache.open(out).failure_history
    assert [h["reason"] for h in history] == [first.failures[0]["reason"]]
    # paths differ (another data root); every array the encoder wrote is the same
    _assert_identical(out, reference_store)


@pytest.mark.slow
def test_second_extract_on_a_store_is_refused_and_a_dead_holder_is_taken_over(
        synth, reference_store, tmp_path):
    import socket

    out = tmp_path / "locked.zarr"
    first = _start_paused(_cli(synth, out, "--workers", "0"), out, after=1)
    second = subprocess.run(_cli(synth, out, "--workers", "0"), capture_output=True, text=True)
    assert second.returncode == 3
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked.zarr", "locked.zarr.lock",
                                                          "locked.zarr.staging"], "no temp folder"
    first.kill()  # the holder dies: its lock file stays, its flock goes
    first.wait()
    assert Path(str(out) + ".lock").exists()
    summary = run_extract(_cfg(synth, out))
    assert summary.n_cached == 8
    _assert_identical(out, reference_store)


def test_the_lock_itself_refuses_a_run_that_passed_the_early_check(synth, tmp_path, monkeypatch):
    """Two runs start together: both pass the quick `ensure_unlocked` check, one takes the lock. The
    other must be refused by `StoreLock.acquire` itself, before it creates or writes anything."""
    import os

    import muse_pipeline.cache.lock as lock
    from muse_pipeline.cache.lock import StoreLock, StoreLocked

    out = tmp_path / "raced.zarr"
    monkeypatch.setattr(lock, "ensure_unlocked", lambda store: None)  # the race: the early check passed
    with StoreLock(out):  # the other run (flock conflicts between open files, also in one process)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            run_extract(_cfg(synth, out))
        assert sorted(p.name for p in tmp_path.iterdir()) == before == ["raced.zarr.lock"]
    summary = run_extract(_cfg(synth, out))  # once the holder is gone, the same run goes through
    assert summary.n_cached == 8


def test_decoder_warnings_reach_the_ledger(synth, tmp_path, monkeypatch):
    """The extractor records what decode_clip_report says it had to patch (stand-in decoder here:
    the decoder's own tests cover when it warns); the video stays cached and `cache info` shows it."""
    from typer.testing import CliRunner

    import muse_pipeline.video.decode as decode
    from muse_pipeline.cli.main import app
    from muse_pipeline.data import load_dataset

    patched = load_dataset("synthetic", synth).videos[3]
    real = decode.decode_clip_report

    def with_warning(path, *args, **kwargs):
        clip = real(path, *args, **kwargs)
        if Path(path) == Path(patched.path):
            clip.warnings.append("sample at 2.0 s: frame did not decode, used the frame of 1.9 s")
        return clip

    monkeypatch.setattr(decode, "decode_clip_report", with_warning)
    out = tmp_path / "warn.zarr"
    summary = run_extract(_cfg(synth, out))
    assert summary.n_cached == 8 and summary.failures == []
    assert summary.warnings == [
        {"id": patched.id, "warning": "sample at 2.0 s: frame did not decode, used the frame of 1.9 s"}
    ]
    info = CliRunner().invoke(app, ["cache", "info", str(out)])
    assert info.exit_code == 0 and "used the frame of 1.9 s" in info.stderr


def test_batched_groups_are_bit_identical_across_interruptions(synth, reference_store, tmp_path):
    """Two videos per encoder forward (the CUDA path's batching, run on the CPU): a run killed after
    one group, with one video of the next group staged by hand as if killed mid-group, resumes to the
    same bits as an uninterrupted batched run; batched tokens match one-video batches closely."""
    batched_ref = tmp_path / "batched-ref.zarr"
    ref_summary = run_extract(_cfg(synth, batched_ref, batch_frames=8))
    assert ref_summary.n_cached == 8
    # shards [0, 1, 2] [3, 4, 5] [6, 7] -> groups [0, 1] [2] [3, 4] [5] [6, 7]: five forwards
    assert len(ref_summary.batch_sizes) == 5 and max(ref_summary.batch_sizes) <= 8
    assert max(ref_summary.batch_sizes) > 4, "frames of two videos share a forward"
    single = _arrays(reference_store)["videos/tokens"].astype(np.float32)
    batched = _arrays(batched_ref)["videos/tokens"].astype(np.float32)
    assert np.allclose(batched, single, atol=2e-2, rtol=2e-2)

    out = tmp_path / "batched.zarr"
    proc = _start_paused(_cli(synth, out, "--workers", "0", "--batch-frames", "8"), out, after=2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    shard0 = Path(str(out) + ".staging") / "shard-000000"
    assert sorted(p.name for p in shard0.glob("*.npy")) == ["000000.npy", "000001.npy"]
    # a group half staged: video 3 (group [3, 4] of shard 1) staged with made-up tokens
    shard1 = Path(str(out) + ".staging") / "shard-000001"
    shard1.mkdir(parents=True, exist_ok=True)
    np.save(shard1 / "000000.npy", np.ones((4, 50, 64), np.float16))
    summary = run_extract(_cfg(synth, out))  # no --batch-frames: the store's grouping is kept
    assert summary.n_cached == 8
    _assert_identical(out, batched_ref)


def test_rerun_of_finished_store_does_nothing(synth, reference_store, tmp_path):
    out = tmp_path / "again.zarr"
    shutil.copytree(reference_store, out)
    summary = run_extract(_cfg(synth, out))
    assert summary.frames_encoded == 0
    _assert_identical(out, reference_store)


@pytest.mark.slow
def test_two_dask_workers_equal_single_process_and_quiet_is_quiet(synth, reference_store, tmp_path):
    import socket

    out = tmp_path / "dask.zarr"
    # dask's default HTTP port taken (as by another cluster): still not a word
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen(1)
        except OSError:
            pass  # somebody else holds it: the same situation
        run = subprocess.run(_cli(synth, out, "--workers", "2"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", "--quiet prints nothing (no dask INFO lines)"
    _assert_identical(out, reference_store)


def test_fingerprint_mismatch_is_refused(synth, reference_store, tmp_path):
    from muse_pipeline.cache.store import FingerprintMismatch

    out = tmp_path / "fp.zarr"
    shutil.copytree(reference_store, out)
    with pytest.raises(FingerprintMismatch, match="frames"):
        run_extract(_cfg(synth, out, frames=3))
    summary = run_extract(_cfg(synth, out, frames=3, overwrite=True))
    assert summary.n_cached == 8
    assert zarr.open_group(str(out), mode="r")["videos/tokens"].shape[1] == 3


def test_bad_videos_land_in_the_ledger(synth, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synth, root)
    from muse_pipeline.data import load_dataset

    videos = load_dataset("synthetic", root).videos
    broken = {
        videos[0].id: lambda p: p.unlink(),  # missing
        videos[1].id: lambda p: p.write_bytes(b""),  # empty
        videos[2].id: lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 5]),  # truncated
        videos[3].id: lambda p: p.write_text("this is not a video\n" * 50),  # not a video
    }
    for v in videos:
        if v.id in broken:
            broken[v.id](Path(v.path))
    out = tmp_path / "broken.zarr"
    summary = run_extract(_cfg(root, out, max_failures=0.01))
    failed = {f["id"] for f in summary.failures}
    # a truncated file may still yield the sampled frames; every other broken file must fail
    assert {videos[0].id, videos[1].id, videos[3].id} <= failed
    assert failed <= set(broken)
    assert all(f["reason"] for f in summary.failures)
    assert not summary.ok  # more than 1% failed
    group = zarr.open_group(str(out), mode="r")
    done = np.asarray(group["videos/done"][...])
    mask = np.asarray(group["videos/mask"][...])
    ids = list(np.asarray(group["videos/ids"][...]))
    for i, vid in enumerate(ids):
        if vid in failed:
            assert done[i] == 2 and mask[i].sum() == 0
        else:
            assert done[i] == 1 and mask[i].sum() >= 1
    assert {f["id"] for f in group.attrs["failures"]} == failed


def test_cli_exit_status_reflects_max_failures(synth, tmp_path):
    root = tmp_path / "one-bad"
    shutil.copytree(synth, root)
    from muse_pipeline.data import load_dataset

    Path(load_dataset("synthetic", root).videos[0].path).write_bytes(b"")
    base = [sys.executable, "-m", "muse_pipeline.cli.main", "extract", "--dataset", "synthetic",
            "--data-root", str(root), "--model", MODEL, "--frames", "2", "--workers", "0", "--quiet"]
    strict = subprocess.run(base + ["--out", str(tmp_path / "a.zarr")], capture_output=True, text=True)
    assert strict.returncode != 0 and "max-failures" in strict.stderr
    lenient = subprocess.run(base + ["--out", str(tmp_path / "b.zarr"), "--max-failures", "0.5"],
                             capture_output=True, text=True)
    assert lenient.returncode == 0, lenient.stderr


def test_cache_info_and_export_commands(reference_store, tmp_path):
    import h5py
    from typer.testing import CliRunner

    from muse_pipeline.cli.main import app

    runner = CliRunner()
    info = runner.invoke(app, ["cache", "info", str(reference_store), "--json"])
    assert info.exit_code == 0, info.output
    assert '"muse-tiny"' in info.output and '"frames": 4' in info.output
    out = tmp_path / "ref.h5"
    export = runner.invoke(app, ["cache", "export", str(reference_store), "--format", "hdf5", "--out", str(out)])
    assert export.exit_code == 0, export.output
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["videos/tokens"][...], _arrays(reference_store)["videos/tokens"])
    bad = runner.invoke(app, ["cache", "export", str(reference_store), "--format", "parquet"])
    assert bad.exit_code != 0 and "unknown export format" in bad.output
    missing = runner.invoke(app, ["cache", "info", str(tmp_path / "nope.zarr")])
    assert missing.exit_code != 0 and "no cache" in missing.output


def _cls_cosine(encoder_a, encoder_b, pixels) -> float:
    import torch

    a = encoder_a.encode_frames(pixels)[:, 0]
    b = encoder_b.encode_frames(pixels)[:, 0]
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def _real_pixels(synth: Path, image_size: int):
    import torch

    from muse_pipeline.data import load_dataset
    from muse_pipeline.video.decode import decode_clip
    from muse_pipeline.video.transforms import preprocess_frames

    videos = load_dataset("synthetic", synth).videos[:4]
    return torch.cat([preprocess_frames(decode_clip(v.path, 4), image_size) for v in videos])


def test_reduced_precision_on_cpu_keeps_the_cls_direction(synth):
    """The precision switch of the encoder (bf16 is what CPUs run; the CUDA test below checks fp16),
    against float32 on the same real frames."""
    import torch

    from muse_pipeline.encoders.clip import ClipEncoder

    fp32 = ClipEncoder(MODEL, device="cpu", precision="fp32")
    bf16 = ClipEncoder(MODEL, device="cpu", precision="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert _cls_cosine(fp32, bf16, _real_pixels(synth, fp32.image_size)) >= 0.99


def test_fp16_on_cuda_matches_float32(synth):
    import torch

    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA GPU (fp16 inference and pinned uploads run only there)")
    from muse_pipeline.encoders.clip import ClipEncoder

    fp32 = ClipEncoder(MODEL, device="cuda", precision="fp32")
    fp16 = ClipEncoder(MODEL, device="cuda", precision="fp16")
    pixels = _real_pixels(synth, fp32.image_size)
    assert _cls_cosine(fp32, fp16, pixels) >= 0.999
    assert fp16._pinned is not None and fp16._pinned.is_pinned()
