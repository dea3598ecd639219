"""Dataset loaders on small fake annotation files in the real formats (spec sections 7, 8, 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from muse_pipeline.data import DATASETS, AnnotationError, load_dataset
from muse_pipeline.data.base import checksum_files


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")  # loaders never decode: any bytes will do
    return path


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(index, split=None):
    return [
        (index.videos[c.video_index].id, c.text) for c in index.captions if split is None or c.split == split
    ]


def test_registry_has_all_loaders():
    assert DATASETS.names() == ["activitynet", "didemo", "folder", "msrvtt", "synthetic"]


# ------------------------------------------------------------------------------------- MSR-VTT


def _msrvtt(root: Path, ann: str = "annotations") -> dict[str, Path]:
    d = root / ann if ann else root
    data = {
        "info": {},
        "videos": [{"video_id": f"video{i}", "split": "train", "id": i} for i in (0, 1, 2, 3, 10, 11)],
        "sentences": [
            {"caption": "a man talks", "video_id": "video10", "sen_id": 0},
            {"caption": "a dog runs", "video_id": "video0", "sen_id": 1},
            {"caption": "someone talks", "video_id": "video10", "sen_id": 2},
            {"caption": "a cat sleeps", "video_id": "video2", "sen_id": 3},
            {"caption": "a dog plays", "video_id": "video0", "sen_id": 4},
            {"caption": "not in any list", "video_id": "video11", "sen_id": 5},
            {"caption": "test video own caption", "video_id": "video3", "sen_id": 6},
        ],
    }
    files = {
        "data": _write_json(d / "MSRVTT_data.json", data),
        "train": _write_lines(d / "MSRVTT_train.9k.csv", ["video_id", "video2", "video10", "video0"]),
        "test": _write_lines(
            d / "MSRVTT_JSFUSION_test.csv",
            [
                "key,vid_key,video_id,sentence",
                "ret0,msr3,video3,a woman sings",
                "ret1,msr1,video1,a car drives",
            ],
        ),
    }
    return files


def test_msrvtt_pairs_splits_and_paths(tmp_path):
    files = _msrvtt(tmp_path)
    _touch(tmp_path / "videos" / "all" / "video0.mp4")
    _touch(tmp_path / "videos" / "video10.mp4")
    _touch(tmp_path / "video3.mp4")
    index = load_dataset("msrvtt", tmp_path)
    assert [v.id for v in index.videos] == ["video0", "video1", "video10", "video2", "video3"]  # sorted ids
    assert {v.id: v.split for v in index.videos} == {
        "video0": "train", "video1": "test", "video10": "train", "video2": "train", "video3": "test",
    }  # fmt: skip
    # train: every caption of every 9k-list video, grouped by video, annotation order inside a video
    assert _pairs(index, "train") == [
        ("video0", "a dog runs"),
        ("video0", "a dog plays"),
        ("video10", "a man talks"),
        ("video10", "someone talks"),
        ("video2", "a cat sleeps"),
    ]
    # test: the JSFUSION rows in file order, with their own sentences
    assert _pairs(index, "test") == [("video3", "a woman sings"), ("video1", "a car drives")]
    paths = {v.id: v.path for v in index.videos}
    assert paths["video0"] == tmp_path / "videos" / "all" / "video0.mp4"
    assert paths["video10"] == tmp_path / "videos" / "video10.mp4"
    assert paths["video3"] == tmp_path / "video3.mp4"
    # no file: kept, with the path it would have (it lands in the extraction failure ledger)
    assert paths["video1"] == tmp_path / "videos" / "all" / "video1.mp4"
    assert all(v.start is None and v.end is None for v in index.videos)
    assert index.annotation_checksum == checksum_files([files["data"], files["train"], files["test"]])
    assert [v.id for v in load_dataset("msrvtt", tmp_path, ["test"]).videos] == ["video1", "video3"]


@pytest.mark.parametrize("ann", ["", "annotations", "msrvtt_data"])
def test_msrvtt_annotation_locations(tmp_path, ann):
    _msrvtt(tmp_path, ann)
    index = load_dataset("msrvtt", tmp_path)
    assert len(index.captions) == 7


def _msrvtt_error(tmp_path, mutate) -> AnnotationError:
    files = _msrvtt(tmp_path)
    mutate(files)
    with pytest.raises(AnnotationError) as info:
        load_dataset("msrvtt", tmp_path)
    return info.value


def test_msrvtt_missing_file(tmp_path):
    err = _msrvtt_error(tmp_path, lambda f: f["train"].unlink())
    assert "MSRVTT_train.9k.csv" in str(err) and "not found" in str(err)


def test_msrvtt_bad_json(tmp_path):
    err = _msrvtt_error(tmp_path, lambda f: f["data"].write_text('{"videos": [}'))
    assert "MSRVTT_data.json" in str(err) and "bad JSON" in str(err) and "line 1" in str(err)


def test_msrvtt_missing_column(tmp_path):
    err = _msrvtt_error(tmp_path, lambda f: _write_lines(f["test"], ["key,vid_key,sentence", "a,b,c"]))
    assert "MSRVTT_JSFUSION_test.csv" in str(err) and "video_id" in str(err)


def test_msrvtt_missing_key(tmp_path):
    err = _msrvtt_error(tmp_path, lambda f: _write_json(f["data"], {"videos": []}))
    assert "MSRVTT_data.json" in str(err) and "'sentences'" in str(err)


def test_msrvtt_caption_of_unknown_video(tmp_path):
    def mutate(files):
        data = json.loads(files["data"].read_text())
        data["sentences"].append({"caption": "orphan", "video_id": "video99", "sen_id": 7})
        _write_json(files["data"], data)

    err = _msrvtt_error(tmp_path, mutate)
    assert "MSRVTT_data.json" in str(err) and "video99" in str(err) and "sen_id=7" in str(err)
    assert "sentences[7]" in str(err.entry)


def test_msrvtt_split_list_names_unannotated_video(tmp_path):
    err = _msrvtt_error(tmp_path, lambda f: _write_lines(f["train"], ["video_id", "video0", "video77"]))
    assert "MSRVTT_train.9k.csv" in str(err) and "video77" in str(err) and "row 2" in str(err)


# -------------------------------------------------------------------------------------- DiDeMo


def _didemo(root: Path) -> dict[str, Path]:
    def moment(video, text):
        return {"video": video, "times": [[0, 0], [1, 1]], "description": text, "annotation_id": 1}

    files = {}
    files["train_data"] = _write_json(
        root / "train_data.json",
        [
            moment("b@N01_2.mov", "a boy jumps."),
            moment("a@N00_1.mp4", "first  description"),
            moment("b@N01_2.mov", "then he  lands"),
            moment("a@N00_1.mp4", "second one"),
            moment("z@N09_9.avi", "not in the list: ignored"),
        ],
    )
    files["train_list"] = _write_lines(root / "train_list.txt", ["a@N00_1", "b@N01_2.mov"])
    files["val_data"] = _write_json(root / "val_data.json", [moment("c@N02_3", "a val video")])
    files["val_list"] = _write_lines(root / "val_list.txt", ["c@N02_3.m4v"])
    files["test_data"] = _write_json(root / "test_data.json", [moment("d@N03_4.mp4", "a test video")])
    files["test_list"] = _write_lines(root / "test_list.txt", ["d@N03_4"])
    return files


def test_didemo_paragraphs_ids_and_files(tmp_path):
    files = _didemo(tmp_path)
    _touch(tmp_path / "videos" / "a@N00_1.mp4")
    _touch(tmp_path / "videos" / "part2" / "b@N01_2.mov")
    _touch(tmp_path / "videos" / "c@N02_3.avi")
    index = load_dataset("didemo", tmp_path)
    assert [v.id for v in index.videos] == ["a@N00_1", "b@N01_2", "c@N02_3", "d@N03_4"]
    assert [v.split for v in index.videos] == ["train", "train", "val", "test"]
    assert _pairs(index) == [
        ("a@N00_1", "first description second one"),
        ("b@N01_2", "a boy jumps. then he lands"),
        ("c@N02_3", "a val video"),
        ("d@N03_4", "a test video"),
    ]
    paths = [v.path for v in index.videos]
    assert paths[:3] == [
        tmp_path / "videos" / "a@N00_1.mp4",
        tmp_path / "videos" / "part2" / "b@N01_2.mov",
        tmp_path / "videos" / "c@N02_3.avi",
    ]
    assert paths[3] == tmp_path / "videos" / "d@N03_4.mp4"  # missing file: kept
    assert all((v.start, v.end) == (0.0, 30.0) for v in index.videos)
    order = ["train_list", "train_data", "val_list", "val_data", "test_list", "test_data"]
    assert index.annotation_checksum == checksum_files([files[k] for k in order])


def test_didemo_errors(tmp_path):
    files = _didemo(tmp_path)
    _write_lines(files["val_list"], ["c@N02_3", "ghost@N00_0"])
    with pytest.raises(AnnotationError, match=r"val_list\.txt.*ghost@N00_0.*no description"):
        load_dataset("didemo", tmp_path)

    files = _didemo(tmp_path)
    _write_json(files["test_data"], [{"video": "d@N03_4.mp4", "times": [[0, 0]]}])
    with pytest.raises(AnnotationError, match=r"test_data\.json.*\[0\].*missing key 'description'"):
        load_dataset("didemo", tmp_path)

    files = _didemo(tmp_path)
    files["train_data"].write_text("[{")
    with pytest.raises(AnnotationError, match=r"train_data\.json.*bad JSON"):
        load_dataset("didemo", tmp_path)

    files = _didemo(tmp_path)
    files["test_list"].unlink()
    with pytest.raises(AnnotationError, match=r"test_list\.txt.*not found"):
        load_dataset("didemo", tmp_path)

    files = _didemo(tmp_path)
    _write_lines(files["test_list"], ["d@N03_4", "a@N00_1.mp4"])
    with pytest.raises(AnnotationError, match=r"test_list\.txt.*a@N00_1.*also listed in split 'train'"):
        load_dataset("didemo", tmp_path)


# --------------------------------------------------------------------------------- ActivityNet


def _activitynet(root: Path) -> dict[str, Path]:
    def entry(*sentences):
        return {"duration": 20.0, "timestamps": [[0.0, 5.0]] * len(sentences), "sentences": list(sentences)}

    return {
        "train": _write_json(
            root / "train.json",
            {"v_bbb": entry("A man walks. ", " He sits down."), "v_aaa": entry("Only one.")},
        ),
        "val": _write_json(root / "val_1.json", {"v_ccc": entry("Kids play", "outside.")}),
    }


def test_activitynet_paragraphs_and_file_names(tmp_path):
    files = _activitynet(tmp_path)
    _touch(tmp_path / "videos" / "v_aaa.mp4")
    _touch(tmp_path / "videos" / "bbb.mkv")  # without the v_ prefix
    index = load_dataset("activitynet", tmp_path)
    assert [(v.id, v.split) for v in index.videos] == [
        ("v_aaa", "train"),
        ("v_bbb", "train"),
        ("v_ccc", "test"),
    ]
    assert _pairs(index) == [
        ("v_aaa", "Only one."),
        ("v_bbb", "A man walks. He sits down."),
        ("v_ccc", "Kids play outside."),
    ]
    assert [v.path for v in index.videos] == [
        tmp_path / "videos" / "v_aaa.mp4",
        tmp_path / "videos" / "bbb.mkv",
        tmp_path / "videos" / "v_ccc.mp4",
    ]
    assert all(v.start is None and v.end is None for v in index.videos)
    assert index.annotation_checksum == checksum_files([files["train"], files["val"]])


def test_activitynet_errors(tmp_path):
    files = _activitynet(tmp_path)
    _write_json(files["val"], {"v_ccc": {"duration": 3.0, "timestamps": []}})
    with pytest.raises(AnnotationError, match=r"val_1\.json.*v_ccc.*missing key 'sentences'"):
        load_dataset("activitynet", tmp_path)

    files = _activitynet(tmp_path)
    files["train"].write_text("{'single': 'quotes'}")
    with pytest.raises(AnnotationError, match=r"train\.json.*bad JSON"):
        load_dataset("activitynet", tmp_path)

    files = _activitynet(tmp_path)
    files["val"].unlink()
    with pytest.raises(AnnotationError, match=r"val_1\.json.*not found"):
        load_dataset("activitynet", tmp_path)

    files = _activitynet(tmp_path)
    _write_json(files["val"], {"v_aaa": {"sentences": ["again"]}})
    with pytest.raises(AnnotationError, match=r"val_1\.json.*v_aaa.*also in split 'train'"):
        load_dataset("activitynet", tmp_path)


# -------------------------------------------------------------------------------------- folder


def _folder(root: Path) -> None:
    _touch(root / "a.mp4")
    _touch(root / "sub" / "b.mkv")
    _touch(root / "c.avi")
    _touch(root / ".hidden" / "x.mp4")
    (root / "notes.txt").write_text("not a video")


def test_folder_without_captions(tmp_path):
    _folder(tmp_path)
    index = load_dataset("folder", tmp_path)
    assert [(v.id, v.split) for v in index.videos] == [("a", "test"), ("c", "test"), ("sub/b", "test")]
    assert index.videos[2].path == tmp_path / "sub" / "b.mkv"
    assert index.captions == ()
    # adding a video keeps the checksum (the folder is a library that grows); captions change it
    before = index.annotation_checksum
    _touch(tmp_path / "d.webm")
    assert load_dataset("folder", tmp_path).annotation_checksum == before
    (tmp_path / "captions.csv").write_text("video,caption\na,a red ball\n")
    assert load_dataset("folder", tmp_path).annotation_checksum != before


def test_folder_with_captions_csv(tmp_path):
    _folder(tmp_path)
    (tmp_path / "captions.csv").write_text(
        "video,caption,split,start,end\n"
        "a.mp4,a first caption,train,,\n"
        "sub/b,b caption,,,\n"
        "a,a second caption,train,,\n"
        "c.avi,c window caption,val,1.5,4\n"
    )
    index = load_dataset("folder", tmp_path)
    assert [(v.id, v.split, v.start, v.end) for v in index.videos] == [
        ("a", "train", None, None),
        ("c@1.5-4", "val", 1.5, 4.0),
        ("sub/b", "test", None, None),
    ]
    assert _pairs(index) == [
        ("a", "a first caption"),
        ("a", "a second caption"),
        ("c@1.5-4", "c window caption"),
        ("sub/b", "b caption"),
    ]
    assert [c.split for c in index.captions] == ["train", "train", "val", "test"]


def test_folder_with_captions_jsonl_and_errors(tmp_path):
    _folder(tmp_path)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(
        '{"video": "c", "caption": "see c"}\n\n{"video": "b.mkv", "caption": "see b", "split": "train"}\n'
    )
    index = load_dataset("folder", tmp_path)
    assert _pairs(index) == [("c", "see c"), ("sub/b", "see b")]
    assert [v.split for v in index.videos] == ["test", "test", "train"]

    jsonl.write_text('{"video": "nope.mp4", "caption": "x"}\n')
    with pytest.raises(AnnotationError, match=r"captions\.jsonl.*line 1.*unknown video 'nope\.mp4'"):
        load_dataset("folder", tmp_path)
    jsonl.write_text('{"video": "a", "caption": "x"}\n{"video": "a"\n')
    with pytest.raises(AnnotationError, match=r"captions\.jsonl.*line 2.*bad JSON"):
        load_dataset("folder", tmp_path)
    jsonl.write_text(
        '{"video": "a", "caption": "x", "split": "train"}\n{"video": "a", "caption": "y", "split": "test"}\n'
    )
    with pytest.raises(AnnotationError, match=r"line 2.*'train' and 'test'"):
        load_dataset("folder", tmp_path)
    jsonl.unlink()
    (tmp_path / "captions.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(AnnotationError, match=r"captions\.csv.*missing column"):
        load_dataset("folder", tmp_path)


def test_folder_same_name_different_extensions_are_two_videos(tmp_path):
    _touch(tmp_path / "clip.mp4")
    _touch(tmp_path / "clip.mkv")
    _touch(tmp_path / "other.mp4")
    index = load_dataset("folder", tmp_path)
    assert [(v.id, v.path.name) for v in index.videos] == [
        ("clip.mkv", "clip.mkv"), ("clip.mp4", "clip.mp4"), ("other", "other.mp4"),
    ]
    (tmp_path / "captions.csv").write_text("video,caption\nclip.mkv,the mkv one\nother,o\n")
    index = load_dataset("folder", tmp_path)
    assert _pairs(index) == [("clip.mkv", "the mkv one"), ("other", "o")]
    (tmp_path / "captions.csv").write_text("video,caption\nclip,which one?\n")
    with pytest.raises(AnnotationError, match="ambiguous"):
        load_dataset("folder", tmp_path)


def test_folder_follows_symlinked_folders_and_stops_at_loops(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _touch(root / "a.mp4")
    _touch(elsewhere / "deep" / "b.mp4")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "deep" / "back").symlink_to(elsewhere, target_is_directory=True)  # a loop
    (root / "self").symlink_to(root, target_is_directory=True)  # another loop
    (root / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    index = load_dataset("folder", root)
    assert [v.id for v in index.videos] == ["a", "linked/deep/b"]
    assert index.videos[1].path == root / "linked" / "deep" / "b.mp4"


# ------------------------------------------------------------------- clip windows in the cache


def _windows_by_dataset_rule(dataset: str, ids: list[str]) -> np.ndarray:
    """What the search index derived before caches stored windows (stages/search.py `_windows` as of
    commit ffa6b40, transcribed): DiDeMo clips are the first 30 s; a folder clip id `<video>@<start>-<end>`
    carries its window; anything else is the whole video (NaN)."""
    out = np.full((len(ids), 2), np.nan)
    for j, vid in enumerate(ids):
        if dataset == "didemo":
            out[j] = (0.0, 30.0)
        elif "@" in vid:
            lo, sep, hi = vid.rsplit("@", 1)[1].partition("-")
            try:
                out[j] = (float(lo) if lo else np.nan, float(hi) if hi else np.nan) if sep else out[j]
            except ValueError:
                pass
    return out


def _synthetic_meta(root: Path) -> None:
    videos = [{"id": f"syn{i}", "file": f"syn{i}.mp4", "split": s} for i, s in enumerate(("train", "test"))]
    _write_json(root / "synthetic.json",
                {"videos": videos, "captions": [{"video": v["id"], "text": "a shape"} for v in videos]})


def _folder_with_windows(root: Path) -> None:
    _folder(root)
    (root / "captions.csv").write_text(
        "video,caption,split,start,end\n"
        "a.mp4,whole a,train,,\n"
        "c.avi,c window,val,1.5,4\n"
        "c.avi,c open end,val,2,\n"
        "sub/b,b open start,,,7.25\n"
    )


@pytest.mark.parametrize("dataset", ["msrvtt", "didemo", "activitynet", "folder", "synthetic"])
def test_cache_stores_each_clip_window_as_the_dataset_rules_give_it(tmp_path, dataset):
    from muse_pipeline.cache.store import FeatureCache

    root = tmp_path / "data"
    {"msrvtt": _msrvtt, "didemo": _didemo, "activitynet": _activitynet, "folder": _folder_with_windows,
     "synthetic": _synthetic_meta}[dataset](root)
    index = load_dataset(dataset, root)
    cache = FeatureCache.create(tmp_path / "c.zarr", index, frames=2, num_tokens=5, dim=4, words=3,
                                fingerprint={"dataset": dataset})
    rows = np.arange(len(index.videos))
    stored = FeatureCache.open(tmp_path / "c.zarr").read_windows(rows[::-1])
    assert stored.dtype == np.float64 and stored.shape == (len(rows), 2)
    np.testing.assert_array_equal(stored, _windows_by_dataset_rule(dataset, cache.video_ids)[::-1])
    if dataset in ("didemo", "folder"):
        assert np.isfinite(stored).any()  # the case has real windows, not only NaN
