"""Shared helpers for the RoIAlign tests: seeded random cases and counted comparisons.

Imports only torch and torchvision, so the tests that use it run on machines that have
neither Ray nor pycocotools (the lent GPU machine).
"""

import math
import random

import torch
import torchvision

# Tolerances against torchvision. fp32/fp64 compute the same sums as torchvision, so only
# rounding differences are allowed; fp16/bf16 are compared with the fp32 result on the
# upcast input, and may differ from it by the final rounding to the reduced type (one ulp).
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2.0**-10, atol=1e-4),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-4),
}


SAMPLING_RATIOS = [-1, 0, 1, 2, 3]
SPATIAL_SCALES = [1.0, 0.5, 0.25, 0.125, 1.0 / 3.0]


def assert_close_counted(actual, expected, *, rtol, atol, what=""):
    """assert_close that also checks shape and dtype and returns how many elements were compared."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{what}\n{m}"
    )
    return expected.numel()


def random_rois(gen, *, n_images, height, width, k, spatial_scale, dtype=torch.float32, spill=0.25):
    """Tensor[K, 5] of boxes in image coordinates (feature size / spatial_scale).

    Boxes are mostly inside the image; ``spill`` of the image size lets some stick out on any
    side, so partly-outside RoIs are always part of the mix. Sizes range from under one
    feature pixel to the whole map.
    """
    img_h, img_w = height / spatial_scale, width / spatial_scale
    batch = torch.randint(0, n_images, (k,), generator=gen).to(torch.float64)
    # log-uniform sizes from a tenth of a feature pixel to the whole image
    lo = math.log(0.1 / spatial_scale)
    sw = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(lo, math.log(img_w * 1.1), generator=gen))
    sh = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(lo, math.log(img_h * 1.1), generator=gen))
    x0 = torch.empty(k, dtype=torch.float64).uniform_(-spill * img_w, img_w * (1 + spill), generator=gen) - sw / 2
    y0 = torch.empty(k, dtype=torch.float64).uniform_(-spill * img_h, img_h * (1 + spill), generator=gen) - sh / 2
    rois = torch.stack([batch, x0, y0, x0 + sw, y0 + sh], dim=1)
    return rois.to(dtype)


def rois_to_list(rois, n_images):
    """The same boxes as a list of Tensor[L_i, 4], one per image (possibly empty)."""
    idx = rois[:, 0].long()
    return [rois[idx == i, 1:].clone() for i in range(n_images)]


def tv_roi_align(x, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    return torchvision.ops.roi_align(
        x, boxes, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned
    )


def fpn_level(boxes_list, k_min, k_max, canonical_scale=224, canonical_level=4):
    """FPN level index (0-based, into the pooled feature list) of every box, as torchvision maps it.

    Computed from the formula in the FPN paper (eq. 1) exactly as torchvision's LevelMapper does;
    the tests cross-check it against torchvision's own mapper.
    """
    boxes = torch.cat(boxes_list)
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(1e-6, dtype=s.dtype))
    return (lvl.clamp(k_min, k_max).to(torch.int64) - k_min)


def fpn_features(gen, *, n_images, image_shapes, channels, names, dtype, strides=None, device="cpu"):
    """An ordered dict of FPN-like feature maps for a padded batch of images.

    The batch is padded to a multiple of 32 like torchvision's GeneralizedRCNNTransform; level
    '<i>' has stride 4 * 2**i, 'pool' has stride 64.
    """
    max_h = max(h for h, _ in image_shapes)
    max_w = max(w for _, w in image_shapes)
    pad_h, pad_w = -(-max_h // 32) * 32, -(-max_w // 32) * 32
    feats = {}
    for name in names:
        stride = 64 if name == "pool" else 4 * 2 ** int(name)
        if strides is not None:
            stride = strides[name]
        shape = (n_images, channels, max(pad_h // stride, 1), max(pad_w // stride, 1))
        feats[name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return feats


def boxes_all_scales(gen, image_shapes, per_image, sizes, dtype):
    """Per-image boxes whose sqrt(area) is drawn around each of ``sizes`` in turn (so every FPN
    level gets RoIs), placed at random, mostly inside the image."""
    out = []
    for h, w in image_shapes:
        n = per_image
        target = torch.tensor([sizes[i % len(sizes)] for i in range(n)], dtype=torch.float64)
        aspect = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen))
        jitter = torch.empty(n, dtype=torch.float64).uniform_(0.8, 1.2, generator=gen)
        bw = (target * jitter * aspect).clamp(max=w * 1.2)
        bh = (target * jitter / aspect).clamp(max=h * 1.2)
        x0 = torch.rand(n, generator=gen, dtype=torch.float64) * (w - bw).clamp(min=1) - 0.1 * bw
        y0 = torch.rand(n, generator=gen, dtype=torch.float64) * (h - bh).clamp(min=1) - 0.1 * bh
        out.append(torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).to(dtype))
    return out


def random_case(seed):
    """A seeded random roi_align call: shapes, arguments, features and RoIs (fp64, to be cast)."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, c = rnd.randint(1, 3), rnd.randint(1, 4)
    h, w = rnd.choice([1, 2, 5, 9, 16, 23]), rnd.choice([1, 3, 7, 12, 20, 31])
    k = rnd.choice([1, 3, 6, 10, 14])
    ph, pw = rnd.randint(1, 7), rnd.randint(1, 7)
    scale = rnd.choice(SPATIAL_SCALES)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    rois = random_rois(gen, n_images=n, height=h, width=w, k=k, spatial_scale=scale, dtype=torch.float64)
    output_size = ph if ph == pw and rnd.random() < 0.5 else (ph, pw)
    return x, rois, output_size, scale


