"""A store that grows: append a generation of rows at a shard boundary, retire rows, remember it.

Appending never rewrites an existing shard of `videos/tokens`: a generation's first row is the next
multiple of S (videos per shard), the slots in between are RETIRED padding (id "", split ""), and
only new shard files are written later by extraction. The small per-row arrays (ids, done, mask,
...) are resized and written in place. Order, for an interruption at any point: the per-row arrays
and `tokens` / `mask` first, `done` last; a store's length is `len(done)`, so until `done` grows
the rows do not exist, and planning the same update again writes the same values over them.

Retiring a row sets done = RETIRED and its mask to 0; its tokens stay where they are (no shard is
rewritten) and no reader uses them (readers select done == 1).

Root attribute `generations`: one `{"generation", "rows": [lo, hi], "new", "changed", "removed",
"unchanged"}` per run that changed the library (counts of files).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from muse_pipeline.cache.schema import PENDING, RETIRED, ROW_FLOATS, ROW_INTS, ROW_STRINGS


def aligned_start(n_rows: int, per_shard: int) -> int:
    """The first row of the next generation: `n_rows` rounded up to a multiple of `per_shard`."""
    return -(-n_rows // per_shard) * per_shard


def padding_values(n: int) -> dict[str, np.ndarray]:
    """Per-row values of n RETIRED padding slots."""
    values: dict[str, np.ndarray] = {name: np.array([""] * n, dtype=object) for name in ROW_STRINGS}
    values.update({name: np.full(n, fill, np.float64) for name, fill in ROW_FLOATS.items()})
    values.update({name: np.full(n, fill, np.int64) for name, fill in ROW_INTS.items()})
    return values


def append_rows(videos: Any, n_old: int, per_shard: int, values: dict[str, np.ndarray]) -> tuple[int, int]:
    """Append rows with per-row `values` (name -> [n]) to zarr group `videos` that holds `n_old` rows
    (`len(done)`). Returns the new rows [lo, hi); rows [n_old, lo) are RETIRED padding."""
    n = len(values["ids"])
    lo = aligned_start(n_old, per_shard)
    hi = lo + n
    padding = padding_values(lo - n_old)
    for name in (*ROW_STRINGS, *ROW_FLOATS, *ROW_INTS):
        if name not in videos:
            continue  # a store made before the array existed (its readers fill it in)
        array = videos[name]
        array.resize((hi,))
        if lo > n_old:
            array[n_old:lo] = padding[name]
        if n:
            array[lo:hi] = values[name]
    tokens, mask, done = videos["tokens"], videos["mask"], videos["done"]
    tokens.resize((hi, *tokens.shape[1:]))
    mask.resize((hi, mask.shape[1]))
    if hi > n_old:
        mask[n_old:hi] = np.zeros((hi - n_old, mask.shape[1]), np.uint8)
    done.resize((hi,))
    if hi > n_old:  # last: the rows exist from here on
        done[n_old:hi] = np.concatenate([np.full(lo - n_old, RETIRED, np.uint8), np.full(n, PENDING, np.uint8)])
    return lo, hi


def retire_rows(videos: Any, rows: np.ndarray) -> None:
    """Mark `rows` RETIRED (mask 0, tokens left as they are)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return
    mask, done = videos["mask"], videos["done"]
    current_mask, current_done = mask[:], done[:]
    current_mask[rows] = 0
    current_done[rows] = RETIRED
    mask[:] = current_mask
    done[:] = current_done
