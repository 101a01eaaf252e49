"""mrcnn.ops RoIAlign on CUDA: forward and backward equal torchvision's CUDA op (fp32, fp64; fp16
and bf16 against an fp32 reference), NCHW / channels-last / strided inputs, multi-level pooling
with no host sync, bitwise-deterministic forward, bad calls, opcheck.

Imports only torch, torchvision, pytest and mrcnn.ops (the GPU machine has no Ray/pycocotools).
Every test is skipped without a CUDA device.
"""

import pytest
import torch
import torchvision

import mrcnn.ops
from _roi_reference import (
    SAMPLING_RATIOS,
    TOLERANCES,
    assert_close_counted,
    boxes_all_scales,
    edge_rois,
    fpn_features,
    fpn_level,
    random_case,
    random_rois,
    rois_to_list,
    strided_views,
    tv_roi_align,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
# Backward on CUDA accumulates with atomics, in any order: a little more slack than forward.
GRAD_TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def _layout(x, layout, seed=0):
    if layout == "nchw":
        return x
    return strided_views(x, torch.Generator().manual_seed(seed))[layout]


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_torchvision_cuda(dtype, sampling_ratio, aligned, layout):
    compared = nonzero = 0
    for i in range(12):
        seed = 1000 * SAMPLING_RATIOS.index(sampling_ratio) + 100 * aligned + i
        x, rois, output_size, scale = random_case(seed)
        x, rois = x.to(DEV, dtype), rois.to(DEV, dtype)
        boxes = rois if i % 2 == 0 else rois_to_list(rois, x.shape[0])
        out = mrcnn.ops.roi_align(_layout(x, layout), boxes, output_size, scale, sampling_ratio, aligned)
        ref = tv_roi_align(x, boxes, output_size, scale, sampling_ratio, aligned)
        assert out.is_cuda and out.is_contiguous()
        compared += assert_close_counted(out, ref, what=f"seed={seed}", **TOLERANCES[dtype])
        nonzero += int((ref != 0).sum())
    assert compared >= 1500, compared
    assert nonzero >= compared // 3, (nonzero, compared)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "batch_expanded"])
def test_strided_inputs_cuda(layout):
    compared = 0
    for seed in range(4):
        x, rois, output_size, scale = random_case(500 + seed)
        x, rois = x.to(DEV, torch.float32), rois.to(DEV, torch.float32)
        if layout == "batch_expanded":
            x = x[:1].expand_as(x).contiguous()
        wide = torch.zeros(len(rois), 10, device=DEV)
        wide[:, ::2] = rois
        out = mrcnn.ops.roi_align(_layout(x, layout, seed), wide[:, ::2], output_size, scale, -1, seed % 2 == 0)
        ref = tv_roi_align(x, rois, output_size, scale, -1, seed % 2 == 0)
        compared += assert_close_counted(out, ref, what=f"{layout} seed={seed}", **TOLERANCES[torch.float32])
    assert compared >= 100, compared


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("hw", [(13, 17), (1, 1), (1, 9), (8, 1)])
def test_edge_rois_cuda(hw, sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(1, 3, *hw, generator=gen, dtype=torch.float64)
    rois = edge_rois(*hw, 0.5, torch.float64)
    for dtype in (torch.float32, torch.float64):
        xd, rd = x.to(DEV, dtype), rois.to(DEV, dtype)
        out = mrcnn.ops.roi_align(xd, rd, (3, 2), 0.5, sampling_ratio, aligned)
        ref = tv_roi_align(xd, rd, (3, 2), 0.5, sampling_ratio, aligned)  # torchvision CUDA pools every row
        assert assert_close_counted(out, ref, what=f"{hw} {dtype}", **TOLERANCES[dtype]) == len(rois) * 18
        # and the CUDA kernel agrees with our CPU kernel
        cpu = mrcnn.ops.roi_align(xd.cpu(), rd.cpu(), (3, 2), 0.5, sampling_ratio, aligned)
        assert_close_counted(out.cpu(), cpu, what=f"cuda vs cpu {hw} {dtype}", **TOLERANCES[dtype])


@pytest.mark.parametrize("rois_dtype", ["float32", "same"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_cuda(dtype, layout, rois_dtype):
    compared = 0
    for seed in range(8):
        x, rois, output_size, scale = random_case(700 + seed)
        xr = x.to(DEV, dtype)
        rr = rois.to(DEV, torch.float32 if rois_dtype == "float32" else dtype)
        sr, aligned = [(-1, False), (2, True), (0, True), (1, False)][seed % 4]
        out = mrcnn.ops.roi_align(_layout(xr, layout), rr, output_size, scale, sr, aligned)
        assert out.dtype == dtype
        ref = tv_roi_align(xr.float(), rr.float(), output_size, scale, sr, aligned)
        compared += assert_close_counted(out.float(), ref, what=f"seed={seed}", **TOLERANCES[dtype])
    assert compared >= 800, compared


def test_realistic_sizes_cuda():
    # Mask R-CNN box/mask heads: 256 channels, ~1000 RoIs per image, 7x7 and 14x14, fp32 and bf16.
    gen = torch.Generator().manual_seed(80)
    x = torch.randn(2, 256, 50, 68, generator=gen).to(DEV)
    rois = random_rois(gen, n_images=2, height=50, width=68, k=2000, spatial_scale=0.0625).to(DEV)
    for size in (7, 14):
        out = mrcnn.ops.roi_align(x, rois, size, 0.0625, 2, False)
        ref = tv_roi_align(x, rois, size, 0.0625, 2, False)
        assert assert_close_counted(out, ref, **TOLERANCES[torch.float32]) == 2000 * 256 * size * size
    xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = mrcnn.ops.roi_align(xb, rois, 7, 0.0625, 2, True)
    ref = tv_roi_align(xb.float(), rois, 7, 0.0625, 2, True)
    assert assert_close_counted(out.float(), ref, **TOLERANCES[torch.bfloat16]) == 2000 * 256 * 49


def test_zero_rois_cuda():
    x = torch.randn(2, 3, 8, 9, device=DEV, requires_grad=True)
    out = mrcnn.ops.roi_align(x, torch.zeros(0, 5, device=DEV), (4, 5), 0.5, 2)
    assert out.shape == (0, 3, 4, 5) and out.is_cuda
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_input_grad_matches_torchvision_cuda(dtype, layout):
    compared = 0
    for seed in range(6):
        x, rois, output_size, scale = random_case(900 + seed)
        sr, aligned = [(-1, False), (2, True), (0, True), (1, False), (3, True), (-1, True)][seed]
        x = x.to(DEV, dtype)
        rois = rois.to(DEV, dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        ours_in = _layout(x, layout, seed).detach().requires_grad_()
        ref_in = x.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        out = mrcnn.ops.roi_align(ours_in, rois, output_size, scale, sr, aligned)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        (out * weight.to(DEV, dtype)).sum().backward()
        ref_out = tv_roi_align(ref_in, rois.to(ref_in.dtype), output_size, scale, sr, aligned)
        (ref_out * weight.to(DEV, ref_in.dtype)).sum().backward()
        assert ours_in.grad.dtype == dtype and ours_in.grad.shape == x.shape
        compared += assert_close_counted(ours_in.grad.to(ref_in.dtype), ref_in.grad, what=f"seed={seed}",
                                         **GRAD_TOLERANCES[dtype])
    assert compared >= 300, compared


def test_gradcheck_cuda():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 1, 6, 7, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    rois = torch.tensor([[0, 1.0, 1.5, 10.0, 12.0], [1, -2.0, 3.0, 6.0, 9.5], [1, 4.0, 4.0, 4.5, 20.0]],
                        dtype=torch.float64, device=DEV)
    for aligned in (False, True):
        for sr in (2, -1):
            assert torch.autograd.gradcheck(lambda t: mrcnn.ops.roi_align(t, rois, (3, 2), 0.5, sr, aligned), (x,))
    assert torch.autograd.gradgradcheck(lambda t: mrcnn.ops.roi_align(t, rois, 2, 0.5, -1, True), (x,))


# ---------------------------------------------------------------- determinism, modes


def test_forward_is_bitwise_deterministic_cuda():
    gen = torch.Generator().manual_seed(81)
    x = torch.randn(2, 64, 40, 52, generator=gen).to(DEV)
    rois = random_rois(gen, n_images=2, height=40, width=52, k=500, spatial_scale=0.25).to(DEV)
    for xin in (x, x.contiguous(memory_format=torch.channels_last), x.half()):  # fp16 with fp32 rois
        first = mrcnn.ops.roi_align(xin, rois, 7, 0.25, -1, True)
        for _ in range(3):
            assert torch.equal(mrcnn.ops.roi_align(xin, rois, 7, 0.25, -1, True), first)
        assert first.numel() == 500 * 64 * 49


def test_inference_mode_and_autocast_cuda():
    x, rois, output_size, scale = random_case(52)
    x, rois = x.to(DEV, torch.float32), rois.to(DEV, torch.float32)
    with torch.inference_mode():
        out = mrcnn.ops.roi_align(x, rois, output_size, scale, 2, False)
    assert out.is_inference()
    assert assert_close_counted(out, tv_roi_align(x, rois, output_size, scale, 2, False),
                                **TOLERANCES[torch.float32]) > 0
    for amp_dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=amp_dtype):
            for feats in (x, x.to(amp_dtype)):
                ours = mrcnn.ops.roi_align(feats, rois, output_size, scale, 2, False)
                theirs = tv_roi_align(feats, rois, output_size, scale, 2, False)
                assert ours.dtype == theirs.dtype, (amp_dtype, feats.dtype)
                ref = tv_roi_align(feats.float(), rois, output_size, scale, 2, False)
                assert_close_counted(ours.float(), ref, **TOLERANCES[ours.dtype])


def test_torch_compile_cuda():
    def pool(x, rois):
        return mrcnn.ops.roi_align(x, rois, (3, 4), 0.25, 2, True)

    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True)
    x, rois, _, _ = random_case(61)
    x, rois = x.to(DEV, torch.float32), rois.to(DEV, torch.float32)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = pool(xe, rois), compiled(xc, rois)
    assert torch.equal(comp, eager) and eager.numel() > 0
    eager.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, **GRAD_TOLERANCES[torch.float32])


def test_opcheck_cuda():
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(2, 3, 9, 11, generator=gen).to(DEV)
    rois = random_rois(gen, n_images=2, height=9, width=11, k=5, spatial_scale=0.5).to(DEV)
    samples = [
        (x.clone(), rois, 0.5, 3, 4, 2, False),
        (x.double().requires_grad_(), rois.double(), 0.5, 2, 2, -1, True),
        (x.contiguous(memory_format=torch.channels_last).requires_grad_(), rois, 0.5, 4, 3, 0, False),
        (x.half(), rois, 0.5, 3, 3, 2, True),
        (x.bfloat16(), rois, 0.5, 3, 3, -1, False),
        (x.clone().requires_grad_(), rois[:0], 0.5, 3, 3, 2, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.mrcnn.roi_align.default, args)
    grad = torch.randn(5, 3, 3, 4, generator=gen).to(DEV)
    for channels_last in (False, True):
        args = (grad, rois, 0.5, 3, 4, 2, 3, 9, 11, 2, True, channels_last)
        torch.library.opcheck(torch.ops.mrcnn.roi_align_backward.default, args)


# ---------------------------------------------------------------- multi-level


def _fpn_case(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(128, 160), (96, 128), (120, 90)]
    names = ["0", "1", "2", "3"]
    feats = fpn_features(gen, n_images=3, image_shapes=shapes, channels=8, names=names + ["pool"],
                         dtype=dtype, device=DEV)
    boxes = [b.to(DEV) for b in boxes_all_scales(gen, shapes, 12, [14, 40, 80, 140], torch.float32)]
    return names, feats, boxes, shapes


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_multiscale_matches_torchvision_cuda(dtype, channels_last):
    names, feats, boxes, shapes = _fpn_case(dtype, seed=90)
    if channels_last:
        feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
    ours = mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=56)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=56)
    ours_boxes = [b.to(dtype) if dtype == torch.float64 else b for b in boxes]  # fp16/bf16 take fp32 boxes
    out = ours(feats, ours_boxes, shapes)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = theirs({k: v.to(ref_dtype) for k, v in feats.items()}, [b.to(ref_dtype) for b in boxes], shapes)
    assert out.dtype == dtype
    n = assert_close_counted(out.to(ref_dtype), ref, **TOLERANCES[dtype])
    assert n == 36 * 8 * 49
    levels = fpn_level([b.cpu() for b in boxes], 2, 5, 56, 4)
    assert torch.bincount(levels, minlength=4).min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiscale_grads_match_torchvision_cuda(dtype):
    names, feats, boxes, shapes = _fpn_case(dtype, seed=91)
    boxes = [b.to(dtype) for b in boxes]
    ours = mrcnn.ops.MultiScaleRoIAlign(names, (5, 4), -1, canonical_scale=56)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, (5, 4), -1, canonical_scale=56)
    f1 = {k: v.clone().requires_grad_() for k, v in feats.items()}
    f2 = {k: v.clone().requires_grad_() for k, v in feats.items()}
    out = ours(f1, boxes, shapes)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEV, dtype)
    (out * weight).sum().backward()
    (theirs(f2, boxes, shapes) * weight).sum().backward()
    compared = 0
    for k in names:
        compared += assert_close_counted(f1[k].grad, f2[k].grad, what=k, **GRAD_TOLERANCES[dtype])
    assert compared == sum(feats[k].numel() for k in names)
    assert f1["pool"].grad is None


