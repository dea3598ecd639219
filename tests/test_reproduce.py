"""`make reproduce-msrvtt` end to end on synthetic videos laid out as the real MSR-VTT release."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from muse_pipeline.data import load_dataset
from muse_pipeline.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]


def _layout_as_msrvtt(synthetic_root: Path, root: Path) -> None:
    """MSRVTT_data.json + MSRVTT_train.9k.csv + MSRVTT_JSFUSION_test.csv + videos/all/videoN.mp4.

    Synthetic train and val videos form the 9k list (all their captions); each test video gives one
    JSFUSION row, as in the 1k-A protocol.
    """
    index = load_dataset("synthetic", synthetic_root)
    (root / "videos" / "all").mkdir(parents=True)
    names = {}
    for n, video in enumerate(index.videos):
        names[video.id] = f"video{n}"
        shutil.copy(video.path, root / "videos" / "all" / f"video{n}.mp4")
    sentences, test_rows, seen_test = [], [], set()
    for k, caption in enumerate(index.captions):
        video = index.videos[caption.video_index]
        sentences.append({"video_id": names[video.id], "caption": caption.text, "sen_id": k})
        if video.split == "test" and video.id not in seen_test:
            seen_test.add(video.id)
            test_rows.append((names[video.id], caption.text))
    data = {"videos": [{"video_id": names[v.id], "category": 0} for v in index.videos], "sentences": sentences}
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    with open(root / "MSRVTT_train.9k.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id"])
        writer.writerows([names[v.id]] for v in index.videos if v.split != "test")
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for i, (vid, sentence) in enumerate(test_rows):
            writer.writerow([f"ret{i}", f"msr{vid[5:]}", vid, sentence])


def _make(target: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # VENV= points make at the environment running the tests (the project's .venv under `make test`)
    venv = Path(sys.executable).parent.parent
    cmd = ["make", "-s", "-C", str(REPO), target, f"VENV={venv}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.slow
def test_reproduce_msrvtt_target_on_a_fake_msrvtt(tmp_path):
    synthetic = generate_synthetic(tmp_path / "synthetic", n_videos=40, seed=5)
    root = tmp_path / "msrvtt"
    _layout_as_msrvtt(synthetic, root)
    out = tmp_path / "out"
    extra = (f"--cache-dir {out / 'cache'} --runs-dir {out / 'runs'} --results-dir {out / 'results'} "
             "--batch-size 8 --workers 0 --device cpu --quiet")
    proc = _make("reproduce-msrvtt", f"MSRVTT_ROOT={root}", "MODEL=muse-tiny", "PRETRAINED=", "EPOCHS=1",
                 "FRAMES=2", f"EXTRA={extra}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (out / "results" / "msrvtt.md").read_text()
    # published numbers beside ours, and the settings that make this a smoke run, not a reproduction
    assert "published: CLIP4Clip meanP | best epoch chosen on the test split (upstream code) | 43.1 | 70.4 | 80.8" in page
    assert "ours: muse head" in page and "ours: zero-shot meanP (muse-tiny)" in page
    assert "random init (NOT a reproduction)" in page and "frames: 2" in page
    results = json.loads((out / "results" / "msrvtt.json").read_text())
    n_test = sum(1 for v in load_dataset("synthetic", synthetic).videos if v.split == "test")
    assert results["trained"]["counts"] == {"videos": n_test, "texts": n_test, "failed_videos": 0,
                                            "dropped_texts": 0}
    assert results["trained"]["split"] == "test"
    assert (out / "cache" / "msrvtt" / "muse-tiny-2f.zarr").exists()
    # protocol: selection on a held-out slice of the 9k list, then the refit on ALL of it is reported
    n_train = sum(1 for v in load_dataset("synthetic", synthetic).videos if v.split != "test")
    runs = {r["kind"]: r for r in results["runs"]}
    assert list(runs) == ["selection", "refit"]
    refit = json.loads((Path(runs["refit"]["run_dir"]) / "config.json").read_text())
    selection = json.loads((Path(runs["selection"]["run_dir"]) / "config.json").read_text())
    assert refit["n_train_videos"] == n_train and refit["protocol"]["kind"] == "refit"
    assert selection["n_train_videos"] + selection["n_val_videos"] == n_train and selection["n_val_videos"] >= 1
    assert results["settings"]["run_dir"] == runs["refit"]["run_dir"]
    assert "ours: muse head (selection) | selection:" in page and "ours: muse head (refit) | refit: all" in page
    assert f"all {n_train} training videos" in page and "Reported model: the muse head's **refit** run" in page
    # differences to the published numbers, and the recipe
    assert "| zero-shot meanP - CLIP zero-shot |" in page and "| muse head (refit) - MUSE released log" in page
    assert "DSL off" in page and '"clip_lr": 1e-07' in page and "bf16 autocast ran: False" in page


def _results_state(folder: Path) -> dict[str, int]:
    """name -> mtime_ns of what `folder` holds (empty when it does not exist)."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


def test_reproduce_without_data_says_where_to_get_it(tmp_path):
    # `make -C REPO` runs the command in the repository: its default results/ is REPO/results
    where = REPO / "results"
    before = _results_state(where)
    proc = _make("reproduce-msrvtt", f"MSRVTT_ROOT={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())  # rich wraps long lines
    assert "MSRVTT_JSFUSION_test.csv" in message and "videos/all" in message
    assert _results_state(where) == before, "a refused reproduction must write no results"
    assert not (tmp_path / "results").exists()


def test_reproduce_with_annotations_but_no_videos(tmp_path):
    synthetic = generate_synthetic(tmp_path / "synthetic", n_videos=8, seed=5)
    root = tmp_path / "msrvtt"
    _layout_as_msrvtt(synthetic, root)
    shutil.rmtree(root / "videos")
    proc = _make("reproduce-msrvtt", f"MSRVTT_ROOT={root}", cwd=tmp_path)
    assert proc.returncode != 0 and "none of the 8 videos" in " ".join(proc.stderr.split())


def test_results_page_rows_and_the_final_logit_scale(tmp_path):
    from muse_pipeline.reproduce.results_page import diff_row, metric_row
    from muse_pipeline.training.metrics_log import final_logit_scale

    assert metric_row("x", {"R1": 44.84, "MdR": 2}, "p") == "| x | p | 44.8 | - | - | 2.0 | - |"
    assert diff_row("d", {"R1": 40.0, "R5": 70.0}, {"R1": 44.5, "MnR": 3.0}) == "| d | -4.5 | - | - | - | - |"
    run = tmp_path / "run"
    run.mkdir()
    assert final_logit_scale(run) is None  # no metrics.jsonl
    records = [{"kind": "epoch", "epoch": 0, "logit_scale": 3.0}, {"kind": "step", "step": 1, "logit_scale": 9.0},
               {"kind": "epoch", "epoch": 1, "logit_scale": 4.5}, {"kind": "epoch", "epoch": 2}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert final_logit_scale(run) == 4.5  # the last epoch record that has one; step records ignored
