"""ActivityNet Captions paragraph retrieval (spec sections 7, 8, 9), as CLIP4Clip.

`train.json` -> split "train", `val_1.json` -> split "test" (4,917 paragraphs on the full set):
{"v_XXXX": {"duration", "timestamps", "sentences"}}. One paragraph per video: its sentences
joined by spaces, over the whole video (CLIP4Clip reads [0, ceil(duration)]). Files are found as
`v_XXXX.<ext>` or `XXXX.<ext>` in `root/videos/` or `root/`, searched recursively.
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
from muse_pipeline.data.folder import VideoFinder, find_annotation, read_json, require_keys

SPLIT_FILES = (("train.json", "train"), ("val_1.json", "test"))
ANNOTATION_DIRS = ("", "annotations", "activitynet_data")


@DATASETS.register("activitynet")
def load_activitynet(root: Path) -> DatasetIndex:
    root = Path(root)
    read: list[Path] = []
    split_of: dict[str, str] = {}
    paragraph: dict[str, str] = {}
    for name, split in SPLIT_FILES:
        path = find_annotation(root, name, ANNOTATION_DIRS)
        read.append(path)
        data = read_json(path)
        if not isinstance(data, dict):
            raise AnnotationError(
                path, f"expected a JSON object keyed by video id, got {type(data).__name__}"
            )
        for vid, entry in data.items():
            require_keys(path, entry, ["sentences"], entry=vid)
            sentences = entry["sentences"]
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise AnnotationError(path, "'sentences' must be a list of strings", entry=vid)
            if not sentences:
                raise AnnotationError(path, "video has no sentences", entry=vid)
            if vid in split_of:
                raise AnnotationError(path, f"video is also in split {split_of[vid]!r}", entry=vid)
            split_of[vid] = split
            paragraph[vid] = " ".join(" ".join(s.split()) for s in sentences)

    finder = VideoFinder([root / "videos", root], recursive=True)
    ordered = sorted(split_of)
    videos = tuple(VideoItem(vid, finder.find(vid, vid.removeprefix("v_")), split_of[vid]) for vid in ordered)
    captions = tuple(CaptionItem(paragraph[vid], i, split_of[vid]) for i, vid in enumerate(ordered))
    return DatasetIndex("activitynet", root, videos, captions, annotation_checksum=checksum_files(read))