def test_multiscale_forward_has_no_host_sync_and_is_deterministic_cuda():
    names, feats, boxes, shapes = _fpn_case(torch.float32, seed=92)
    pool = mrcnn.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=56)
    first = pool(feats, boxes, shapes)  # infers the level scales (host arithmetic on shapes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = pool(feats, boxes, shapes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, first) and first.numel() > 0


def test_multilevel_op_opcheck_cuda():
    gen = torch.Generator().manual_seed(93)
    sizes, scales = [(24, 30), (12, 15), (6, 8)], [0.25, 0.125, 0.0625]
    feats = [torch.randn(2, 3, h, w, generator=gen).to(DEV) for h, w in sizes]
    rois = random_rois(gen, n_images=2, height=24, width=30, k=10, spatial_scale=0.25).to(DEV)
    levels = torch.randint(0, 3, (10,), generator=gen).to(DEV)
    for args in [
        (feats, rois, levels, scales, 4, 3, 2, False),
        ([f.double().requires_grad_() for f in feats], rois.double(), levels, scales, 3, 3, -1, True),
        ([f.contiguous(memory_format=torch.channels_last).requires_grad_() for f in feats], rois, levels, scales,
         2, 5, 0, False),
        ([f.half() for f in feats], rois, levels, scales, 3, 3, 2, False),
    ]:
        torch.library.opcheck(torch.ops.mrcnn.multilevel_roi_align.default, args)
    grad = torch.randn(10, 3, 4, 3, generator=gen).to(DEV)
    for channels_last in (False, True):
        args = (grad, rois, levels, scales, [24, 12, 6], [30, 15, 8], 2, 3, 4, 3, 2, False, channels_last)
        torch.library.opcheck(torch.ops.mrcnn.multilevel_roi_align_backward.default, args)


