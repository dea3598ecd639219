"""A user's own directory of videos, with optional captions; plus the file helpers every loader shares.

Layout: video files anywhere under `root/` (searched recursively, symlinked folders followed), and
stills and GIFs (`IMAGE_EXTENSIONS`: .gif, .png, .jpg, .jpeg), which are videos of their frames. A
video's id is its path relative to `root`, without extension, with "/" separators ("trips/beach");
files that share a name in one folder keep their extension in the id ("clip.mp4", "clip.mkv"). Optional captions in
`root/captions.csv` (columns `video`, `caption`, optional `split`, `start`, `end`) or
`root/captions.jsonl` (one object per line with the same keys). `video` names a file by id, by
relative path, or by file name when that is unambiguous. Videos without captions get no caption
rows (search only needs video embeddings); the split defaults to "test".
A caption row with `start`/`end` refers to that window of the file: each distinct window becomes
its own clip, with id "<video id>@<start>-<end>".
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from muse_pipeline.data.base import (
    DATASETS,
    SPLITS,
    AnnotationError,
    CaptionItem,
    DatasetIndex,
    VideoItem,
    checksum_files,
)

VIDEO_EXTENSIONS = (
    ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv", ".ts",
)  # fmt: skip
# Stills and GIFs: the folder dataset takes them as videos (a still is one frame for the whole clip,
# a GIF's frames are shown at their own delays; see video/decode.py). Named datasets do not: their
# video folders may hold thumbnails next to the videos.
IMAGE_EXTENSIONS = (".gif", ".png", ".jpg", ".jpeg")


# ------------------------------------------------------------------------ shared helpers


def strip_video_extension(name: str) -> str:
    """ "abc.mp4" -> "abc"; names without a known video extension are returned unchanged."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in VIDEO_EXTENSIONS else name


def scan_videos(
    directory: Path, recursive: bool = True, extensions: Sequence[str] = VIDEO_EXTENSIONS
) -> list[Path]:
    """Files under `directory` whose extension (any case) is in `extensions`, sorted; hidden files
    and folders are skipped.

    Symlinked folders are followed (a dataset assembled from links is common); a folder reached a
    second time (a link loop, or two links to one folder) is skipped, so the walk always ends and
    no file is listed twice through the same folder.
    """
    if not directory.is_dir():
        return []
    found = []
    seen: set[tuple[int, int]] = set()

    def first_visit(path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:  # a dangling link or no permission: nothing to list there
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        return True

    first_visit(str(directory))
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        keep = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        dirnames[:] = [d for d in keep if first_visit(os.path.join(dirpath, d))]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found)


