"""MSR-VTT with the 9k train list and the 1k-A (JSFUSION) test set (spec sections 7, 8, 9).

Train: every caption of every video in MSRVTT_train.9k.csv, taken from MSRVTT_data.json
(180,000 pairs on the full set). Test: the rows of MSRVTT_JSFUSION_test.csv in file order, one
sentence per video (the 1k-A protocol). Annotation files may sit in `root/`, `root/annotations/`
or `root/msrvtt_data/`; videos `<video_id>.mp4` in `root/videos/all/`, `root/videos/` or `root/`.
MSR-VTT videos are already trimmed clips, so no window is set.
"""

from __future__ import annotations

from pathlib import Path

from muse_pipeline.data.base import (
    DATASETS,
    AnnotationError,
    CaptionItem,
    DatasetIndex,
    VideoItem,
    checksum_files,
)
from muse_pipeline.data.folder import VideoFinder, find_annotation, read_csv_rows, read_json, require_keys

ANNOTATION_DIRS = ("", "annotations", "msrvtt_data")
DATA_JSON = "MSRVTT_data.json"
TRAIN_CSV = "MSRVTT_train.9k.csv"
TEST_CSV = "MSRVTT_JSFUSION_test.csv"


def _read_data_json(path: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """Known video ids and (video_id, caption) in file order; every caption must name a known video."""
    data = read_json(path)
    require_keys(path, data, ["videos", "sentences"], entry=None)
    known: set[str] = set()
    for i, video in enumerate(data["videos"]):
        require_keys(path, video, ["video_id"], entry=f"videos[{i}]")
        known.add(str(video["video_id"]))
    sentences = []
    for i, sentence in enumerate(data["sentences"]):
        entry = f"sentences[{i}]" + (
            f" sen_id={sentence['sen_id']}" if isinstance(sentence, dict) and "sen_id" in sentence else ""
        )
        require_keys(path, sentence, ["video_id", "caption"], entry=entry)
        vid = str(sentence["video_id"])
        if vid not in known:
            raise AnnotationError(path, f"caption refers to unknown video {vid!r}", entry=entry)
        sentences.append((vid, str(sentence["caption"]).strip()))
    return known, sentences


@DATASETS.register("msrvtt")
def load_msrvtt(root: Path) -> DatasetIndex:
    root = Path(root)
    data_path = find_annotation(root, DATA_JSON, ANNOTATION_DIRS)
    train_path = find_annotation(root, TRAIN_CSV, ANNOTATION_DIRS)
    test_path = find_annotation(root, TEST_CSV, ANNOTATION_DIRS)
    known, sentences = _read_data_json(data_path)

    train_ids: list[str] = []
    for n, row in enumerate(read_csv_rows(train_path, ["video_id"])):
        vid = row["video_id"]
        if vid not in known:
            raise AnnotationError(
                train_path, f"video {vid!r} has no annotation in {DATA_JSON}", entry=f"row {n + 1}"
            )
        train_ids.append(vid)
    test_rows: list[tuple[str, str]] = []
    for n, row in enumerate(read_csv_rows(test_path, ["video_id", "sentence"])):
        vid = row["video_id"]
        if vid not in known:
            raise AnnotationError(
                test_path, f"video {vid!r} has no annotation in {DATA_JSON}", entry=f"row {n + 1}"
            )
        test_rows.append((vid, row["sentence"]))
    overlap = sorted(set(train_ids) & {vid for vid, _ in test_rows})
    if overlap:
        raise AnnotationError(
            test_path, f"{len(overlap)} test video(s) are also in {TRAIN_CSV}", entry=overlap[0]
        )

    finder = VideoFinder([root / "videos" / "all", root / "videos", root])
    split_of = dict.fromkeys(train_ids, "train") | {vid: "test" for vid, _ in test_rows}
    ordered = sorted(split_of)
    videos = tuple(VideoItem(vid, finder.find(vid), split_of[vid]) for vid in ordered)
    position = {vid: i for i, vid in enumerate(ordered)}

    train_set = set(train_ids)
    train_caps = [(position[vid], n, text) for n, (vid, text) in enumerate(sentences) if vid in train_set]
    train_caps.sort()  # grouped by video (sorted ids), annotation order within a video
    captions = [CaptionItem(text, vi, "train") for vi, _, text in train_caps]
    captions += [CaptionItem(text, position[vid], "test") for vid, text in test_rows]
    return DatasetIndex(
        "msrvtt",
        root,
        videos,
        tuple(captions),
        annotation_checksum=checksum_files([data_path, train_path, test_path]),
    )