# ---------------------------------------------------------------- bad calls

ERRORS = (ValueError, RuntimeError)


def _ok_call():
    x = torch.randn(2, 3, 8, 8, device=DEV)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 0.0, 2.0, 7.0, 7.0]], device=DEV)
    return x, rois


def test_device_mismatch_cuda():
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=r"(?i)(device|cuda|cpu)"):
        mrcnn.ops.roi_align(x, rois.cpu(), 3)
    with pytest.raises(ERRORS, match=r"(?i)(device|cuda|cpu)"):
        mrcnn.ops.roi_align(x.cpu(), rois, 3)
    with pytest.raises(ERRORS, match=r"(?i)(device|cuda|cpu)"):
        mrcnn.ops.roi_align(x, [rois[:1, 1:].cpu(), rois[1:, 1:].cpu()], 3)
    with pytest.raises(ERRORS, match=r"(?i)(device|cuda|cpu)"):
        torch.ops.mrcnn.roi_align(x, rois.cpu(), 1.0, 3, 3, 2, False)
    feats = [x, x[:, :, ::2, ::2].contiguous().cpu()]
    levels = torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(ERRORS, match=r"(?i)(device|cuda|cpu)"):
        torch.ops.mrcnn.multilevel_roi_align(feats, rois, levels, [1.0, 0.5], 3, 3, 2, False)


