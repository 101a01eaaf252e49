"""COCO run-length encoding of masks known only inside a window, without the full-size mask.

A pasted mask is zero outside its box, so its COCO RLE follows from the box window alone:
the column-major (Fortran order) flattening of an H x W mask is zeros, then the window's
first column, zeros, the next column, ... zeros. :func:`window_transitions` finds, on the
window's device, the flat positions where the value changes; only those come to the host,
where :func:`rle_from_transitions` turns them into counts and the compressed string
pycocotools writes (``rleToString``: 5-bit groups, counts after the second stored as the
difference to the count two before). The result is byte-identical to
``pycocotools.mask.encode`` of the full mask at a cost proportional to the window's area.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["window_transitions", "rle_from_transitions"]

_MAX_CHARS = 14  # 5 bits a character: enough for any int64 count difference


def window_transitions(bits: Tensor, oy: Tensor, ox: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Where each mask's column-major flattening changes value.

    Args:
        bits: K x TW x TH bool windows, column by column (``bits[k, j, i]`` is the pixel at image
            row ``oy[k] + i``, column ``ox[k] + j``); every window lies inside the image and the
            masks are zero outside their window.
        oy, ox: (K,) int64 window origins.
        image_size: (H, W).

    Returns ``(mask index, flat position)``, both int64 (T,), sorted by mask then position:
    the pixel at flat position ``p = x * H + y`` differs from the one before it (or, for
    ``p = 0``, is set). Positions never reach ``H * W``.
    """
    H, W = image_size
    K, TW, TH = bits.shape
    if K == 0 or TW == 0 or TH == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=bits.device)
        return empty, empty
    # Columns shorter than the image are separated by zeros in the flattening: one zero row
    # stands for them. A full-height window is one contiguous stretch.
    gap = 0 if TH == H else 1
    rows = TH + gap
    seq = torch.zeros((K, TW * rows + 1), dtype=torch.bool, device=bits.device)
    seq[:, : TW * rows].view(K, TW, rows)[:, :, :TH] = bits
    change = seq.clone()
    change[:, 1:] ^= seq[:, :-1]
    # A mask set at the image's last pixel changes "after" it (position H * W): not a position.
    # Only the last two sequence entries can land there (flat grows with k); clear them before
    # nonzero rather than select afterwards, as a boolean index would wait for the device again.
    tail = [TW * rows - 1, TW * rows]
    change[:, -2:] &= torch.stack([(ox + k // rows) * H + oy + k % rows < H * W for k in tail], 1)
    det, k = change.nonzero(as_tuple=True)
    flat = (ox[det] + torch.div(k, rows, rounding_mode="floor")) * H + oy[det] + k % rows
    return det, flat


def rle_from_transitions(det: np.ndarray, flat: np.ndarray, num_masks: int, image_size: tuple[int, int], *,
                         return_areas: bool = False):
    """COCO compressed RLE dicts ``{"size": [H, W], "counts": str}`` of ``num_masks`` masks from
    their transitions (:func:`window_transitions`, sorted by mask then position). With
    ``return_areas`` also their pixel counts (int64 (num_masks,)), from the runs themselves:
    no decoding of the strings, no pycocotools."""
    H, W = image_size
    total = H * W
    det = np.asarray(det, dtype=np.int64)
    flat = np.asarray(flat, dtype=np.int64)
    per_mask = np.bincount(det, minlength=num_masks)[:num_masks]
    lengths = per_mask + 1  # T transitions cut the H*W pixels into T + 1 runs
    ends = np.empty(len(flat) + num_masks, dtype=np.int64)
    # run ends: each mask's transitions, then H*W
    last = np.cumsum(lengths) - 1
    is_end = np.zeros(len(ends), dtype=bool)
    is_end[last] = True
    ends[is_end] = total
    ends[~is_end] = flat
    starts = np.empty_like(ends)
    starts[1:] = ends[:-1]
    first = last - per_mask  # first run of each mask starts at 0
    starts[first] = 0
    counts = ends - starts
    rles = [{"size": [H, W], "counts": s} for s in _counts_to_strings(counts, lengths)]
    return (rles, _areas(counts, lengths)) if return_areas else rles


def _areas(counts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Set pixels per mask: runs alternate unset, set, unset, ... from each mask's first run, so
    the area is the sum of its odd-indexed runs (what pycocotools' ``area`` adds up)."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths  # every mask has at least one run: strictly increasing
    index = np.arange(len(counts)) - np.repeat(first, lengths)
    return np.add.reduceat(np.where(index % 2 == 1, counts, 0), first).astype(np.int64, copy=False)


def _counts_to_strings(counts: np.ndarray, lengths: np.ndarray) -> list[str]:
    """pycocotools' ``rleToString`` of every mask's counts (concatenated, ``lengths`` each), vectorised."""
    n = len(counts)
    first = np.cumsum(lengths) - lengths
    index = np.arange(n) - np.repeat(first, lengths)  # position within its mask
    x = counts.astype(np.int64, copy=True)
    later = index > 2
    x[later] -= counts[np.flatnonzero(later) - 2]
    chars = np.zeros((n, _MAX_CHARS), dtype=np.uint8)
    nchars = np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for r in range(_MAX_CHARS):
        c = x & 0x1F
        x >>= 5
        more = np.where(c & 0x10, x != -1, x != 0)
        chars[:, r] = np.where(more, c | 0x20, c) + 48
        nchars += active
        active &= more
        if not active.any():
            break
    data = chars[np.arange(_MAX_CHARS)[None, :] < nchars[:, None]].tobytes()
    per_mask = np.add.reduceat(nchars, first) if n else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(per_mask)))
    return [data[offsets[i] : offsets[i + 1]].decode("ascii") for i in range(len(lengths))]
