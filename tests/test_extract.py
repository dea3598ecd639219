"""The extract stage end to end: resume, failure ledger, dask parity, fingerprint refusal."""

from __future__ import annotations

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
from muse_pipeline.stages.extract import ExtractConfig, run_extract

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


def test_resume_after_sigkill_is_bit_identical(synth, reference_store, tmp_path):
    out = tmp_path / "killed.zarr"
    staging = Path(str(out) + ".staging")
    cmd = [sys.executable, "-m", "muse_pipeline.cli.main", "extract", "--dataset", "synthetic",
           "--data-root", str(synth), "--model", MODEL, "--frames", "4", "--out", str(out),
           "--workers", "0", "--videos-per-shard", "3", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # kill once some, but not all, videos are staged
    while time.time() < deadline and proc.poll() is None:
        if staging.exists() and len(list(staging.glob("shard-*/*.npy"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staging.exists()
    staged_before = {p.name for p in staging.glob("shard-*/*.npy")}
    assert staged_before

    summary = run_extract(_cfg(synth, out))
    assert summary.n_cached == 8
    # finished work was not redone: fewer frames encoded than a full run
    assert summary.frames_encoded < _arrays(reference_store)["videos/mask"].sum()
    _assert_identical(out, reference_store)


def test_rerun_of_finished_store_does_nothing(synth, reference_store, tmp_path):
    out = tmp_path / "again.zarr"
    shutil.copytree(reference_store, out)
    summary = run_extract(_cfg(synth, out))
    assert summary.frames_encoded == 0
    _assert_identical(out, reference_store)


def test_two_dask_workers_equal_single_process(synth, reference_store, tmp_path):
    out = tmp_path / "dask.zarr"
    summary = run_extract(_cfg(synth, out, workers=2))
    assert summary.n_cached == 8
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
