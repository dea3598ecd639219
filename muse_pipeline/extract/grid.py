"""Auto-window rows of one file: decode its grid once, encode each distinct frame once, scatter.

A `GridUnit` is the auto-window rows of one file inside one shard (consecutive offsets, one
source, one grid step; `extract/windows.py` defines the grid). Its needed grid indices (the union
of its rows' frames) are cut into fixed chunks of at most GRID_CHUNK consecutive indices
(`decode_chunks`); each chunk is one `video.grid.decode_grid` call, preprocessed, and encoded in
fixed batches of `videos_per_batch * frames` frames. The chunks and batches depend only on the
unit's rows, never on what is pending, so a resumed run is bit-identical to an uninterrupted one.
A row is staged as soon as its last grid index is encoded; tokens no later row needs are dropped,
so memory holds about one window plus one chunk of a file.

A file whose rows span two shards is two units: the grid times that windows on both sides of the
boundary share (at most one window's worth) are decoded and encoded by both shard tasks. Nothing
else is decoded twice.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from muse_pipeline.extract.decode_pool import decode_pool, decode_retrying, failure_reason
from muse_pipeline.extract.windows import grid_indices

# Grid times per decode call: bounds the decoded frames held at once (a 1080p frame is ~6 MB).
GRID_CHUNK = 32


@dataclass(frozen=True)
class GridUnit:
    """The auto-window rows of one file in one shard: `offsets` in the shard, each row's grid
    indices `rows[i]` (int64, increasing), the file `path` and the grid `step` (whole seconds)."""

    path: str
    step: int
    offsets: tuple[int, ...]
    rows: tuple[np.ndarray, ...]

    def needed(self) -> np.ndarray:
        """Sorted unique grid indices of all its rows."""
        return np.unique(np.concatenate(self.rows))


def grid_units(paths, windows, sources, grid_steps, frames: int) -> list[GridUnit]:
    """Units of a shard's rows (per-offset sequences as in `ShardJob`): consecutive offsets with a
    grid step and the same source form one unit."""
    units: list[GridUnit] = []
    current: list[int] = []

    def close() -> None:
        if current:
            step = int(grid_steps[current[0]])
            rows = tuple(grid_indices(windows[o][0], windows[o][1], step, frames) for o in current)
            units.append(GridUnit(paths[current[0]], step, tuple(current), rows))
            current.clear()

    for offset, step in enumerate(grid_steps):
        if step is None:
            close()
            continue
        if current and (sources[offset] != sources[current[0]] or step != grid_steps[current[0]]):
            close()
        current.append(offset)
    close()
    return units


def decode_chunks(needed: np.ndarray, chunk: int = GRID_CHUNK) -> list[tuple[int, int]]:
    """(first, count) decode calls covering the sorted grid indices `needed`: runs of consecutive
    indices, each cut into pieces of at most `chunk`."""
    calls: list[tuple[int, int]] = []
    if needed.size == 0:
        return calls
    breaks = np.flatnonzero(np.diff(needed) != 1) + 1
    for run in np.split(needed, breaks):
        for lo in range(0, len(run), chunk):
            piece = run[lo : lo + chunk]
            calls.append((int(piece[0]), len(piece)))
    return calls


@dataclass(frozen=True)
class DecodedGrid:
    """One decode call, ready for the encoder: `pixels` float32 [m, 3, S, S] at grid indices
    first..first+m-1 (m = those before the video's end; may be 0), or `failure`."""

    first: int
    count: int
    pixels: np.ndarray | None
    warnings: tuple[str, ...] = ()
    failure: str | None = None


def decode_grid_and_preprocess(path: str, step: int, first: int, count: int, decoder: str,
                               image_size: int, mean, std) -> DecodedGrid:
    """`decode_grid` + preprocessing; never raises for a bad video (runs in a decode pool)."""
    from muse_pipeline.video.grid import decode_grid
    from muse_pipeline.video.transforms import preprocess_frames

    try:
        grid = decode_grid(path, step, first, count, backend=decoder)
        if grid.count == 0:
            return DecodedGrid(first, count, np.zeros((0, 3, image_size, image_size), np.float32),
                               tuple(str(w) for w in grid.warnings))
        pixels = preprocess_frames(grid.frames, image_size, mean, std).numpy()
        return DecodedGrid(first, count, pixels, tuple(str(w) for w in grid.warnings))
    except Exception as exc:  # noqa: BLE001  (a bad video must never stop the shard)
        return DecodedGrid(first, count, None, failure=failure_reason(exc))


def encode_pixels(encoder, pixels: np.ndarray, batch: int) -> np.ndarray:
    """float16 [m, L, D] tokens of `pixels` in fixed batches of `batch` frames."""
    import torch

    out = []
    for lo in range(0, len(pixels), batch):
        with torch.inference_mode():
            out.append(encoder.encode_frames(torch.from_numpy(pixels[lo : lo + batch])).to(torch.float16).numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.num_tokens, encoder.dim), np.float16)


