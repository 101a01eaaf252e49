"""mrcnn.ops.MultiScaleRoIAlign on CPU: same results and gradients as
torchvision.ops.MultiScaleRoIAlign on FPN-like features, every level actually used, and all
levels pooled by ONE call of torch.ops.mrcnn.multilevel_roi_align (no per-level loop, never
torchvision's roi_align).
"""

import math
from unittest import mock

import pytest
import torch
import torch.utils._pytree as pytree
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import mrcnn.ops
from _roi_reference import TOLERANCES, assert_close_counted, boxes_all_scales, fpn_features, fpn_level, tv_roi_align

ALL_KEYS = ["0", "1", "2", "3", "pool"]
SMALL = [(128, 160), (96, 128), (120, 90)]

# name: (featmap_names, feature dict keys, image sizes, canonical_scale, canonical_level, box sizes)
# Box sizes (sqrt of area) are picked so that every pooled level gets RoIs.
CONFIGS = {
    "1level": (["0"], ALL_KEYS, [(96, 128), (128, 100)], 224, 4, [8, 30, 90]),
    "2levels": (["0", "1"], ALL_KEYS, SMALL, 56, 4, [14, 40, 80]),
    "3levels_from_1": (["1", "2", "3"], ["0", "1", "2", "3"], SMALL, 56, 4, [30, 80, 140]),
    "4levels_default_canonical": (["0", "1", "2", "3"], ALL_KEYS, [(480, 512), (512, 448)], 224, 4,
                                  [40, 160, 300, 600]),
    "4levels_small": (["0", "1", "2", "3"], ALL_KEYS, SMALL, 56, 4, [14, 40, 80, 140]),
    "4levels_level3": (["0", "1", "2", "3"], ["0", "1", "2", "3"], SMALL, 28, 3, [14, 40, 80, 140]),
    "5levels_pool_named": (ALL_KEYS, ALL_KEYS, [(128, 160), (100, 128)], 28, 4, [8, 20, 40, 80, 150]),
}


def _make(config, dtype, seed, channels=3, per_image=10):
    names, keys, shapes, cscale, clevel, sizes = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    feats = fpn_features(gen, n_images=len(shapes), image_shapes=shapes, channels=channels, names=keys, dtype=dtype)
    boxes = boxes_all_scales(gen, shapes, per_image, sizes, dtype)
    return names, feats, boxes, shapes, dict(canonical_scale=cscale, canonical_level=clevel)


def _pools(names, output_size, sampling_ratio, kw):
    return (mrcnn.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio, **kw),
            torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio, **kw))


def _assert_every_level_used(theirs, ours, boxes, n_levels, kw):
    """Every pooled level gets at least one RoI (by the FPN formula, cross-checked with both mappers)."""
    if n_levels == 1:
        return
    k_min, k_max = round(-math.log2(theirs.scales[0])), round(-math.log2(theirs.scales[-1]))
    levels = fpn_level(boxes, k_min, k_max, kw["canonical_scale"], kw["canonical_level"])
    assert torch.equal(levels, theirs.map_levels(boxes))
    assert torch.equal(levels, ours.map_levels(boxes))
    counts = torch.bincount(levels, minlength=n_levels)
    assert len(counts) == n_levels and bool((counts > 0).all()), f"RoIs per level: {counts.tolist()}"


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), ((5, 3), -1), ((14, 14), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torchvision(config, dtype, output_size, sampling_ratio):
    names, feats, boxes, shapes, kw = _make(config, dtype, seed=len(config))
    ours, theirs = _pools(names, output_size, sampling_ratio, kw)
    out, ref = ours(feats, boxes, shapes), theirs(feats, boxes, shapes)
    assert ours.scales == theirs.scales
    k = sum(len(b) for b in boxes)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    n = assert_close_counted(out, ref, what=config, **TOLERANCES[dtype])
    assert n == k * 3 * ph * pw and k == 10 * len(shapes)
    assert int((ref != 0).sum()) > n // 2  # real values, not an all-zero comparison
    _assert_every_level_used(theirs, ours, boxes, len(names), kw)


def test_unnamed_pool_level_is_ignored():
    names, feats, boxes, shapes, kw = _make("4levels_small", torch.float32, seed=1)
    pool = mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw)
    out = pool(feats, boxes, shapes)
    feats_nan_pool = dict(feats, pool=torch.full_like(feats["pool"], float("nan")))
    assert torch.equal(pool(feats_nan_pool, boxes, shapes), out)
    assert out.numel() > 0 and bool(torch.isfinite(out).all())


