"""A folder library that grows: re-running `muse extract` adds the new, redoes the changed, retires
the removed, leaves the unchanged bit-identical and never decodes them again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import muse_pipeline.video.decode as decode_module
import muse_pipeline.video.grid as grid_module
from muse_pipeline.cache.store import RETIRED, FeatureCache
from muse_pipeline.errors import InputError
from muse_pipeline.evaluation.embed import split_members
from muse_pipeline.extract.config import ExtractConfig
from muse_pipeline.stages.extract import run_extract

MODEL = "muse-tiny"


def _clip(timed_video, path: Path, seconds: float, shade: int) -> None:
    """A clip of `seconds` at 2 fps whose frames start at index `shade` (distinct content per file)."""
    n = int(seconds * 2)
    timed_video(path, [k * 0.5 for k in range(n)], indices=[shade + k for k in range(n)], size=(48, 32))


@pytest.fixture()
def folder(tmp_path, timed_video) -> Path:
    root = tmp_path / "library"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a", "b", "c", "d", "sub/e"]):
        _clip(timed_video, root / f"{name}.mp4", 2.5, 40 * i)
    _clip(timed_video, root / "long.mp4", 14.0, 300)  # 14 s > one 8 s window: 3 window rows
    (root / "captions.csv").write_text("video,caption\na,the first clip\nc,the third clip\n")
    return root


def _cfg(root: Path, out: Path) -> ExtractConfig:
    return ExtractConfig(dataset="folder", data_root=root, model=MODEL, frames=4, out=out, workers=0, quiet=True,
                         videos_per_shard=4)


def _active(cache: FeatureCache) -> dict[str, int]:
    done = cache.read_done()
    ids = cache.video_ids
    rows = [int(r) for r in np.flatnonzero(done != RETIRED)]
    assert len({ids[r] for r in rows}) == len(rows), "an active id appears twice"
    return {ids[r]: r for r in rows}


def _decoded_paths(monkeypatch) -> list[str]:
    seen: list[str] = []
    for module in (decode_module, grid_module):
        real = module.decode_clip_report

        def spy(path, *args, _real=real, **kwargs):
            seen.append(Path(path).name)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, "decode_clip_report", spy)
    return seen


def _change_library(root: Path, timed_video) -> None:
    for i, name in enumerate(["f", "g", "sub/h"]):  # 3 new
        _clip(timed_video, root / f"{name}.mp4", 2.5, 1000 + 40 * i)
    (root / "b.mp4").unlink()  # 1 removed
    before = os.stat(root / "c.mp4")
    _clip(timed_video, root / "c.mp4", 3.5, 2000)  # 1 changed (captioned: its caption follows it)
    os.utime(root / "c.mp4", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_added_removed_and_changed_files(folder, tmp_path, timed_video, monkeypatch):
    out = tmp_path / "lib.zarr"
    first = run_extract(_cfg(folder, out))
    assert first.library == "6 new, 0 changed, 0 removed, 0 unchanged"
    cache = FeatureCache.open(out)
    before = _active(cache)
    last = next(i for i in before if i.startswith("long@8-"))  # ends at the file's probed length
    assert float(last.split("-")[-1]) == pytest.approx(13.5, abs=0.01)
    assert sorted(before) == ["a", "b", "c", "d", "long@0-8", "long@4-12", last, "sub/e"]
    tokens_before, mask_before = cache.read_videos(np.array(sorted(before.values())))
    by_id_before = {i: (tokens_before[k], mask_before[k]) for k, i in enumerate(sorted(before, key=before.get))}
    shard_files = {p: p.read_bytes() for p in (out / "videos" / "tokens" / "c").rglob("*") if p.is_file()}
    n_before = cache.n_videos

    _change_library(folder, timed_video)
    decoded = _decoded_paths(monkeypatch)
    summary = run_extract(_cfg(folder, out))
    assert summary.library == "3 new, 1 changed, 1 removed, 4 unchanged"
    assert sorted(decoded) == ["c.mp4", "f.mp4", "g.mp4", "h.mp4"]  # nothing unchanged decoded again
    assert summary.ok and summary.n_videos == summary.n_cached == 10

    cache = FeatureCache.open(out)
    after = _active(cache)
    assert sorted(after) == ["a", "c", "d", "f", "g", "long@0-8", "long@4-12", last, "sub/e", "sub/h"]
    done = cache.read_done()
    assert done[before["b"]] == RETIRED and done[before["c"]] == RETIRED
    # the new generation starts at a shard boundary; the slots before it are retired padding
    lo = cache.generations[-1]["rows"][0]
    assert lo % cache.videos_per_shard == 0 and lo >= n_before
    assert (done[n_before:lo] == RETIRED).all() and min(after[i] for i in ("c", "f", "g", "sub/h")) == lo
    assert cache.generations[-1] == {"generation": 2, "rows": [lo, cache.n_videos], "new": 3, "changed": 1,
                                     "removed": 1, "unchanged": 4}
    # unchanged rows: same rows, same bits; no existing shard file rewritten
    for vid in ["a", "d", "long@0-8", "long@4-12", last, "sub/e"]:
        assert after[vid] == before[vid]
        tokens, mask = cache.read_videos([after[vid]])
        assert np.array_equal(tokens[0], by_id_before[vid][0]) and np.array_equal(mask[0], by_id_before[vid][1])
    for path, data in shard_files.items():
        assert path.read_bytes() == data, f"{path} was rewritten"
    # readers: the changed file's caption follows its new row; retired rows are in no split
    members = split_members(cache, "test")
    assert before["b"] not in members.video_idx and before["c"] not in members.video_idx
    text_rows = cache.text_video_index.tolist()
    assert text_rows == [after["a"], after["c"]]

    from muse_pipeline.cache.export import cache_info

    info = cache_info(out)  # `muse cache info`: retired rows are no videos; the updates are listed
    assert info["splits"]["test"]["videos"] == 10 and info["retired"] == int((done == RETIRED).sum())
    assert [g["new"] for g in info["generations"]] == [6, 3]

    again = run_extract(_cfg(folder, out))  # nothing changed: nothing decoded, nothing appended
    assert again.library == "0 new, 0 changed, 0 removed, 8 unchanged" and again.frames_encoded == 0
    assert FeatureCache.open(out).n_videos == cache.n_videos


def test_an_update_interrupted_before_retiring_is_finished_by_the_same_command(folder, tmp_path, timed_video,
                                                                                monkeypatch):
    out = tmp_path / "lib.zarr"
    run_extract(_cfg(folder, out))
    _change_library(folder, timed_video)

    def interrupted(self, rows):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(FeatureCache, "retire", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_extract(_cfg(folder, out))
    n_rows = FeatureCache.open(out).n_videos
    summary = run_extract(_cfg(folder, out))
    assert summary.library == "0 new, 1 changed, 1 removed, 7 unchanged"  # the appended rows are there
    cache = FeatureCache.open(out)
    assert cache.n_videos == n_rows  # nothing appended twice
    after = _active(cache)
    assert len(after) == 10 and {"c", "f", "g", "sub/h"} <= set(after) and "b" not in after
    assert (cache.read_done()[list(after.values())] == 1).all()
    assert [g["new"] for g in cache.generations] == [6, 3, 0]  # the interrupted run's rows are on record


def test_two_libraries_get_two_default_stores_and_a_foreign_store_is_refused(tmp_path, timed_video):
    roots = []
    for name in ("holiday", "work"):
        root = tmp_path / name
        root.mkdir()
        _clip(timed_video, root / "x.mp4", 2.0, 7)
        roots.append(root)
    cache_dir = tmp_path / "cache"
    stores = []
    for root in roots:
        cfg = ExtractConfig(dataset="folder", data_root=root, model=MODEL, frames=4, cache_dir=cache_dir,
                            workers=0, quiet=True)
        stores.append(run_extract(cfg).store)
    assert stores[0] != stores[1]
    assert stores[0].parent.parent == stores[1].parent.parent == cache_dir / "folder"
    assert stores[0].parent.name.startswith("holiday-") and stores[1].parent.name.startswith("work-")
    # --out at the other library's store: refused, pointing to --out and never to --overwrite
    with pytest.raises(InputError) as refused:
        run_extract(ExtractConfig(dataset="folder", data_root=roots[1], model=MODEL, frames=4, out=stores[0],
                                  workers=0, quiet=True))
    message = str(refused.value)
    assert "--out" in message and "--overwrite" not in message and str(roots[0]) in message
    assert FeatureCache.open(stores[0]).fingerprint["data_root"] == str(roots[0].resolve())


def test_the_cli_refusal_is_one_line(tmp_path, timed_video):
    import subprocess
    import sys

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        _clip(timed_video, tmp_path / name / "x.mp4", 2.0, 3)
    base = [sys.executable, "-m", "muse_pipeline.cli.main", "extract", "--dataset", "folder", "--model", MODEL,
            "--frames", "4", "--workers", "0", "--quiet", "--out", str(tmp_path / "s.zarr")]
    first = subprocess.run([*base, "--data-root", str(tmp_path / "one")], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([*base, "--data-root", str(tmp_path / "two")], capture_output=True, text=True)
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--out" in lines[0]
    assert "--overwrite" not in lines[0]


def test_an_update_killed_while_extracting_is_finished_bit_identically(folder, tmp_path, timed_video):
    import signal
    import subprocess
    import sys
    import time

    from muse_pipeline.extract.worker import PAUSE_ENV, PAUSED_MARKER

    out = tmp_path / "lib.zarr"
    run_extract(_cfg(folder, out))
    _change_library(folder, timed_video)
    marker = Path(str(out) + ".staging") / PAUSED_MARKER
    cmd = [sys.executable, "-m", "muse_pipeline.cli.main", "extract", "--dataset", "folder", "--data-root",
           str(folder), "--model", MODEL, "--frames", "4", "--out", str(out), "--videos-per-shard", "4",
           "--workers", "0", "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, PAUSE_ENV: "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a safety net for a broken hook, not a timing assumption
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never paused"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # one new row staged, the rest pending
    proc.wait()

    summary = run_extract(_cfg(folder, out))
    assert summary.library == "0 new, 0 changed, 0 removed, 8 unchanged" and summary.ok
    cache = FeatureCache.open(out)
    after = _active(cache)
    assert len(after) == 10 and (cache.read_done()[list(after.values())] == 1).all()
    assert [g["new"] for g in cache.generations] == [6, 3]  # one update, nothing appended twice
    # the same bits as a library extracted from scratch as it is now
    fresh = tmp_path / "fresh.zarr"
    run_extract(_cfg(folder, fresh))
    reference = FeatureCache.open(fresh)
    ref_rows = _active(reference)
    assert sorted(ref_rows) == sorted(after)
    for vid, row in after.items():
        a, b = cache.read_videos([row]), reference.read_videos([ref_rows[vid]])
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), vid
