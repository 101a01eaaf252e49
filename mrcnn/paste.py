"""Paste per-detection M x M mask probabilities into full-size images.

torchvision's ``paste_masks_in_image`` loops over detections in Python, calls
``F.interpolate`` once per mask and builds an N x H x W float tensor before anyone
thresholds it. Here every detection is computed only inside its (clipped) box, all
detections of a chunk in one set of tensor ops, in chunks bounded by a memory budget.

The arithmetic reproduces ATen's CPU ``upsample_bilinear2d`` (align_corners=False)
step by step, so the float output equals torchvision's and ``> 0.5`` agrees to the pixel:

* source index ``src = scale * (dst + 0.5) - 0.5`` with ``scale = float(in) / float(out)``
  in float32, negative ``src`` clamped to 0, ``i0 = floor(src)``, ``i1 = i0 + 1`` unless
  at the last row, ``l1 = src - i0``, ``l0 = 1 - l1``;
* outputs with ``h + w > 128`` use ATen's separable kernel:
  ``h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)``;
* smaller outputs use ATen's channels-last kernel:
  ``x00 * (h0 * w0) + x01 * (h0 * w1) + x10 * (h1 * w0) + x11 * (h1 * w1)``;
* ATen's vectorised CPU builds (AVX2, AVX512) are compiled with floating-point
  contraction, so ``a * b + c`` is one fused multiply-add there. We emulate
  ``fma(a, b, c)`` in float64 (the float32 product is exact in float64); the DEFAULT
  build has no FMA and is matched with plain float32 arithmetic.

On CUDA the same formula is used; it is close to torchvision's result there but has
not been checked bit for bit. For CPU tensors ``paste_masks_to_rle`` runs the same
arithmetic in C++ (``ops/csrc/paste_rle_cpu.cpp``), counting the RLE runs as it goes.
"""

from __future__ import annotations

import platform
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ops._registration import ops
from .rle import rle_from_transitions, window_transitions

__all__ = ["paste_masks", "paste_masks_to_rle", "rle_area", "paste_masks_grid", "paste_masks_grid_to_rle"]

# Torchvision's padding of the M x M mask before resizing (paste_masks_in_image(padding=1)).
_PADDING = 1
# Memory for one tile step: about this many bytes per tile element live at once
# (four gathered float32 corners, float64 temporaries, int64 indices).
_BYTES_PER_TILE_ELEM = 96
DEFAULT_TILE_BUDGET_BYTES = 128 * 2**20
# paste_masks_to_rle: uint8 H x W x chunk masks that may exist at once.
DEFAULT_RLE_CHUNK_BYTES = 64 * 2**20
# ATen picks its channels-last bilinear kernel when out_h + out_w <= 128.
_SMALL_OUTPUT_SUM = 128


def _aten_cpu_uses_fma() -> bool:
    # ATen's x86 CPU kernels for AVX2/AVX512 are compiled with FMA contraction, its x86
    # DEFAULT build is not; aarch64 compilers contract by default.
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    return True


