"""DiDeMo paragraph retrieval (spec sections 7, 8, 9), as CLIP4Clip.

Per split: `{split}_list.txt` names the videos, `{split}_data.json` holds moment descriptions
({"video", "times", "description", ...}). A video's text is ONE paragraph: all its descriptions
joined by spaces, in annotation order. Annotation entries of videos not in the split list are
ignored (the lists leave out videos that could not be downloaded); a listed video without any
description is an AnnotationError. Ids may carry a file extension or not ("x.mov" == "x").
Videos (any common extension) in `root/videos/` or `root/`, searched recursively.

Clip window [0, 30) s: annotators saw only the first 30 s (six 5-s moments), which is also why
CLIP4Clip reads each video up to ~30 s.
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
from muse_pipeline.data.folder import (
    VideoFinder,
    find_annotation,
    read_json,
    require_keys,
    strip_video_extension,
)

SPLIT_FILES = (("train", "train"), ("val", "val"), ("test", "test"))  # (file prefix, split)
ANNOTATION_DIRS = ("", "annotations", "didemo_data")
WINDOW = (0.0, 30.0)


def _read_list(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [strip_video_extension(line.strip()) for line in f if line.strip()]


@DATASETS.register("didemo")
def load_didemo(root: Path) -> DatasetIndex:
    root = Path(root)
    read: list[Path] = []
    split_of: dict[str, str] = {}
    paragraphs: dict[str, list[str]] = {}
    list_path_of: dict[str, Path] = {}
    for prefix, split in SPLIT_FILES:
        list_path = find_annotation(root, f"{prefix}_list.txt", ANNOTATION_DIRS)
        data_path = find_annotation(root, f"{prefix}_data.json", ANNOTATION_DIRS)
        read += [list_path, data_path]
        listed = _read_list(list_path)
        for vid in listed:
            if split_of.get(vid, split) != split:
                raise AnnotationError(
                    list_path, f"video is also listed in split {split_of[vid]!r}", entry=vid
                )
            split_of[vid] = split
            list_path_of[vid] = list_path
        wanted = set(listed)
        data = read_json(data_path)
        if not isinstance(data, list):
            raise AnnotationError(data_path, f"expected a JSON list of moments, got {type(data).__name__}")
        for i, moment in enumerate(data):
            require_keys(data_path, moment, ["video", "description"], entry=f"[{i}]")
            vid = strip_video_extension(str(moment["video"]).strip())
            if vid in wanted:
                paragraphs.setdefault(vid, []).append(" ".join(str(moment["description"]).split()))

    for vid in split_of:
        if vid not in paragraphs:
            raise AnnotationError(
                list_path_of[vid], "listed video has no description in its _data.json", entry=vid
            )

    finder = VideoFinder([root / "videos", root], recursive=True)
    ordered = sorted(split_of)
    videos = tuple(VideoItem(vid, finder.find(vid), split_of[vid], *WINDOW) for vid in ordered)
    captions = tuple(
        CaptionItem(" ".join(paragraphs[vid]), i, split_of[vid]) for i, vid in enumerate(ordered)
    )
    return DatasetIndex("didemo", root, videos, captions, annotation_checksum=checksum_files(read))
