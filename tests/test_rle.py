"""Box-local COCO RLE (paste_masks_to_rle: the C++ kernel on CPU, the tile path elsewhere, and
mrcnn.rle) against pycocotools on full-size masks."""

import sys
from collections import Counter

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torch.utils._python_dispatch import TorchDispatchMode

from mrcnn import paste as paste_mod
from mrcnn.paste import paste_masks, paste_masks_to_rle, rle_area
from mrcnn.rle import rle_from_transitions, window_transitions

# "kernel": CPU tensors, the C++ op; "tiles": the tile path GPU tensors take, run here on the CPU.
PATHS = ["kernel", "tiles"] + (["cuda"] if torch.cuda.is_available() else [])


def encode(path, masks, boxes, H, W, threshold=0.5):
    if path == "tiles":
        m, b, size = paste_mod._prepare(masks, boxes, (H, W))
        return paste_mod._paste_rle_tiles(m, b, size, threshold, paste_mod.DEFAULT_TILE_BUDGET_BYTES)
    device = "cuda" if path == "cuda" else "cpu"
    return paste_masks_to_rle(masks.to(device), boxes.to(device), (H, W), threshold=threshold)


def reference(masks, boxes, H, W, threshold=0.5):
    """pycocotools.encode of today's dense paste (torchvision's paste > threshold)."""
    dense = paste_masks(masks, boxes, (H, W), threshold=threshold)[:, 0].cpu().numpy()
    if len(dense) == 0:
        return []
    return mask_util.encode(np.asfortranarray(dense.transpose(1, 2, 0).astype(np.uint8)))


def assert_identical(masks, boxes, H, W, path="kernel", threshold=0.5):
    ref = reference(masks, boxes, H, W, threshold)
    got = encode(path, masks, boxes, H, W, threshold)
    assert len(got) == len(ref) == len(masks)
    for g, r in zip(got, ref):
        assert g["size"] == [H, W] == [int(v) for v in r["size"]]
        assert g["counts"].encode("ascii") == r["counts"]  # byte for byte
    return ref


def boxes_around(g, n, H, W, spread=1.4):
    """Boxes of every kind: inside, past every edge, sub-pixel, whole-image."""
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * spread - torch.tensor([W, H]) * (spread - 1) / 2
    kind = torch.randint(0, 4, (n,), generator=g)
    size = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * 0.6 + 0.05
    size[kind == 0] = torch.rand(int((kind == 0).sum()), 2, generator=g) * 2  # 0-2 px, incl. below one pixel
    size[kind == 3] = torch.tensor([W, H], dtype=torch.float32) * 1.5  # covers the whole image
    return torch.cat([ctr - size / 2, ctr + size / 2], 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("H,W", [(1, 1), (1, 37), (29, 1), (2, 3), (48, 64), (97, 131), (240, 320)])
def test_byte_identical_on_random_cases(path, H, W):
    g = torch.Generator().manual_seed(H * 1000 + W)
    compared = 0
    for trial in range(6):
        n = int(torch.randint(1, 30, (1,), generator=g))
        masks = torch.rand(n, 1, 28, 28, generator=g)
        masks[: n // 5] = 1.0  # full masks: set over the whole (clipped) box
        masks[n // 5 : n // 4] = 0.0  # empty masks
        compared += len(assert_identical(masks, boxes_around(g, n, H, W), H, W, path))
    assert compared >= 6


@pytest.mark.parametrize("path", PATHS)
def test_other_thresholds_and_mask_sizes(path):
    g = torch.Generator().manual_seed(11)
    H, W = 61, 83
    compared = 0
    for M in (1, 2, 14, 56):
        for threshold in (0.0, 0.3, 0.9):
            masks = torch.rand(12, 1, M, M, generator=g)
            compared += len(assert_identical(masks, boxes_around(g, 12, H, W), H, W, path, threshold))
    assert compared == 4 * 3 * 12


@pytest.mark.parametrize("path", PATHS)
def test_values_at_the_threshold_round_like_aten(path):
    # Masks within 1e-5 of 0.5: one rounding more or less in the bilinear sums flips pixels.
    g = torch.Generator().manual_seed(13)
    H, W = 90, 120
    masks = 0.5 + (torch.rand(60, 1, 28, 28, generator=g) - 0.5) * 1e-5
    ref = assert_identical(masks, boxes_around(g, 60, H, W), H, W, path)
    assert len(ref) == 60 and mask_util.area(ref).sum() > 10_000


@pytest.mark.parametrize("path", PATHS)
def test_edges_full_and_empty(path):
    H, W = 50, 70
    full = torch.ones(8, 1, 28, 28)
    boxes = torch.tensor([
        [0.0, 0.0, 70.0, 50.0],    # the whole image: mask set everywhere
        [-30.0, -30.0, 200, 200],  # past every edge
        [0.0, 10.0, 5.0, 20.0],    # first column
        [65.0, 10.0, 70.0, 20.0],  # last column
        [10.0, 0.0, 20.0, 3.0],    # first row
        [10.0, 47.0, 20.0, 50.0],  # last row
        [0.0, 0.0, 70.0, 3.0],     # full-width strip at the top: contiguous runs across columns
        [30.2, 30.2, 30.4, 30.4],  # smaller than a pixel
    ])
    ref = assert_identical(full, boxes, H, W, path)
    # the paste's zero padding fades the box's own border, so only a box well past the image fills it
    assert 0.9 * H * W < mask_util.area(ref[0]) < H * W and mask_util.area(ref[1]) == H * W
    assert_identical(torch.zeros(8, 1, 28, 28), boxes, H, W, path)  # all empty
    assert paste_masks_to_rle(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (H, W)) == []  # N = 0
    rles, areas = paste_masks_to_rle(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (H, W), return_areas=True)
    assert rles == [] and areas.shape == (0,) and areas.dtype == np.int64


def test_areas_come_with_the_strings():
    g = torch.Generator().manual_seed(12)
    H, W = 120, 90
    masks = torch.rand(40, 1, 28, 28, generator=g)
    rles, areas = paste_masks_to_rle(masks, boxes_around(g, 40, H, W), (H, W), return_areas=True)
    assert areas.dtype == np.int64 and len(areas) == len(rles) == 40
    assert np.array_equal(areas, rle_area(rles)) and areas.sum() > 1000


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e9])
def test_boxes_that_are_not_pixel_coordinates_are_refused(bad):
    boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]])
    boxes[1, 2] = bad
    with pytest.raises(ValueError, match="box 1 has coordinate"):
        paste_masks_to_rle(torch.rand(2, 1, 28, 28), boxes, (20, 20))