def edge_rois(h, w, scale, dtype):
    """Hand-picked RoIs (image coordinates) for a map of h x w at ``scale``."""
    H, W = h / scale, w / scale
    px = 1 / scale  # one feature-map pixel, in image coordinates
    return torch.tensor(
        [
            [0, -0.3 * W, -0.2 * H, 0.4 * W, 0.5 * H],  # partly outside, top-left
            [0, 0.6 * W, 0.7 * H, 1.5 * W, 1.4 * H],  # partly outside, bottom-right
            [0, -0.5 * W, 0.1 * H, 1.5 * W, 0.9 * H],  # wider than the map
            [0, W + 3 * px, H + 2 * px, 1.9 * W + 4 * px, 2.0 * H + 3 * px],  # fully outside, past the far edge
            [0, -3.0 * W - 5 * px, -2.0 * H - 4 * px, -3 * px, -2.5 * px],  # fully outside, before the origin
            [0, 0.3 * W, 0.4 * H, 0.3 * W, 0.8 * H],  # zero width
            [0, 0.2 * W, 0.5 * H, 0.7 * W, 0.5 * H],  # zero height
            [0, 0.45 * W, 0.55 * H, 0.45 * W, 0.55 * H],  # a point
            [0, 0.8 * W, 0.3 * H, 0.2 * W, 0.9 * H],  # inverted x
            [0, 0.1 * W, 0.9 * H, 0.6 * W, 0.2 * H],  # inverted y
            [0, 0.7 * W, 0.8 * H, 0.1 * W, 0.1 * H],  # inverted both
            [0, 0.0, 0.0, W, H],  # exactly the map
        ],
        dtype=dtype,
    )


def strided_views(x, gen):
    """Views with the values of ``x`` and unusual strides."""
    n, c, h, w = x.shape
    big = torch.randn(n, 2 * c, h + 3, w + 4, generator=gen, dtype=x.dtype).to(x.device)
    big[:, ::2, 1 : h + 1, 2 : w + 2] = x
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": transposed,
        "sliced": big[:, ::2, 1 : h + 1, 2 : w + 2],
        "batch_expanded": x[:1].expand(n, c, h, w),
    }