def test_module_reused_across_batches_matches_torchvision():
    # Both modules infer level scales on their first call; later batches of other sizes reuse them.
    ours, theirs = _pools(["0", "1", "2", "3"], 7, 2, dict(canonical_scale=56))
    compared = 0
    for seed, shapes in enumerate([[(128, 160), (96, 128)], [(100, 100)], [(128, 128), (64, 96), (120, 70)]]):
        gen = torch.Generator().manual_seed(seed)
        feats = fpn_features(gen, n_images=len(shapes), image_shapes=shapes, channels=2, names=ALL_KEYS,
                             dtype=torch.float32)
        boxes = boxes_all_scales(gen, shapes, 6, [14, 40, 80, 140], torch.float32)
        compared += assert_close_counted(ours(feats, boxes, shapes), theirs(feats, boxes, shapes),
                                         **TOLERANCES[torch.float32])
    assert compared == (2 + 1 + 3) * 6 * 2 * 49


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ["2levels", "4levels_small", "5levels_pool_named"])
def test_feature_grads_match_torchvision(config, dtype):
    names, feats, boxes, shapes, kw = _make(config, dtype, seed=20)
    ours, theirs = _pools(names, (5, 4), 2, kw)
    f1 = {k: v.clone().requires_grad_() for k, v in feats.items()}
    f2 = {k: v.clone().requires_grad_() for k, v in feats.items()}
    out = ours(f1, boxes, shapes)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (out * weight).sum().backward()
    (theirs(f2, boxes, shapes) * weight).sum().backward()
    compared = 0
    for key in feats:
        if key in names:
            compared += assert_close_counted(f1[key].grad, f2[key].grad, what=key, **TOLERANCES[dtype])
            assert bool((f2[key].grad != 0).any()), f"level {key} got no gradient: test is vacuous"
        else:
            assert f1[key].grad is None and f2[key].grad is None
    assert compared == sum(feats[k].numel() for k in names)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_gradcheck_all_levels(sampling_ratio):
    gen = torch.Generator().manual_seed(30)
    shapes = [(32, 32), (24, 28)]
    names = ["0", "1", "2", "3"]
    # maps of 8x8, 4x4, 2x2 and 1x1; with canonical_scale=8 the levels split at sqrt(area) 4, 8, 16
    feats = fpn_features(gen, n_images=2, image_shapes=shapes, channels=1, names=names, dtype=torch.float64)
    boxes = boxes_all_scales(gen, shapes, 4, [2.5, 6, 12, 22], torch.float64)
    pool = mrcnn.ops.MultiScaleRoIAlign(names, (3, 2), sampling_ratio, canonical_scale=8)
    pool(feats, boxes, shapes)  # infer scales
    levels = pool.map_levels(boxes)
    assert torch.bincount(levels, minlength=4).min() > 0, levels

    def run(*tensors):
        return pool(dict(zip(names, tensors)), boxes, shapes)

    inputs = tuple(feats[k].requires_grad_() for k in names)
    # full Jacobian once; fast mode (random projections; the op is linear in the features, so a wrong
    # gradient shows in any projection) for the adaptive case and for double backward keeps this quick
    assert torch.autograd.gradcheck(run, inputs, fast_mode=sampling_ratio != 2)
    assert torch.autograd.gradgradcheck(run, inputs, fast_mode=True)


# ---------------------------------------------------------------- the fused op itself


def _direct_case(seed, dtype=torch.float32, channels_last=False, k=12):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(24, 30), (12, 15), (6, 8)]
    scales = [0.25, 0.125, 0.0625]
    feats = [torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64).to(dtype) for h, w in sizes]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    xy = torch.rand(k, 2, generator=gen, dtype=torch.float64) * 110 - 5
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * 60 + 0.5
    batch = torch.randint(0, 2, (k, 1), generator=gen).to(torch.float64)
    rois = torch.cat([batch, xy, xy + wh], dim=1).to(dtype)
    levels = torch.randint(0, 3, (k,), generator=gen)
    return feats, rois, levels, scales


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multilevel_op_matches_per_level_torchvision(dtype, aligned, channels_last):
    feats, rois, levels, scales = _direct_case(40, dtype, channels_last)
    assert torch.bincount(levels, minlength=3).min() > 0
    compared = 0
    for sr in (-1, 2):
        out = torch.ops.mrcnn.multilevel_roi_align(feats, rois, levels, scales, 4, 3, sr, aligned)
        assert out.shape == (len(rois), 3, 4, 3) and out.is_contiguous()
        for lvl in range(3):
            idx = levels == lvl
            ref = tv_roi_align(feats[lvl], rois[idx], (4, 3), scales[lvl], sr, aligned)
            compared += assert_close_counted(out[idx], ref, what=f"level {lvl} sr={sr}", **TOLERANCES[dtype])
    assert compared == 2 * len(rois) * 3 * 12


