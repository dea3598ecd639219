"""Every mistake a user can make on the command line: one `error:` line, non-zero exit, no
traceback, and nothing created (table-driven, through MuseGroup.main as the `muse` script runs it)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from muse_pipeline.cli.main import app
from muse_pipeline.data.synthetic import generate_synthetic

MODEL = "muse-tiny"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("cli-errors-data"), n_videos=4, seed=5)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory (relative defaults like cache/, runs/ land here)."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notastore").mkdir()
    (folder / "afile").write_text("not a folder\n")
    (folder / "garbage.pt").write_text("these are not weights\n" * 10)
    monkeypatch.chdir(folder)
    return folder


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _extract(data_root: Path, *extra: str) -> list[str]:
    return ["extract", "--data-root", str(data_root), "--model", MODEL, "--frames", "2",
            "--workers", "0", "--quiet", "--out", "out/store.zarr", *extra]


# (row id, arguments given the data root, a fragment the error line must contain)
EXTRACT_ROWS = [
    ("dataset", ["--dataset", "nosuch"], "'--dataset'"),
    ("decoder", ["--decoder", "nosuch"], "'--decoder'"),
    ("precision", ["--precision", "fp8"], "'--precision'"),
    ("frames-0", ["--frames", "0"], "--frames must be >= 1"),
    ("frames-negative", ["--frames", "-3"], "--frames must be >= 1"),
    ("words", ["--words", "2"], "--words must be >= 3"),
    ("words-too-many", ["--words", "500"], "--words must be <= 77"),
    ("workers", ["--workers", "-1"], "--workers must be >= 0"),
    ("decode-workers", ["--decode-workers", "-2"], "--decode-workers must be >= 0"),
    ("batch-frames", ["--batch-frames", "0"], "--batch-frames must be >= 1"),
    ("videos-per-shard", ["--videos-per-shard", "0"], "--videos-per-shard must be >= 1"),
    ("max-failures-high", ["--max-failures", "1.5"], "--max-failures"),
    ("max-failures-negative", ["--max-failures", "-0.1"], "--max-failures"),
    ("device-unknown", ["--device", "tpu"], "unknown device 'tpu'"),
    ("pretrained-missing", ["--pretrained", "missing/weights.pt"], "not found"),
    ("pretrained-not-weights", ["--pretrained", "garbage.pt"], "not a weights file"),
    ("pretrained-folder", ["--pretrained", "notastore"], "is a folder"),
    ("pretrained-unknown-tag", ["--pretrained", "nosuchtag"], "neither a file nor a pretrained tag"),
    ("model", ["--model", "nosuch-model"], "unknown open_clip model"),
    ("data-root", ["--dataset", "msrvtt", "--data-root", "missing-root"], "--data-root missing-root does not exist"),
    ("out-under-a-file", ["--out", "afile/store.zarr"], "is a file, not a folder"),
    ("out-is-a-file", ["--out", "afile"], "exists and is not a folder"),
    ("split", ["--split", "nosuch"], "split"),
]

OTHER_ROWS = [
    ("eval-missing-run", ["eval", "missing-run"], "not a run directory"),
    ("eval-zero-shot-missing-cache", ["eval", "--zero-shot", "--cache", "missing.zarr"], "missing.zarr"),
    ("report-missing-run", ["report", "missing-run"], "missing-run"),
    ("index-missing-run", ["index", "missing-run"], "not a run directory"),
    ("search-missing-index", ["search", "a red circle", "--index", "missing.zarr"], "does not exist"),
    ("train-missing-cache", ["train", "--from-cache", "missing.zarr"], "no cache at missing.zarr"),
    ("train-not-a-cache", ["train", "--from-cache", "notastore"], "not a readable"),
    ("cache-info-missing", ["cache", "info", "missing.zarr"], "no cache at missing.zarr"),
    ("cache-info-not-a-store", ["cache", "info", "notastore"], "not a readable muse cache"),
    ("cache-info-a-file", ["cache", "info", "afile"], "not a readable muse cache"),
    ("cache-export-not-a-store", ["cache", "export", "notastore"], "not a readable muse cache"),
    ("unknown-command", ["nosuch"], "No such command"),
]


def _check_one_error_line(result, fragment: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("row", EXTRACT_ROWS, ids=[r[0] for r in EXTRACT_ROWS])
def test_extract_mistakes(row, data_root, work):
    _, extra, fragment = row
    before = _listing(work)
    result = CliRunner().invoke(app, _extract(data_root, *extra))
    _check_one_error_line(result, fragment)
    assert _listing(work) == before, "a refused command must create nothing"


@pytest.mark.parametrize("row", OTHER_ROWS, ids=[r[0] for r in OTHER_ROWS])
def test_other_command_mistakes(row, work):
    _, args, fragment = row
    before = _listing(work)
    result = CliRunner().invoke(app, args)
    _check_one_error_line(result, fragment)
    assert _listing(work) == before


def test_cuda_without_a_gpu(data_root, work):
    import torch

    if torch.cuda.is_available():
        pytest.skip(reason="a CUDA GPU is visible: --device cuda is valid here")
    before = _listing(work)
    result = CliRunner().invoke(app, _extract(data_root, "--device", "cuda"))
    _check_one_error_line(result, "no CUDA GPU")
    assert _listing(work) == before and not (work / "out").exists()


def test_read_only_output(data_root, work, monkeypatch):
    """A read-only mount: the probe file cannot be created (as root, chmod would not stop writes,
    so the OS's answer is what is simulated here)."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = CliRunner().invoke(app, _extract(data_root))
    _check_one_error_line(result, "Read-only file system")
    assert not (work / "out").exists()


def test_full_output_disk(data_root, work, monkeypatch):
    real = shutil.disk_usage

    def almost_full(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(shutil, "disk_usage", almost_full)
    result = CliRunner().invoke(app, _extract(data_root))
    _check_one_error_line(result, "not enough space")
    assert not (work / "out").exists()


def test_locked_store_names_the_holder(data_root, work):
    from muse_pipeline.cache.lock import StoreLock

    (work / "out").mkdir()
    with StoreLock(work / "out" / "store.zarr"):
        result = CliRunner().invoke(app, _extract(data_root))
        _check_one_error_line(result, f"pid {os.getpid()} on host {socket.gethostname()}")
    assert sorted(p.name for p in (work / "out").iterdir()) == [], "no store, no temp folder, no lock"


def test_the_installed_script_prints_no_traceback(data_root, tmp_path):
    """The same through a real `muse` process (what a user sees), and --debug shows the traceback."""
    muse = [sys.executable, "-m", "muse_pipeline.cli.main"]
    args = _extract(data_root, "--frames", "0")
    plain = subprocess.run(muse + args, capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode != 0
    assert plain.stderr.strip().splitlines() == ["error: --frames must be >= 1, got 0"]
    debug = subprocess.run(muse + ["--debug"] + args, capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr
    assert not (tmp_path / "out").exists()
