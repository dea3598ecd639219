"""The dataset index every loader produces, and the dataset registry.

A loader reads annotation files (or generates data) and returns a `DatasetIndex`: an ordered list
of videos (with an optional clip window) and an ordered list of captions, each pointing at its
video by index. Splits are per video; a caption has its video's split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from muse_pipeline.errors import UserError
from muse_pipeline.registry import Registry

SPLITS = ("train", "val", "test")


class AnnotationError(UserError, ValueError):
    """A malformed annotation: the message names the file and the entry."""

    def __init__(self, path: Path | str, message: str, entry: object | None = None) -> None:
        where = f"{path}" + (f" [entry {entry!r}]" if entry is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.entry = entry


@dataclass(frozen=True)
class VideoItem:
    """One video to extract. `start`/`end` in seconds; None means the whole video.

    `source`: the id of the file the clip comes from (None: `id`, a whole file or a dataset's own
    clip). `grid_step`: seconds between the frames of an auto window (`extract/windows.py`); None:
    the clip protocol (1 fps, subsampled to T)."""

    id: str
    path: Path
    split: str
    start: float | None = None
    end: float | None = None
    source: str | None = None
    grid_step: float | None = None

    @property
    def source_id(self) -> str:
        return self.id if self.source is None else self.source


@dataclass(frozen=True)
class CaptionItem:
    """One text. For DiDeMo/ActivityNet this is the paragraph (all sentences joined by spaces)."""

    text: str
    video_index: int  # index into DatasetIndex.videos
    split: str


@dataclass(frozen=True)
class DatasetIndex:
    name: str
    root: Path
    videos: tuple[VideoItem, ...]
    captions: tuple[CaptionItem, ...]
    # sha256 over the annotation files that were read (or the generator's parameters)
    annotation_checksum: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def splits(self) -> list[str]:
        return [s for s in SPLITS if any(v.split == s for v in self.videos)]

    def select(self, splits: Sequence[str] | None) -> DatasetIndex:
        """Only the videos (and their captions) of `splits`; indices are renumbered."""
        if not splits:
            return self
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
        keep = [i for i, v in enumerate(self.videos) if v.split in splits]
        if not keep:
            raise ValueError(f"dataset {self.name!r} has no videos in split(s) {list(splits)}")
        new_index = {old: new for new, old in enumerate(keep)}
        videos = tuple(self.videos[i] for i in keep)
        captions = tuple(
            CaptionItem(c.text, new_index[c.video_index], c.split)
            for c in self.captions
            if c.video_index in new_index
        )
        return DatasetIndex(self.name, self.root, videos, captions, self.annotation_checksum, self.extra)


class DatasetLoader(Protocol):
    def __call__(self, root: Path) -> DatasetIndex: ...


DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(name: str, root: Path | str, splits: Sequence[str] | None = None) -> DatasetIndex:
    """Load dataset `name` from `root` (annotation files and videos), optionally only some splits."""
    import muse_pipeline.data  # noqa: F401  (registers the built-in loaders)

    loader = DATASETS.get(name)
    return loader(Path(root)).select(splits)


def checksum_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