def test_multilevel_backward_op_matches_torchvision():
    feats, rois, levels, scales = _direct_case(41, torch.float64)
    grad = torch.randn(len(rois), 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    heights, widths = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    compared = 0
    for channels_last in (False, True):
        grads = torch.ops.mrcnn.multilevel_roi_align_backward(
            grad, rois, levels, scales, heights, widths, 2, 3, 4, 3, 2, True, channels_last)
        assert len(grads) == 3
        for lvl in range(3):
            idx = levels == lvl
            ref = torch.ops.torchvision._roi_align_backward(
                grad[idx], rois[idx], scales[lvl], 4, 3, 2, 3, heights[lvl], widths[lvl], 2, True)
            compared += assert_close_counted(grads[lvl], ref, **TOLERANCES[torch.float64])
    assert compared == 2 * sum(f.numel() for f in feats)


def test_opcheck_multilevel_roi_align():
    feats, rois, levels, scales = _direct_case(42)
    samples = [
        (feats, rois, levels, scales, 4, 3, 2, False),
        ([f.double().requires_grad_() for f in feats], rois.double(), levels, scales, 3, 3, -1, True),
        ([f.contiguous(memory_format=torch.channels_last).requires_grad_() for f in feats], rois, levels, scales,
         2, 5, 0, False),
        ([f.clone().requires_grad_() for f in feats], rois[:0], levels[:0], scales, 3, 3, 2, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.mrcnn.multilevel_roi_align.default, args)


def test_opcheck_multilevel_roi_align_backward():
    feats, rois, levels, scales = _direct_case(43)
    heights, widths = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    grad = torch.randn(len(rois), 3, 4, 3, generator=torch.Generator().manual_seed(4))
    for channels_last in (False, True):
        for g in (grad, grad.double().requires_grad_()):
            args = (g, rois.to(g.dtype), levels, scales, heights, widths, 2, 3, 4, 3, 2, False, channels_last)
            torch.library.opcheck(torch.ops.mrcnn.multilevel_roi_align_backward.default, args)


def test_multilevel_op_bad_calls():
    feats, rois, levels, scales = _direct_case(44)
    op = torch.ops.mrcnn.multilevel_roi_align
    errors = (RuntimeError, ValueError)
    with pytest.raises(errors, match=r"(?i)(scale|level|feature)"):
        op(feats, rois, levels, scales[:2], 4, 3, 2, False)
    with pytest.raises(errors, match=r"(?i)(level|shape|size|\[K\])"):
        op(feats, rois, levels[:-1], scales, 4, 3, 2, False)
    for bad_level in (3, -1):  # a level with no feature map: an error, not a read out of bounds
        lv = levels.clone()
        lv[0] = bad_level
        with pytest.raises(errors, match=r"(?i)level"):
            op(feats, rois, lv, scales, 4, 3, 2, False)
    with pytest.raises(errors, match=r"(?i)(int64|long|dtype|type)"):
        op(feats, rois, levels.int(), scales, 4, 3, 2, False)
    with pytest.raises(errors, match=r"(?i)(channel|shape|batch)"):
        op([feats[0], feats[1][:, :2]], rois, levels.clamp(max=1), scales[:2], 4, 3, 2, False)
    with pytest.raises(errors, match=r"(?i)(dtype|type)"):
        op([feats[0], feats[1].double()], rois, levels.clamp(max=1), scales[:2], 4, 3, 2, False)
    bad_rois = rois.clone()
    bad_rois[0, 0] = 2  # batch of 2 images
    with pytest.raises(errors, match=r"(?i)batch.?(index|idx|ind)"):
        op(feats, bad_rois, levels, scales, 4, 3, 2, False)
    bad_rois = rois.clone()
    bad_rois[0, 2] = float("nan")
    with pytest.raises(errors, match=r"(?i)(finite|nan)"):
        op(feats, bad_rois, levels, scales, 4, 3, 2, False)


def test_module_bad_calls():
    names, feats, boxes, shapes, kw = _make("4levels_small", torch.float32, seed=45)
    with pytest.raises(ValueError, match=r"(?i)image"):
        mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw)(feats, boxes, [])
    with pytest.raises(ValueError, match=r"(?i)(feature|featmap|name)"):
        mrcnn.ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2, **kw)(feats, boxes, shapes)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)(boxes|rois)"):
        mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw)(feats, [torch.cat([b, b[:, :1]], 1) for b in boxes], shapes)


# ---------------------------------------------------------------- one fused call, no per-level loop