def process_unit(unit: GridUnit, pending: set[int], encoder, decode_args: tuple, batch: int,
                 decode_workers: int | None, stage_tokens: Callable, stage_failure: Callable) -> tuple[int, list[int]]:
    """Decode, encode and scatter one unit; stage its `pending` offsets through
    `stage_tokens(offset, tokens [n, L, D], warnings)` / `stage_failure(offset, reason)`.
    `decode_args`: (decoder, image_size, mean, std). `decode_workers`: decode ahead on
    `decode_pool(decode_workers)`, surviving a decode process that dies (None: inline).
    Returns (frames encoded, encoder batch sizes)."""
    calls = decode_chunks(unit.needed())
    args = [(unit.path, unit.step, first, count, *decode_args) for first, count in calls]
    futures: list[Future | None] = [None] * len(calls)

    def result(i: int) -> DecodedGrid:
        if decode_workers is None:
            return decode_grid_and_preprocess(*args[i])
        for j in range(i, min(i + 2, len(calls))):  # one chunk decodes ahead of the encoder
            if futures[j] is None:
                futures[j] = decode_pool(decode_workers).submit(decode_grid_and_preprocess, *args[j])
        first, count = calls[i]
        return decode_retrying(futures[i], decode_workers, args[i], decode_grid_and_preprocess,
                               lambda reason: DecodedGrid(first, count, None, failure=reason))

    tokens_at: dict[int, np.ndarray] = {}
    warnings: list[str] = []
    todo = [(offset, rows) for offset, rows in zip(unit.offsets, unit.rows, strict=True)]
    encoded, batch_sizes = 0, []
    for i in range(len(calls)):
        decoded = result(i)
        if decoded.failure is not None:
            for offset, _ in todo:
                if offset in pending:
                    stage_failure(offset, decoded.failure)
            return encoded, batch_sizes
        warnings.extend(w for w in decoded.warnings if w not in warnings)
        m = len(decoded.pixels)
        if m:
            tokens = encode_pixels(encoder, decoded.pixels, batch)
            batch_sizes.extend(min(batch, m - lo) for lo in range(0, m, batch))
            encoded += m
            for k in range(m):
                tokens_at[decoded.first + k] = tokens[k]
        reached = decoded.first + decoded.count  # every needed index below this is decoded
        ready = [(o, r) for o, r in todo if r[-1] < reached]
        todo = [(o, r) for o, r in todo if r[-1] >= reached]
        for offset, rows in ready:
            if offset not in pending:
                continue
            real = [j for j in rows.tolist() if j in tokens_at]
            if not real:
                stage_failure(offset, "the window starts after the video's last frame")
                continue
            array = np.stack([tokens_at[j] for j in real])
            if not np.isfinite(array).all():
                stage_failure(offset, "non-finite values in the encoder output")
                continue
            stage_tokens(offset, array, warnings)
        keep_from = min((int(r[0]) for _, r in todo), default=None)
        for j in [j for j in tokens_at if keep_from is None or j < keep_from]:
            del tokens_at[j]
    return encoded, batch_sizes