def video_ids(root: Path, files: Sequence[Path]) -> dict[str, Path]:
    """id -> file: the path relative to `root` without extension ("trips/beach"), or WITH the
    extension for files that share a name in one folder ("clip.mp4", "clip.mkv": two videos)."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.relative_to(root).with_suffix("").as_posix(), []).append(path)
    ids: dict[str, Path] = {}
    for stem, paths in by_stem.items():
        for path in paths:
            vid = stem if len(paths) == 1 else path.relative_to(root).as_posix()
            if vid in ids:
                raise AnnotationError(
                    root, f"two files give the video id {vid!r} ({ids[vid].name}, {path.name}); rename one"
                )
            ids[vid] = path
    return dict(sorted(ids.items()))


class VideoFinder:
    """Finds a dataset video's file by id among a few candidate folders (first folder wins).

    Files are listed once up front (cheap even for 20k videos) rather than probed per id.
    A video with no file gets the path it would have in the first existing folder: it is kept in
    the index and becomes an extraction failure, not an annotation error.
    """

    def __init__(self, folders: Sequence[Path], recursive: bool = False) -> None:
        self.folders = list(folders)
        self._by_stem: dict[str, Path] = {}
        for folder in self.folders:
            for path in scan_videos(folder, recursive=recursive):
                self._by_stem.setdefault(path.stem, path)
        existing = [f for f in self.folders if f.is_dir()]
        self._default = existing[0] if existing else self.folders[0]

    def find(self, *candidates: str, default_ext: str = ".mp4") -> Path:
        """The file of the first candidate id (without extension) that exists, else a default path."""
        for name in candidates:
            path = self._by_stem.get(name)
            if path is not None:
                return path
        return self._default / f"{candidates[0]}{default_ext}"


def find_annotation(root: Path, name: str, subdirs: Sequence[str] = ("",)) -> Path:
    """`name` in the first of `root/<subdir>` that has it; AnnotationError naming all places looked."""
    places = [root / sub / name if sub else root / name for sub in subdirs]
    for path in places:
        if path.is_file():
            return path
    raise AnnotationError(
        places[0], "annotation file not found (looked in " + ", ".join(map(str, places)) + ")"
    )


def read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(path, f"bad JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(path, f"not UTF-8 text: {err}") from err


def read_csv_rows(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header; AnnotationError if a required column is missing."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a BOM from Excel
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                raise AnnotationError(path, f"missing column(s) {missing}; found {columns}", entry="header")
            rows = []
            for row in reader:
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None})
            return rows
    except UnicodeDecodeError as err:
        raise AnnotationError(path, f"not UTF-8 text: {err}") from err
    except csv.Error as err:
        raise AnnotationError(path, f"bad CSV: {err}") from err


def require_keys(path: Path, obj: object, keys: Iterable[str], entry: object) -> dict:
    if not isinstance(obj, dict):
        raise AnnotationError(path, f"expected an object, got {type(obj).__name__}", entry=entry)
    for key in keys:
        if key not in obj:
            raise AnnotationError(path, f"missing key {key!r}", entry=entry)
    return obj


# --------------------------------------------------------------------------------- folder


def _parse_time(path: Path, value: object, what: str, entry: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise AnnotationError(
            path, f"{what} must be a number of seconds, got {value!r}", entry=entry
        ) from None
    if not t >= 0:
        raise AnnotationError(path, f"{what} must be >= 0, got {value!r}", entry=entry)
    return t


def _read_caption_rows(root: Path) -> tuple[Path | None, list[dict]]:
    csv_path, jsonl_path = root / "captions.csv", root / "captions.jsonl"
    if csv_path.is_file() and jsonl_path.is_file():
        raise AnnotationError(root, "both captions.csv and captions.jsonl exist; keep one")
    if csv_path.is_file():
        return csv_path, read_csv_rows(csv_path, ["video", "caption"])
    if jsonl_path.is_file():
        rows = []
        with open(jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AnnotationError(jsonl_path, f"bad JSON: {err.msg}", entry=f"line {lineno}") from err
                rows.append(require_keys(jsonl_path, obj, ["video", "caption"], f"line {lineno}"))
        return jsonl_path, rows
    return None, []


@DATASETS.register("folder")
def load_folder(root: Path) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(root, "not a directory")
    ids = video_ids(root, scan_videos(root, recursive=True, extensions=VIDEO_EXTENSIONS + IMAGE_EXTENSIONS))
    # Lookup by id, by relative path with extension, and by bare file name when unique.
    lookup: dict[str, str] = {}
    name_count: dict[str, int] = {}
    for path in ids.values():
        for key in (path.name, path.stem):
            name_count[key] = name_count.get(key, 0) + 1
    for vid, path in ids.items():
        for key in (path.name, path.stem):
            if name_count[key] == 1:
                lookup[key] = vid
        lookup[vid] = vid
        lookup[path.relative_to(root).as_posix()] = vid

    caption_file, rows = _read_caption_rows(root)
    # clip key (id, start, end) -> split; captions reference clip keys.
    clip_split: dict[tuple[str, float | None, float | None], str | None] = {}
    caption_rows: list[tuple[tuple[str, float | None, float | None], str]] = []
    for n, row in enumerate(rows):
        entry = f"row {n + 1}" if caption_file and caption_file.suffix == ".csv" else f"line {n + 1}"
        assert caption_file is not None
        name = str(row["video"]).strip()
        vid = lookup.get(name) or lookup.get(name.removeprefix("./"))
        if vid is None and name_count.get(name.removeprefix("./").rsplit("/", 1)[-1], 0) > 1:
            raise AnnotationError(
                caption_file, f"video {name!r} is ambiguous (several files have that name); "
                "name it by its path with the extension", entry=entry,
            )
        if vid is None:
            raise AnnotationError(caption_file, f"caption refers to unknown video {name!r}", entry=entry)
        start = _parse_time(caption_file, row.get("start"), "start", entry)
        end = _parse_time(caption_file, row.get("end"), "end", entry)
        if start is not None and end is not None and end < start:
            raise AnnotationError(caption_file, f"end {end} is before start {start}", entry=entry)
        split = str(row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise AnnotationError(
                caption_file, f"unknown split {split!r}; known: {', '.join(SPLITS)}", entry=entry
            )
        key = (vid, start, end)
        previous = clip_split.get(key)
        if previous is not None and split is not None and previous != split:
            raise AnnotationError(
                caption_file, f"video {vid!r} is in split {previous!r} and {split!r}", entry=entry
            )
        clip_split[key] = previous or split
        caption_rows.append((key, str(row["caption"])))

    captioned = {key[0] for key in clip_split}
    for vid in ids:
        if vid not in captioned:
            clip_split[(vid, None, None)] = None

    def clip_id(key: tuple[str, float | None, float | None]) -> str:
        vid, start, end = key
        if start is None and end is None:
            return vid
        return f"{vid}@{'' if start is None else f'{start:g}'}-{'' if end is None else f'{end:g}'}"

    keys = sorted(
        clip_split, key=lambda k: (k[0], k[1] is not None, k[1] or 0.0, k[2] is not None, k[2] or 0.0)
    )
    videos = tuple(
        VideoItem(clip_id(k), ids[k[0]], clip_split[k] or "test", start=k[1], end=k[2],
                  source=None if k[1] is None and k[2] is None else k[0])
        for k in keys
    )
    position = {k: i for i, k in enumerate(keys)}
    ordered = sorted(enumerate(caption_rows), key=lambda t: (position[t[1][0]], t[0]))
    captions = tuple(
        CaptionItem(text, position[key], videos[position[key]].split) for _, (key, text) in ordered
    )
    # Only the captions are annotations: the listing may change (a library that grows, see
    # extract/library.py), so adding, removing or changing a video keeps the checksum.
    digest = hashlib.sha256(b"folder-captions\0" + checksum_files([caption_file] if caption_file else []).encode())
    return DatasetIndex("folder", root, videos, captions, annotation_checksum=digest.hexdigest())