class _OpLog(TorchDispatchMode):
    """Records every op dispatched, and whether it read one of the ``watched`` tensors' storage."""

    def __init__(self, watched):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        touches = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages for a in leaves)
        self.calls.append((func._schema.name, touches))
        return func(*args, **kwargs)


def test_one_fused_call_per_forward_and_no_per_level_work():
    names, feats, boxes, shapes, kw = _make("4levels_small", torch.float32, seed=50)
    four = mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw)
    two = mrcnn.ops.MultiScaleRoIAlign(names[:2], 7, 2, **kw)
    fused = torch.ops.mrcnn.multilevel_roi_align
    single = torch.ops.mrcnn.roi_align
    op_names = {}
    for label, pool in (("four", four), ("two", two)):
        pool(feats, boxes, shapes)  # first call infers the level scales
        with mock.patch.object(torch.ops.mrcnn, "multilevel_roi_align", wraps=fused) as fused_spy, \
                mock.patch.object(torch.ops.mrcnn, "roi_align", wraps=single) as single_spy, \
                mock.patch("torchvision.ops.roi_align", side_effect=AssertionError("torchvision used")) as tv1, \
                mock.patch("torchvision.ops.poolers.roi_align", side_effect=AssertionError("torchvision used")) as tv2:
            for _ in range(2):
                with _OpLog(feats.values()) as log:
                    out = pool(feats, boxes, shapes)
                # the only op that reads the feature maps is the fused one, called once
                readers = [name for name, touches in log.calls if touches]
                assert readers == ["mrcnn::multilevel_roi_align"], readers
                assert not any(name.startswith("torchvision::") for name, _ in log.calls)
                assert out.shape == (sum(len(b) for b in boxes), 3, 7, 7)
            assert fused_spy.call_count == 2 and single_spy.call_count == 0
            assert tv1.call_count == 0 and tv2.call_count == 0
        op_names[label] = [name for name, _ in log.calls]
    # the ops dispatched do not grow with the number of levels: no loop over levels
    assert op_names["four"] == op_names["two"], op_names


def test_backward_is_one_fused_call():
    names, feats, boxes, shapes, kw = _make("4levels_small", torch.float32, seed=51)
    pool = mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw)
    f = {k: v.clone().requires_grad_() for k, v in feats.items()}
    out = pool(f, boxes, shapes)
    with _OpLog([]) as log:
        out.sum().backward()
    backward_calls = [name for name, _ in log.calls if name.startswith("mrcnn::")]
    assert backward_calls == ["mrcnn::multilevel_roi_align_backward"], backward_calls
    assert all(f[k].grad is not None for k in names)


# ---------------------------------------------------------------- zero boxes, compile


@pytest.mark.parametrize("config", ["1level", "4levels_small"])
def test_zero_boxes(config):
    names, feats, _, shapes, kw = _make(config, torch.float32, seed=60)
    ours, theirs = _pools(names, (7, 5), 2, kw)
    boxes = [torch.zeros(0, 4) for _ in shapes]
    out, ref = ours(feats, boxes, shapes), theirs(feats, boxes, shapes)
    assert out.shape == ref.shape == (0, 3, 7, 5) and out.dtype == ref.dtype
    # a batch where only some images have boxes
    _, _, some, _, _ = _make(config, torch.float32, seed=61)
    boxes = [some[0]] + [torch.zeros(0, 4) for _ in shapes[1:]]
    n = assert_close_counted(ours(feats, boxes, shapes), theirs(feats, boxes, shapes), **TOLERANCES[torch.float32])
    assert n == len(some[0]) * 3 * 35


def test_torch_compile_module_matches_eager():
    names, feats, boxes, shapes, kw = _make("4levels_small", torch.float32, seed=70)
    eager = mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw)
    ref = eager(feats, boxes, shapes)
    # A fresh module infers its scales on the first call (host arithmetic, as torchvision): compile
    # that without fullgraph; once set up, the forward must compile to one graph.
    fresh = torch.compile(mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, **kw), backend="aot_eager")
    assert torch.equal(fresh(feats, boxes, shapes), ref)
    warm = torch.compile(eager, backend="aot_eager", fullgraph=True)
    f = {k: v.clone().requires_grad_() for k, v in feats.items()}
    out = warm(f, boxes, shapes)
    assert torch.equal(out, ref) and out.numel() > 0
    out.sum().backward()
    f_ref = {k: v.clone().requires_grad_() for k, v in feats.items()}
    eager(f_ref, boxes, shapes).sum().backward()
    for k in names:
        assert torch.equal(f[k].grad, f_ref[k].grad)
