"""mrcnn.paste against torchvision's paste_masks_in_image (the reference)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn import paste as paste_mod
from mrcnn.paste import paste_masks, paste_masks_to_rle, rle_area

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_case(g, n, H, W, *, inside=True, tiny=False):
    """Boxes of mixed sizes; with inside=False some stick out of the image."""
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([W, H], dtype=torch.float32)
    if tiny:
        size = torch.rand(n, 2, generator=g) * 3  # 0..3 px, incl. sub-pixel and 1 px boxes
    else:
        size = (torch.rand(n, 2, generator=g) ** 2) * torch.tensor([W, H], dtype=torch.float32) * 1.2 + 0.1
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], 1)
    if inside:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    return masks, boxes


def compare(masks, boxes, H, W):
    ref = paste_masks_in_image(masks, boxes, (H, W), padding=1)
    out = paste_masks(masks, boxes, (H, W))
    assert out.shape == ref.shape == (len(masks), 1, H, W) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-5
    binary = paste_masks(masks, boxes, (H, W), threshold=0.5)
    assert binary.dtype == torch.bool
    # Exact to the pixel: the same pixels, not just "close".
    assert torch.equal(binary, ref > 0.5)
    return int((ref > 0.5).sum()), int(ref.numel())


def test_matches_torchvision_on_many_random_boxes():
    g = torch.Generator().manual_seed(0)
    fg = total = cases = 0
    for H, W in [(64, 96), (150, 110), (241, 187)]:
        for inside in (True, False):
            for tiny in (False, True):
                masks, boxes = random_case(g, 40, H, W, inside=inside, tiny=tiny)
                if not inside:
                    # torchvision's slicing breaks when a box lies entirely off the left/top;
                    # keep these boxes overlapping the image (fully outside is tested below).
                    boxes[:, 2] = boxes[:, 2].clamp(min=1)
                    boxes[:, 3] = boxes[:, 3].clamp(min=1)
                    boxes[:, 0] = boxes[:, 0].clamp(max=W - 1)
                    boxes[:, 1] = boxes[:, 1].clamp(max=H - 1)
                a, b = compare(masks, boxes, H, W)
                fg, total, cases = fg + a, total + b, cases + len(masks)
    assert cases == 480
    # Non-vacuous: many foreground pixels were compared.
    assert fg > 100_000 and total > 3_000_000


def test_both_aten_kernels_are_matched():
    # ATen resizes outputs with h + w <= 128 with another kernel; cover both sides of it.
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(40, 1, 28, 28, generator=g)
    sides = torch.arange(40, dtype=torch.float32) * 3 + 20  # expanded h + w from ~46 to ~290
    boxes = torch.stack([torch.zeros(40), torch.zeros(40), sides, sides * 0.9], 1)
    geo = paste_mod._Geometry(boxes, 28, (300, 300))
    small = (geo.h + geo.w) <= 128
    assert 5 < int(small.sum()) < 35
    compare(masks, boxes, 300, 300)


def test_one_pixel_degenerate_and_large_boxes():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(6, 1, 28, 28, generator=g)
    boxes = torch.tensor(
        [
            [10.0, 10.0, 11.0, 11.0],  # 1 px
            [5.0, 7.0, 5.0, 7.0],  # zero size
            [20.2, 3.7, 20.4, 3.9],  # sub-pixel
            [-30.0, -20.0, 250.0, 190.0],  # larger than the image on every side
            [0.0, 0.0, 160.0, 120.0],  # the whole image
            [150.0, 100.0, 170.0, 130.0],  # off the bottom-right corner
        ]
    )
    compare(masks, boxes, 120, 160)


def test_large_image():
    g = torch.Generator().manual_seed(3)
    masks, boxes = random_case(g, 4, 1100, 1500)
    fg, _ = compare(masks, boxes, 1100, 1500)
    assert fg > 10_000


def test_boxes_fully_outside_give_empty_masks():
    masks = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    boxes = torch.tensor([[-50.0, 5, -10, 20], [5, -40, 20, -8], [200, 5, 230, 20], [5, 130, 20, 160]])
    out = paste_masks(masks, boxes, (100, 150))
    assert out.shape == (4, 1, 100, 150) and not out.any()
    assert not paste_masks(masks, boxes, (100, 150), threshold=0.5).any()


def test_mask_shapes_and_empty_input():
    g = torch.Generator().manual_seed(5)
    masks, boxes = random_case(g, 5, 50, 60)
    assert torch.equal(paste_masks(masks[:, 0], boxes, (50, 60)), paste_masks(masks, boxes, (50, 60)))
    empty = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (50, 60), threshold=0.5)
    assert empty.shape == (0, 1, 50, 60) and empty.dtype == torch.bool
    assert paste_masks_to_rle(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (50, 60)) == []


@pytest.mark.parametrize(
    "masks, boxes, size, match",
    [
        (torch.zeros(2, 3, 28, 28), torch.zeros(2, 4), (10, 10), "masks must be"),
        (torch.zeros(2, 28, 14), torch.zeros(2, 4), (10, 10), "square"),
        (torch.zeros(2, 1, 28, 28), torch.zeros(3, 4), (10, 10), "boxes must be N x 4"),
        (torch.zeros(2, 1, 28, 28), torch.zeros(2, 4), (0, 10), "positive"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, 4), (10, 10), "float"),
    ],
)
def test_bad_input_is_rejected(masks, boxes, size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        paste_masks(masks, boxes, size)


def test_no_python_loop_over_masks(monkeypatch):
    """The number of tile steps does not grow with N while the work fits the budget."""
    calls = []
    original = paste_mod._paste_group

    def counting(*args, **kwargs):
        calls.append(args[3].numel())  # detections in this step
        return original(*args, **kwargs)

    monkeypatch.setattr(paste_mod, "_paste_group", counting)
    interpolate_calls = []
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: interpolate_calls.append(1))
    g = torch.Generator().manual_seed(6)
    steps = {}
    for n in (3, 300):
        masks, boxes = random_case(g, n, 80, 100, tiny=False)
        boxes[:, 2:] = boxes[:, :2] + 40  # expanded h + w > 128: the separable kernel
        calls.clear()
        paste_masks(masks, boxes, (80, 100), threshold=0.5)
        steps[n] = list(calls)
    assert steps[3] == [3] and steps[300] == [300]
    assert interpolate_calls == []


def test_memory_is_bounded_by_the_tile_budget(monkeypatch):
    """With a small budget, no step plans more than the budget and no tensor is N x H x W float."""
    N, H, W = 40, 180, 240
    budget = 1 * 2**20
    g = torch.Generator().manual_seed(7)
    masks, boxes = random_case(g, N, H, W)
    boxes[:3] = torch.tensor([0.0, 0.0, W, H])  # a few whole-image boxes: one det alone exceeds the budget
    planned = []
    original = paste_mod.plan_tiles

    def recording(hc, wc, budget_elems):
        groups = original(hc, wc, budget_elems)
        planned.extend((len(idx), tb, tw, budget_elems) for idx, th, tw, tb in groups)
        return groups

    monkeypatch.setattr(paste_mod, "plan_tiles", recording)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = paste_masks(masks, boxes, (H, W), threshold=0.5, tile_budget_bytes=budget)
    assert len(planned) > 3  # several steps were needed
    assert all(k * tb * tw <= limit for k, tb, tw, limit in planned)
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    # The bool output (N*H*W bytes) is the largest allocation; nothing approaches N*H*W floats.
    assert largest <= N * H * W
    assert largest < N * H * W * 4 / 3
    ref = paste_masks_in_image(masks, boxes, (H, W), padding=1) > 0.5
    assert torch.equal(out, ref)


def test_rle_decodes_to_the_bool_masks():
    from pycocotools import mask as mask_util

    g = torch.Generator().manual_seed(8)
    H, W = 90, 130
    masks, boxes = random_case(g, 25, H, W)
    expected = paste_masks_in_image(masks, boxes, (H, W), padding=1)[:, 0] > 0.5
    rles = paste_masks_to_rle(masks, boxes, (H, W))
    assert len(rles) == 25
    assert all(r["size"] == [H, W] and isinstance(r["counts"], str) for r in rles)
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert decoded.shape == (H, W, 25)
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), expected.numpy())
    assert int(expected.sum()) > 1000
    assert np.array_equal(rle_area(rles), expected.sum((1, 2)).numpy())
    assert rle_area(rles).dtype == np.int64


def test_default_cpu_kernel_without_fma():
    """ATen's DEFAULT (no-FMA) CPU build is matched too (child process with that build)."""
    code = (
        "import torch\n"
        "from torchvision.models.detection.roi_heads import paste_masks_in_image\n"
        "from pycocotools import mask as mask_util\n"
        "from mrcnn.paste import paste_masks, paste_masks_to_rle\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "g = torch.Generator().manual_seed(9)\n"
        "m = torch.rand(40, 1, 28, 28, generator=g)\n"
        "m[20:] = 0.5 + (m[20:] - 0.5) * 1e-5  # near the threshold: one rounding more or less shows\n"
        "c = torch.rand(40, 2, generator=g) * 150; s = torch.rand(40, 2, generator=g) * 120 + 1\n"
        "b = torch.cat([c - s / 2, c + s / 2], 1).clamp(0, 150)\n"
        "ref = paste_masks_in_image(m, b, (150, 150), padding=1)\n"
        "assert torch.equal(paste_masks(m, b, (150, 150)), ref)\n"
        "assert torch.equal(paste_masks(m, b, (150, 150), threshold=0.5), ref > 0.5)\n"
        "dense = (ref[:, 0] > 0.5).permute(1, 2, 0).numpy().astype('uint8')\n"
        "want = [r['counts'].decode() for r in mask_util.encode(dense.copy(order='F'))]\n"
        "assert [r['counts'] for r in paste_masks_to_rle(m, b, (150, 150))] == want  # the C++ kernel\n"
        "print('ok', int((ref > 0.5).sum()))\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 10_000