@pytest.mark.parametrize("path", PATHS)
def test_large_image_without_full_size_buffers(monkeypatch, path):
    H, W = 3024, 4032  # a phone photo
    g = torch.Generator().manual_seed(3)
    n = 40
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
    size = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * 0.25 + 1
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], 1)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    biggest = []
    original = torch.zeros

    def recording_zeros(*shape, **kw):
        t = original(*shape, **kw)
        biggest.append(t.numel())
        return t

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    got = encode(path, masks, boxes, H, W)
    monkeypatch.undo()
    # box tiles only, never a full-size mask (the C++ kernel makes no tensor at all)
    assert max(biggest, default=0) < H * W // 4 and (biggest or path == "kernel")
    ref = reference(masks, boxes, H, W)
    assert [r["counts"] for r in got] == [r["counts"].decode() for r in ref] and len(got) == n


def test_transitions_against_brute_force():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(200):
        H, W = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        th, tw = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
        K = int(rng.integers(1, 4))
        oy, ox = rng.integers(0, H - th + 1, K), rng.integers(0, W - tw + 1, K)
        bits = rng.random((K, tw, th)) < rng.random()
        det, flat = window_transitions(torch.from_numpy(bits), torch.from_numpy(oy), torch.from_numpy(ox), (H, W))
        rles = rle_from_transitions(det.numpy(), flat.numpy(), K, (H, W))
        for k in range(K):
            full = np.zeros((H, W), np.uint8)
            full[oy[k] : oy[k] + th, ox[k] : ox[k] + tw] = bits[k].T
            seq = np.concatenate(([0], full.T.reshape(-1)))
            expected = np.flatnonzero(seq[1:] != seq[:-1])
            assert np.array_equal(flat.numpy()[det.numpy() == k], expected)
            assert rles[k]["counts"].encode() == mask_util.encode(np.asfortranarray(full))["counts"]
            compared += 1
    assert compared >= 200


def test_counts_beyond_32_bits_read_back_by_pycocotools():
    # 2.8e9 pixels: run lengths past 2**31. pycocotools reads the string back without decoding a mask.
    H, W = 70_000, 40_000
    y, x = H - 5, W - 1
    det, flat = np.array([0, 0]), np.array([x * H + y, x * H + y + 1])
    rle = rle_from_transitions(det, flat, 1, (H, W))[0]
    coco = {"size": [H, W], "counts": rle["counts"].encode()}
    assert mask_util.area(coco) == 1
    assert mask_util.toBbox(coco).tolist() == [x, y, 1, 1]


