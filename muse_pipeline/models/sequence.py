"""Pack the multi-scale tokens of the real frames of each video into one sequence (spec section 4).

Scale-wise order (the paper's best): [CLS_1..CLS_n] + [scale-1 tokens of frames 1..n] + ... ;
frame-wise: all tokens of frame 1, then frame 2, ... . Only real frames enter, in time order, and
any pattern of real frames in the mask is allowed (not only a prefix). Each sample is packed and
RIGHT-padded to the batch maximum.
"""

from __future__ import annotations

import torch

ORDERS = ("scale", "frame")


def real_frames(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, T] -> (b_idx, t_idx) of the real frames, row-major (the order of tokens[mask])."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T], got {tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any(1).all()):
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"every video needs at least one real frame; samples {empty} have none")
    return mask.nonzero(as_tuple=True)


def pack_sequence(
    segments: list[torch.Tensor], mask: torch.Tensor, order: str = "scale"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """segments: per real frame (row-major over mask), [n_real, n_s, D] each; segments[0] is the CLS
    ([n_real, 1, D]), then the scales. mask: [B, T].

    Returns seq [B, Lmax, D] (zeros at padding), pad_mask [B, Lmax] (True = padding) and
    cls_index [B, T] (the position of each real frame's CLS in seq, -1 for padded frames)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    b_idx, t_idx = real_frames(mask)
    mask = mask.bool()
    n_real = b_idx.numel()
    if any(s.ndim != 3 or s.shape[0] != n_real for s in segments):
        raise ValueError(f"each segment must be [n_real={n_real}, n_s, D], got {[tuple(s.shape) for s in segments]}")
    batch, _ = mask.shape
    dev = mask.device
    counts = mask.sum(1)  # [B] real frames per video
    rank = (mask.cumsum(1) - 1)[b_idx, t_idx]  # [n_real] index among the video's real frames
    n_frame = counts[b_idx]  # [n_real]
    sizes = [s.shape[1] for s in segments]
    per_frame = sum(sizes)
    positions = []
    offset = 0
    for size in sizes:
        j = torch.arange(size, device=dev)
        if order == "scale":  # segment block of n frames, then this frame's slot inside it
            pos = (n_frame * offset + rank * size)[:, None] + j
        else:
            pos = (rank * per_frame + offset)[:, None] + j
        positions.append(pos)
        offset += size
    pos = torch.cat(positions, dim=1)  # [n_real, per_frame]
    vals = torch.cat(segments, dim=1)  # [n_real, per_frame, D]
    lengths = counts * per_frame
    lmax = int(lengths.max())
    seq = vals.new_zeros(batch, lmax, vals.shape[-1])
    seq = seq.index_put((b_idx[:, None].expand_as(pos), pos), vals)
    pad_mask = torch.arange(lmax, device=dev)[None, :] >= lengths[:, None]
    cls_index = torch.full(mask.shape, -1, dtype=torch.long, device=dev)
    cls_index[b_idx, t_idx] = pos[:, 0]
    return seq, pad_mask, cls_index