def _make_fma(fused: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    if fused:
        # a*b is exact in float64; one rounding of the sum to float64 then to float32
        # differs from a true single rounding only in ~2**-29 of cases.
        return lambda a, b, c: torch.addcmul(c.double(), a.double(), b.double()).float()
    return lambda a, b, c: a * b + c


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale boxes about their centres, with torchvision's exact float operations."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half *= scale
    h_half *= scale
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def _source_index(dst: Tensor, scale: Tensor, in_size: int, fma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ATen's area_pixel_compute_source_index + guard_index_and_lambda, elementwise."""
    # torch.full fills on the device; torch.tensor(0.5, device=cuda) would copy from the host and wait.
    half = torch.full((), 0.5, dtype=torch.float32, device=dst.device)
    src = fma(scale, dst + half, -half)
    src = torch.where(src < 0, torch.zeros_like(src), src)
    i0 = src.floor().to(torch.int64).clamp_(max=in_size - 1)
    l1 = (src - i0.to(torch.float32)).clamp_(0.0, 1.0)
    l0 = 1.0 - l1
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    return i0, i1, l0, l1


class _Geometry:
    """Integer boxes and their clipped extents, as torchvision's paste computes them."""

    def __init__(self, boxes: Tensor, mask_size: int, image_size: tuple[int, int]):
        scale = float(mask_size + 2 * _PADDING) / mask_size
        b = expand_boxes(boxes, scale).to(torch.int64)
        self.x0, self.y0, self.x1, self.y1 = b.unbind(1)
        self.w = (self.x1 - self.x0 + 1).clamp(min=1)
        self.h = (self.y1 - self.y0 + 1).clamp(min=1)
        H, W = image_size
        self.xs = self.x0.clamp(min=0)
        self.ys = self.y0.clamp(min=0)
        self.xe = torch.minimum(self.x1 + 1, torch.full_like(self.x1, W))
        self.ye = torch.minimum(self.y1 + 1, torch.full_like(self.y1, H))
        self.wc = (self.xe - self.xs).clamp(min=0)
        self.hc = (self.ye - self.ys).clamp(min=0)

    def subset(self, sel) -> "_Geometry":
        sub = _Geometry.__new__(_Geometry)
        for name, value in vars(self).items():
            setattr(sub, name, value[sel])
        return sub


def plan_tiles(hc: np.ndarray, wc: np.ndarray, budget_elems: int) -> list[tuple[np.ndarray, int, int, int]]:
    """Group detections into tiles of at most ``budget_elems`` elements.

    Detections are sorted by clipped height so a group shares a similar tile; a group of
    K detections with tile TH x TW is processed in row bands of TB rows with
    K * TB * TW <= budget_elems (TB < TH only when one detection alone exceeds it).
    Returns (indices, TH, TW, TB) per group. Detections with an empty clipped box are
    left out: their masks are all zero.
    """
    keep = np.flatnonzero((hc > 0) & (wc > 0))
    order = keep[np.argsort(-hc[keep], kind="stable")]
    hs, ws = hc[order], wc[order]
    groups = []
    i, n = 0, len(order)
    while i < n:
        th = int(hs[i])
        tw_run = np.maximum.accumulate(ws[i:])
        cost = np.arange(1, n - i + 1, dtype=np.int64) * th * tw_run
        k = max(int(np.count_nonzero(cost <= budget_elems)), 1)
        tw = int(tw_run[k - 1])
        tb = th if k > 1 else max(1, min(th, budget_elems // tw))
        groups.append((order[i : i + k], th, tw, tb))
        i += k
    return groups


def _paste_tiles(
    padded: Tensor,
    geo: _Geometry,
    image_size: tuple[int, int],
    write: Callable[[Tensor, Tensor, Tensor, Tensor], None],
    budget_bytes: int,
    fused: bool,
    group: Optional[Callable[[Tensor, Tensor, Tensor, int, int], None]] = None,
) -> None:
    """Compute every detection inside its clipped box and hand tiles to ``write``.

    ``write(det, ys, xs, values)`` receives detection indices (K,), image rows (K, TB),
    image columns (K, TW) and float32 values (K, TB, TW). Tile pixels outside a
    detection's box are 0, and every tile lies inside the image. ``group(det, oy, ox, TH, TW)``,
    when given, is called before the row bands of each group of detections: their tiles'
    origins (K,) and size; the bands then follow in order, top to bottom, TB rows each (the
    last one fewer), so a band's first row within the tiles is the rows written before it.
    """
    budget_elems = max(1, budget_bytes // _BYTES_PER_TILE_ELEM)
    # One copy to the host for the plan (each .cpu() of a device tensor waits for the device).
    # ATen resizes small outputs with another kernel (other rounding): plan the two
    # kinds apart so that each tile runs one formula.
    hc, wc, small = torch.stack((geo.hc, geo.wc, ((geo.h + geo.w) <= _SMALL_OUTPUT_SUM).to(geo.hc.dtype))).cpu().numpy()
    plan = []
    for is_small in (True, False):
        sel = np.flatnonzero(small == int(is_small))
        plan += [(is_small, sel[idx], th, tw, tb) for idx, th, tw, tb in plan_tiles(hc[sel], wc[sel], budget_elems)]
    if not plan:
        return
    # Every group's detection indices in one transfer, sliced on the device.
    dets = _to_device(np.concatenate([d for _, d, _, _, _ in plan]), padded.device)
    start = 0
    for is_small, d, th, tw, tb in plan:
        det = dets[start : start + len(d)]
        start += len(d)
        _paste_group(padded[det], geo.subset(det), image_size, det, th, tw, tb, is_small, write, fused, group)


def _to_device(a: np.ndarray, device: torch.device) -> Tensor:
    """Host array to ``device`` without waiting for the device: a plain copy to CUDA is
    synchronous, a pinned one with non_blocking is queued on the stream (the caching host
    allocator keeps the pinned block until the copy has run)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _axis(origin, offset, n, box_start, lo, hi, size, in_size, fma):
    """Image positions origin + offset + arange(n) and their source indices and weights.

    Weights outside the clipped box [lo, hi) are zeroed so those tile pixels come out 0
    (mask probabilities are finite).
    """
    pos = origin[:, None] + torch.arange(offset, offset + n, device=origin.device)
    # float32 in_size / size as ATen divides; filled on the device, not copied from the host.
    # (A Python scalar would not do: float / tensor is reciprocal() * float, another rounding.)
    scale = torch.full((), float(in_size), dtype=torch.float32, device=origin.device) / size.to(torch.float32)
    i0, i1, l0, l1 = _source_index((pos - box_start[:, None]).to(torch.float32), scale[:, None], in_size, fma)
    inside = (pos >= lo[:, None]) & (pos < hi[:, None])
    zero = torch.zeros((), dtype=l0.dtype, device=l0.device)
    return pos, i0, i1, torch.where(inside, l0, zero), torch.where(inside, l1, zero)


def _paste_group(padded, geo, image_size, det, th, tw, tb, is_small, write, fused, group=None):
    H, W = image_size
    K, Mp = padded.shape[0], padded.shape[-1]
    fma = _make_fma(fused)
    # Tile origin: the clipped box start, pulled back so that the tile stays in the image.
    oy = geo.ys.clamp(max=H - th)
    ox = geo.xs.clamp(max=W - tw)
    if group is not None:
        group(det, oy, ox, th, tw)
    xx, xi0, xi1, w0, w1 = _axis(ox, 0, tw, geo.x0, geo.xs, geo.xe, geo.w, Mp, fma)
    if not is_small:
        # ATen's separable kernel: (x0 * w0 + x1 * w1) along rows first, then
        # t0 * h0 + t1 * h1 down the columns. Rows first over all Mp source rows (cheap).
        cols0 = padded.gather(2, xi0[:, None, :].expand(K, Mp, tw))
        cols1 = padded.gather(2, xi1[:, None, :].expand(K, Mp, tw))
        rows = fma(cols0, w0[:, None, :], cols1 * w1[:, None, :])  # (K, Mp, TW)
        rows64 = rows.double() if fused else rows
        del cols0, cols1
    else:
        flat = padded.reshape(K, Mp * Mp)
    for b0 in range(0, th, tb):
        n = min(tb, th - b0)
        yy, yi0, yi1, h0, h1 = _axis(oy, b0, n, geo.y0, geo.ys, geo.ye, geo.h, Mp, fma)
        if not is_small:
            t0 = rows64.gather(1, yi0[:, :, None].expand(K, n, tw))
            t1h1 = rows.gather(1, yi1[:, :, None].expand(K, n, tw)) * h1[:, :, None]
            if fused:
                val = torch.addcmul(t1h1.double(), t0, h0[:, :, None].double()).float()
            else:
                val = t0 * h0[:, :, None] + t1h1
            del t0, t1h1
        else:
            # ATen's channels-last kernel (used when out_h + out_w <= 128): four corner
            # weights h * w, summed x00, x01, x10, x11 in that order.
            r0, r1 = (yi0 * Mp)[:, :, None], (yi1 * Mp)[:, :, None]
            c0, c1 = xi0[:, None, :], xi1[:, None, :]

            def corner(r, c):
                return flat.gather(1, (r + c).reshape(K, -1)).view(K, n, tw)

            h0_, h1_, w0_, w1_ = h0[:, :, None], h1[:, :, None], w0[:, None, :], w1[:, None, :]
            val = fma(corner(r0, c0), h0_ * w0_, corner(r0, c1) * (h0_ * w1_))
            val = fma(corner(r1, c0), h1_ * w0_, val)
            val = fma(corner(r1, c1), h1_ * w1_, val)
        write(det, yy, xx, val)


def _prepare(masks: Tensor, boxes: Tensor, image_size) -> tuple[Tensor, Tensor, tuple[int, int]]:
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be N x 1 x M x M or N x M x M, got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[-1] != masks.shape[-2] or masks.shape[-1] < 1:
        raise ValueError(f"masks must be N x 1 x M x M or N x M x M (square), got shape {tuple(masks.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise ValueError(
            f"boxes must be N x 4 with N = {masks.shape[0]} (the number of masks), got shape {tuple(boxes.shape)}"
        )
    if not masks.is_floating_point():
        raise TypeError(f"masks must be float probabilities, got dtype {masks.dtype}")
    try:
        H, W = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (H, W), got {image_size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"image_size must be positive, got {(H, W)}")
    # The model's mask probabilities are float32 (autocast may hand back bf16/fp16).
    masks = masks.to(torch.float32)
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    return masks, boxes, (H, W)


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    *,
    threshold: Optional[float] = None,
    tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES,
) -> Tensor:
    """Paste mask probabilities into (H, W) images, like torchvision's paste_masks_in_image.

    Args:
        masks: N x 1 x M x M (or N x M x M) float probabilities, one per detection.
        boxes: N x 4 boxes (x0, y0, x1, y1) in the image's pixels.
        image_size: (H, W) of the image.
        threshold: None returns float32 probabilities N x 1 x H x W equal to
            ``torchvision.models.detection.roi_heads.paste_masks_in_image(masks, boxes,
            (H, W), padding=1)``; a number returns the bool masks ``probs > threshold``
            without materialising the float N x H x W tensor.
        tile_budget_bytes: rough bound on the working memory of one step.
    """
    masks, boxes, (H, W) = _prepare(masks, boxes, image_size)
    N = masks.shape[0]
    dtype = torch.float32 if threshold is None else torch.bool
    out = torch.zeros((N, H, W), dtype=dtype, device=masks.device)
    if N == 0:
        return out[:, None]
    geo = _Geometry(boxes, masks.shape[-1], (H, W))
    padded = F.pad(masks, (_PADDING,) * 4)

    def write(det, yy, xx, val):
        # Broadcast indices: no tile-sized index tensor is built.
        out[det[:, None, None], yy[:, :, None], xx[:, None, :]] = val if threshold is None else val > threshold

    _paste_tiles(padded, geo, (H, W), write, tile_budget_bytes, _fused_for(masks.device))
    return out[:, None]


def _fused_for(device: torch.device) -> bool:
    # CUDA compilers contract a*b+c into FMA by default as well.
    return True if device.type != "cpu" else _aten_cpu_uses_fma()


def rle_chunk_size(image_size: tuple[int, int], chunk_bytes: int = DEFAULT_RLE_CHUNK_BYTES) -> int:
    """How many H x W uint8 masks paste_masks_to_rle holds at once."""
    H, W = image_size
    return max(1, chunk_bytes // (H * W))


def paste_masks_to_rle(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    *,
    threshold: float = 0.5,
    tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES,
    return_areas: bool = False,
):
    """Paste, threshold (``> threshold``) and encode each mask as COCO compressed RLE.

    Returns one ``{"size": [H, W], "counts": str}`` per detection, in order, byte-identical to
    ``pycocotools.mask.encode`` of ``paste_masks(masks, boxes, image_size, threshold=threshold)``;
    with ``return_areas`` also their pixel counts (int64, equal to :func:`rle_area`, but summed
    from the runs while encoding: no pycocotools on any device). No full-size mask is made, so
    the cost follows the boxes' area, not the image's:

    * CPU tensors go to the C++ kernel ``torch.ops.mrcnn.paste_masks_rle``, which counts the
      runs of each box's columns as it computes them (one pass, no buffer);
    * other devices threshold each box tile there and bring only the positions where the
      values change to the host (:mod:`mrcnn.rle`), in one copy.
    """
    masks, boxes, (H, W) = _prepare(masks, boxes, image_size)
    if masks.shape[0] == 0:
        return ([], np.zeros(0, dtype=np.int64)) if return_areas else []
    if _uses_cpu_kernel(masks.device):
        rles, areas = _paste_rle_cpu(masks, boxes, (H, W), threshold)
    else:
        rles, areas = _paste_rle_tiles(masks, boxes, (H, W), threshold, tile_budget_bytes, return_areas=True)
    return (rles, areas) if return_areas else rles


def _uses_cpu_kernel(device: torch.device) -> bool:
    # A seam: tests turn it off to run the other devices' tile path on CPU tensors.
    return device.type == "cpu"


def _paste_rle_cpu(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float):
    H, W = image_size
    chars, offsets, areas = ops.paste_masks_rle(
        masks.contiguous(), boxes.contiguous(), H, W, float(threshold), _fused_for(masks.device))
    data, off = chars.numpy().tobytes(), offsets.tolist()
    rles = [{"size": [H, W], "counts": data[off[i] : off[i + 1]].decode("ascii")} for i in range(len(off) - 1)]
    return rles, areas.numpy()


def _paste_rle_tiles(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float,
                     tile_budget_bytes: int, *, return_areas: bool = False):
    """Box tiles thresholded on the masks' device; transitions to the host; strings (and, with
    ``return_areas``, areas from the same runs) in numpy. Host waits: the plan's copy, one
    nonzero per group of tiles, the final copy."""
    H, W = image_size
    N = masks.shape[0]
    geo = _Geometry(boxes, masks.shape[-1], (H, W))
    padded = F.pad(masks, (_PADDING,) * 4)
    found: list[tuple[Tensor, Tensor]] = []
    tile: dict = {}

    def flush() -> None:
        if tile:
            k, flat = window_transitions(tile["bits"], tile["oy"], tile["ox"], (H, W))
            found.append((tile["det"][k], flat))
            tile.clear()

    def group(det, oy, ox, th, tw):
        flush()
        tile.update(det=det, oy=oy, ox=ox, bits=torch.zeros((len(det), tw, th), dtype=torch.bool, device=masks.device),
                    row=0)

    def write(det, yy, xx, val):
        # The band's first row within the tiles, counted on the host (bands come in order):
        # reading it back from yy would wait for the device once per band.
        b0, tile["row"] = tile["row"], tile["row"] + val.shape[1]
        tile["bits"][:, :, b0 : b0 + val.shape[1]] = (val > threshold).transpose(1, 2)

    _paste_tiles(padded, geo, (H, W), write, tile_budget_bytes, _fused_for(masks.device), group)
    flush()
    return _rles_of(found, N, (H, W), return_areas)


def _rles_of(found: list[tuple[Tensor, Tensor]], num_masks: int, image_size: tuple[int, int], return_areas: bool):
    """The RLEs (and areas) of ``num_masks`` masks from their windows' transitions, (detection
    indices, flat positions) per window: sorted on the device, one copy to the host."""
    H, W = image_size
    if found:
        det = torch.cat([d for d, _ in found])
        flat = torch.cat([f for _, f in found])
        order = torch.argsort(det * (H * W) + flat)  # by detection, then position
        det, flat = torch.stack((det, flat))[:, order].cpu().numpy()  # one copy to the host
    else:
        det = flat = np.zeros(0, dtype=np.int64)
    return rle_from_transitions(det, flat, num_masks, (H, W), return_areas=return_areas)


def rle_area(rles: list[dict]) -> np.ndarray:
    """Pixel counts of COCO RLE masks, as int64, decoded by pycocotools (imported here only).
    ``paste_masks_to_rle(..., return_areas=True)`` needs no pycocotools."""
    if not rles:
        return np.zeros((0,), dtype=np.int64)
    from pycocotools import mask as mask_util

    encoded = [{"size": r["size"], "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]} for r in rles]
    return np.asarray(mask_util.area(encoded), dtype=np.int64).reshape(-1)


# ---- Detectron2's paste ---------------------------------------------------------------------
# Detectron2 (layers/mask_ops.py, paste_masks_in_image) pastes with grid_sample, not a resize:
# image pixel (x, y) samples the M x M probabilities at ((x + 0.5 - x0) / (x1 - x0) * 2 - 1, ...)
# (align_corners=False, zeros outside), within [floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1,
# ceil(y1) + 1) clipped to the image, and a pixel is set when its value is >= the threshold.
# Each pixel's value depends on its own coordinates only, so detections are computed together
# in shared tiles (grouped as torchvision's paste above), each masked to its own window.

_GRID_BYTES_PER_ELEM = 24  # grid (2 floats), sampled value, window mask, bits


def _grid_windows(boxes: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(xs, ys, xe, ye) int64: each detection's window as Detectron2's CPU paste computes it."""
    H, W = image_size
    x0, y0, x1, y1 = boxes.unbind(1)
    xs = (x0.floor() - 1).clamp(min=0).to(torch.int64)
    ys = (y0.floor() - 1).clamp(min=0).to(torch.int64)
    xe = (x1.ceil() + 1).clamp(max=W).to(torch.int64)
    ye = (y1.ceil() + 1).clamp(max=H).to(torch.int64)
    return xs, ys, torch.maximum(xe, xs), torch.maximum(ye, ys)


def _paste_grid_tiles(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], budget_bytes: int,
                      write: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int], None]) -> None:
    """Sample every detection over its window; ``write(det, oy, ox, rows, cols, values, b0, th)``
    gets a band of a group's tiles: detection indices (K,), tile origins (K,), image rows (K, TB),
    image columns (K, TW), float32 values (K, TB, TW), 0 outside each detection's window, the
    band's first row within the tiles and the tiles' height (bands come top to bottom)."""
    H, W = image_size
    xs, ys, xe, ye = _grid_windows(boxes, image_size)
    hc, wc = torch.stack((ye - ys, xe - xs)).cpu().numpy()
    budget = max(1, budget_bytes // _GRID_BYTES_PER_ELEM)
    for idx, th, tw, tb in plan_tiles(hc, wc, budget):
        det = _to_device(idx, masks.device)
        x0, y0, x1, y1 = (c[:, None] for c in boxes[det].unbind(1))
        oy = ys[det].clamp(max=H - th)
        ox = xs[det].clamp(max=W - tw)
        cols = ox[:, None] + torch.arange(tw, device=masks.device)
        gx = (cols.to(torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        col_in = (cols >= xs[det, None]) & (cols < xe[det, None])
        for b0 in range(0, th, tb):
            n = min(tb, th - b0)
            rows = oy[:, None] + torch.arange(b0, b0 + n, device=masks.device)
            gy = (rows.to(torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
            grid = torch.stack((gx[:, None, :].expand(-1, n, -1), gy[:, :, None].expand(-1, -1, tw)), dim=3)
            val = F.grid_sample(masks[det, None], grid, align_corners=False)[:, 0]
            row_in = (rows >= ys[det, None]) & (rows < ye[det, None])
            val = torch.where(row_in[:, :, None] & col_in[:, None, :], val, torch.zeros((), device=val.device))
            write(det, oy, ox, rows, cols, val, b0, th)


def paste_masks_grid(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], *, threshold: Optional[float] = None,
                     tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES) -> Tensor:
    """Detectron2's ``paste_masks_in_image``: float32 N x 1 x H x W values (0 outside each
    detection's window), or with ``threshold`` the bool masks ``values >= threshold``, equal to
    Detectron2's on CPU and (the thresholded ones) on CUDA."""
    masks, boxes, (H, W) = _prepare(masks, boxes, image_size)
    out = torch.zeros((masks.shape[0], H, W), dtype=torch.float32 if threshold is None else torch.bool,
                      device=masks.device)

    def write(det, oy, ox, rows, cols, val, b0, th):
        out[det[:, None, None], rows[:, :, None], cols[:, None, :]] = val if threshold is None else val >= threshold

    if masks.shape[0]:
        _paste_grid_tiles(masks, boxes, (H, W), tile_budget_bytes, write)
    return out[:, None]


def paste_masks_grid_to_rle(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], *, threshold: float = 0.5,
                            tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES, return_areas: bool = False):
    """COCO compressed RLE of ``paste_masks_grid(masks, boxes, image_size, threshold=threshold)``,
    byte-identical to ``pycocotools.mask.encode`` of it, from the detections' windows alone (as
    :func:`paste_masks_to_rle`); with ``return_areas`` also their pixel counts."""
    masks, boxes, (H, W) = _prepare(masks, boxes, image_size)
    N = masks.shape[0]
    found: list[tuple[Tensor, Tensor]] = []
    tile: dict = {}

    def write(det, oy, ox, rows, cols, val, b0, th):
        if b0 == 0:
            tile.update(bits=torch.zeros((len(det), cols.shape[1], th), dtype=torch.bool, device=masks.device))
        tile["bits"][:, :, b0 : b0 + val.shape[1]] = (val >= threshold).transpose(1, 2)
        if b0 + val.shape[1] == th:  # the group's last band
            k, flat = window_transitions(tile.pop("bits"), oy, ox, (H, W))
            found.append((det[k], flat))

    if N:
        _paste_grid_tiles(masks, boxes, (H, W), tile_budget_bytes, write)
    return _rles_of(found, N, (H, W), return_areas)