def test_tile_path_areas_need_no_pycocotools(monkeypatch):
    """The tile path (what GPU tensors take; forced here on CPU tensors) returns the C++ kernel's
    strings and areas, equal to pycocotools' area of its encoding, with pycocotools unimportable."""
    g = torch.Generator().manual_seed(14)
    compared = set_pixels = 0
    for (H, W), budget in [((1, 1), None), ((29, 1), None), ((50, 70), None), ((97, 131), None), ((240, 320), 200_000)]:
        n = 30
        masks = torch.rand(n, 1, 28, 28, generator=g)
        masks[:5], masks[5:8] = 1.0, 0.0  # full and empty masks
        boxes = boxes_around(g, n, H, W)
        want_rles, want_areas = paste_masks_to_rle(masks, boxes, (H, W), return_areas=True)  # the C++ kernel
        ref = reference(masks, boxes, H, W)
        dense = paste_masks(masks, boxes, (H, W), threshold=0.5)[:, 0]
        kw = {} if budget is None else {"tile_budget_bytes": budget}  # a small budget: several row bands
        with monkeypatch.context() as m:
            m.setattr(paste_mod, "_uses_cpu_kernel", lambda device: False)
            m.setattr(paste_mod, "_paste_rle_cpu", None)  # the C++ kernel's wrapper cannot be taken
            m.setitem(sys.modules, "pycocotools", None)  # import pycocotools raises ImportError
            m.setitem(sys.modules, "pycocotools.mask", None)
            with pytest.raises(ImportError):
                from pycocotools import mask  # noqa: F401  (the block holds)
            rles, areas = paste_masks_to_rle(masks, boxes, (H, W), return_areas=True, **kw)
        assert rles == want_rles and [r["counts"].encode() for r in rles] == [r["counts"] for r in ref]
        assert areas.dtype == np.int64 and areas.shape == (n,)
        assert np.array_equal(areas, want_areas)
        assert np.array_equal(areas, mask_util.area(ref)) and np.array_equal(areas, dense.sum((1, 2)).numpy())
        compared += len(areas)
        set_pixels += int(areas.sum())
    assert compared == 150 and set_pixels > 20_000


def test_areas_from_transitions_against_brute_force():
    rng = np.random.default_rng(1)
    compared = 0
    for _ in range(100):
        H, W = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        th, tw, K = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1)), int(rng.integers(1, 4))
        oy, ox = rng.integers(0, H - th + 1, K), rng.integers(0, W - tw + 1, K)
        bits = rng.random((K, tw, th)) < rng.random()
        det, flat = window_transitions(torch.from_numpy(bits), torch.from_numpy(oy), torch.from_numpy(ox), (H, W))
        rles, areas = rle_from_transitions(det.numpy(), flat.numpy(), K, (H, W), return_areas=True)
        assert rles == rle_from_transitions(det.numpy(), flat.numpy(), K, (H, W))
        assert areas.dtype == np.int64 and areas.tolist() == bits.sum((1, 2)).tolist()
        compared += K
    assert compared >= 100
    rles, areas = rle_from_transitions(np.zeros(0), np.zeros(0), 0, (3, 4), return_areas=True)
    assert rles == [] and areas.shape == (0,) and areas.dtype == np.int64


class _HostReads(TorchDispatchMode):
    """Counts the ops that, on a GPU, make the host wait for the device (or copy host data)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["value read back"] += 1  # int(t), t.item()
        elif func is torch.ops.aten.lift_fresh.default:
            self.counts["tensor from host data"] += 1  # torch.tensor / as_tensor: a copy to the device
        elif func is torch.ops.aten.nonzero.default:
            self.counts["nonzero"] += 1
        elif func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.counts["boolean index"] += 1  # a nonzero inside
        return func(*args, **(kwargs or {}))


def test_tile_path_waits_for_the_device_once_per_group_not_per_band(monkeypatch):
    """On CPU tensors, the ops that would be host syncs on a GPU: no value read back per row band,
    no constants made from host data, one copy of indices to the device, two copies to the host,
    one nonzero per group of tiles (the transitions' count)."""
    g = torch.Generator().manual_seed(15)
    H, W, n = 300, 400, 40
    masks = torch.rand(n, 1, 28, 28, generator=g)
    boxes = boxes_around(g, n, H, W)
    boxes[:3] = torch.tensor([0.0, 0.0, W, H])  # whole-image boxes: one alone exceeds the budget, row bands
    bands, groups, to_host = [], [], []
    original_group, original_cpu = paste_mod._paste_group, torch.Tensor.cpu

    def counting_group(padded, geo, image_size, det, th, tw, tb, *args):
        groups.append(1)
        bands.append(-(-th // tb))
        return original_group(padded, geo, image_size, det, th, tw, tb, *args)

    def counting_cpu(self, *args, **kwargs):
        to_host.append(tuple(self.shape))
        return original_cpu(self, *args, **kwargs)

    m, b, size = paste_mod._prepare(masks, boxes, (H, W))
    monkeypatch.setattr(paste_mod, "_paste_group", counting_group)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    with _HostReads() as reads:
        rles, areas = paste_mod._paste_rle_tiles(m, b, size, 0.5, 400_000, return_areas=True)
    monkeypatch.undo()
    assert sum(bands) > len(groups) > 2  # several groups, some of several bands
    assert reads.counts == Counter({"nonzero": len(groups), "tensor from host data": 1}), reads.counts
    assert len(to_host) == 2, to_host
    want_rles, want_areas = paste_masks_to_rle(masks, boxes, (H, W), return_areas=True)
    assert rles == want_rles and np.array_equal(areas, want_areas) and areas.sum() > 10_000