def test_bad_calls_cuda():
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=r"(?i)(4-?d|dimension|rank|ndim)"):
        mrcnn.ops.roi_align(x[0], rois, 3)
    with pytest.raises(ERRORS, match=r"(?i)(rois|boxes)"):
        mrcnn.ops.roi_align(x, rois[:, 1:], 3)
    with pytest.raises(ERRORS, match=r"(?i)(dtype|type)"):
        mrcnn.ops.roi_align(x, rois.double(), 3)
    with pytest.raises(ERRORS, match=r"(?i)(float|dtype|type|integ)"):
        mrcnn.ops.roi_align(x.int(), rois, 3)
    with pytest.raises(ERRORS, match=r"(?i)(output.?size|pooled|positive)"):
        mrcnn.ops.roi_align(x, rois, (0, 3))
    for bad_index in (-1.0, 2.0):
        r = rois.clone()
        r[1, 0] = bad_index
        with pytest.raises(ERRORS, match=r"(?i)batch.?(index|idx|ind)"):
            mrcnn.ops.roi_align(x, r, 3)
    for value in (float("nan"), float("inf")):
        r = rois.clone()
        r[0, 3] = value
        with pytest.raises(ERRORS, match=r"(?i)(finite|nan|inf)"):
            mrcnn.ops.roi_align(x, r, 3)


def test_raw_cuda_op_never_reads_out_of_bounds():
    # The raw op skips the host-side value check; the kernel must still stay in bounds (a bad
    # access would surface as a CUDA error at the synchronize) and pool the good RoIs correctly.
    x, rois = _ok_call()
    bad = torch.tensor([[7.0, 1.0, 1.0, 5.0, 5.0], [-3.0, 1.0, 1.0, 5.0, 5.0], [1e9, 1.0, 1.0, 5.0, 5.0]], device=DEV)
    all_rois = torch.cat([rois, bad])
    try:
        out = torch.ops.mrcnn.roi_align(x, all_rois, 1.0, 3, 3, 2, False)
    except ERRORS as e:  # raising is fine too
        assert "batch" in str(e).lower()
        return
    torch.cuda.synchronize()
    ref = tv_roi_align(x, rois, 3, 1.0, 2, False)
    assert assert_close_counted(out[:2], ref, **TOLERANCES[torch.float32]) == 2 * 3 * 9
