"""mrcnn.ops.roi_align on CPU: results and gradients equal torchvision.ops.roi_align, the custom op
behaves under autograd / inference mode / autocast / torch.compile / opcheck, and bad calls fail
with a message that names the problem.

Every comparison counts the output elements it compared, and each test asserts that count, so a
test cannot pass by comparing empty tensors.
"""

import pytest
import torch
import torchvision

import mrcnn.ops
from _roi_reference import (
    SAMPLING_RATIOS,
    TOLERANCES,
    assert_close_counted,
    edge_rois,
    random_case,
    random_rois,
    rois_to_list,
    strided_views,
    tv_roi_align,
)

@pytest.mark.parametrize("boxes_as", ["tensor", "list"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", SAMPLING_RATIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_torchvision_random(dtype, sampling_ratio, aligned, boxes_as):
    compared = nonzero = 0
    for i in range(12):
        seed = 1000 * SAMPLING_RATIOS.index(sampling_ratio) + 100 * aligned + i
        x, rois, output_size, scale = random_case(seed)
        x, rois = x.to(dtype), rois.to(dtype)
        boxes = rois if boxes_as == "tensor" else rois_to_list(rois, x.shape[0])
        what = f"seed={seed} x={tuple(x.shape)} K={len(rois)} output_size={output_size} scale={scale}"
        out = mrcnn.ops.roi_align(x, boxes, output_size, scale, sampling_ratio, aligned)
        ref = tv_roi_align(x, boxes, output_size, scale, sampling_ratio, aligned)
        assert out.is_contiguous()
        compared += assert_close_counted(out, ref, what=what, **TOLERANCES[dtype])
        nonzero += int((ref != 0).sum())
    # 12 calls of K>=1 RoIs: thousands of elements (1988 to 4197 for these seeds), and a good
    # share non-zero (RoIs overlap the map), so the comparison is not between empty or zero tensors
    assert compared >= 1500, compared
    assert nonzero >= compared // 3, (nonzero, compared)


def test_roi_align_module_matches_torchvision():
    x, rois, _, _ = random_case(7)
    x, rois = x.float(), rois.float()
    ours = mrcnn.ops.RoIAlign((5, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    theirs = torchvision.ops.RoIAlign((5, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    n = assert_close_counted(ours(x, rois), theirs(x, rois), **TOLERANCES[torch.float32])
    assert n == len(rois) * x.shape[1] * 15


def test_output_size_int_tuple_and_list_are_equivalent():
    x, rois, _, _ = random_case(11)
    a = mrcnn.ops.roi_align(x, rois, 4, 0.5, 2)
    b = mrcnn.ops.roi_align(x, rois, (4, 4), 0.5, 2)
    c = mrcnn.ops.roi_align(x, rois, [4, 4], 0.5, 2)
    assert a.shape == (len(rois), x.shape[1], 4, 4)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_constant_map_pools_to_the_constant():
    # Independent of torchvision: RoIs well inside a constant map average to the constant.
    x = torch.full((2, 3, 20, 30), 2.5, dtype=torch.float64)
    rois = torch.tensor([[0, 2.0, 3.0, 17.0, 11.0], [1, 5.5, 1.25, 9.0, 18.0], [1, 0.0, 0.0, 28.0, 18.0]],
                        dtype=torch.float64)
    for aligned in (False, True):
        for sr in (-1, 2):
            out = mrcnn.ops.roi_align(x, rois, (4, 6), 1.0, sr, aligned)
            torch.testing.assert_close(out, torch.full_like(out, 2.5), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(13, 17), (1, 1), (1, 9), (8, 1), (2, 2)])
def test_edge_rois_match_torchvision(hw, dtype, sampling_ratio, aligned):
    h, w = hw
    gen = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(1, 3, h, w, generator=gen, dtype=torch.float64).to(dtype)
    rois = edge_rois(h, w, 0.5, dtype)
    out = mrcnn.ops.roi_align(x, rois, (3, 2), 0.5, sampling_ratio, aligned)
    # torchvision's CPU kernel cannot pool an RoI inverted along exactly one axis with aligned=True
    # and adaptive sampling (its sample grid is then negative x positive and it raises "cannot create
    # std::vector larger than max_size()"); its CUDA kernel and Python reference pool no samples
    # there and return 0, and so must we. Every other RoI is compared with torchvision's CPU op.
    grid_w = torch.ceil((rois[:, 3] - rois[:, 1]) * 0.5 / 2)
    grid_h = torch.ceil((rois[:, 4] - rois[:, 2]) * 0.5 / 3)
    no_tv = (grid_w * grid_h < 0) if (aligned and sampling_ratio <= 0) else torch.zeros(len(rois), dtype=torch.bool)
    assert torch.all(out[no_tv] == 0)
    ref = tv_roi_align(x, rois[~no_tv], (3, 2), 0.5, sampling_ratio, aligned)
    n = assert_close_counted(out[~no_tv], ref, what=f"hw={hw}", **TOLERANCES[dtype])
    assert n + int(no_tv.sum()) * 3 * 3 * 2 == len(rois) * 3 * 3 * 2 and n >= 9 * 3 * 3 * 2
    # the RoIs more than a pixel outside the map pool nothing, as in torchvision
    assert torch.all(out[3:5] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_rois(dtype):
    x = torch.randn(2, 3, 8, 9, dtype=dtype)
    for boxes in (torch.zeros(0, 5, dtype=dtype), [torch.zeros(0, 4, dtype=dtype)] * 2):
        out = mrcnn.ops.roi_align(x, boxes, (4, 5), 0.5, 2)
        assert out.shape == (0, 3, 4, 5) and out.dtype == dtype
    # gradient of an empty result is an all-zero input gradient
    xg = x.clone().requires_grad_()
    mrcnn.ops.roi_align(xg, torch.zeros(0, 5, dtype=dtype), 3).sum().backward()
    assert xg.grad is not None and torch.count_nonzero(xg.grad) == 0


def test_list_with_empty_images_matches_torchvision():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 12, 14, generator=gen)
    boxes = [torch.zeros(0, 4), torch.tensor([[1.0, 2.0, 9.0, 11.0], [0.5, 0.5, 3.0, 20.0]]), torch.zeros(0, 4)]
    out = mrcnn.ops.roi_align(x, boxes, 3, 1.0, -1, True)
    ref = tv_roi_align(x, boxes, 3, 1.0, -1, True)
    assert assert_close_counted(out, ref, **TOLERANCES[torch.float32]) == 2 * 2 * 9


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "batch_expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_inputs_match_torchvision(layout, dtype):
    compared = 0
    for seed in range(3):
        x, rois, output_size, scale = random_case(500 + seed)
        x, rois = x.to(dtype), rois.to(dtype)
        if layout == "batch_expanded":
            x = x[:1].expand_as(x).contiguous()
        view = strided_views(x, torch.Generator().manual_seed(seed))[layout]
        if layout not in ("batch_expanded",) and min(x.shape[1:]) > 1:
            assert not view.is_contiguous()
        # non-contiguous rois too: every other column of a wider tensor
        wide = torch.zeros(len(rois), 10, dtype=dtype)
        wide[:, ::2] = rois
        rois_view = wide[:, ::2]
        for sr, aligned in ((-1, False), (2, True)):
            out = mrcnn.ops.roi_align(view, rois_view, output_size, scale, sr, aligned)
            ref = tv_roi_align(x, rois, output_size, scale, sr, aligned)
            assert out.is_contiguous()
            compared += assert_close_counted(out, ref, what=f"{layout} seed={seed}", **TOLERANCES[dtype])
    assert compared >= 100, compared


@pytest.mark.parametrize("aligned", [False, True])
def test_large_adaptive_rois(aligned):
    # Adaptive sampling on RoIs much larger than the output: up to ~100 x 100 samples per bin.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 96, 80, generator=gen)
    rois = torch.tensor([[0, -20.0, -30.0, 190.0, 220.0], [0, 0.0, 0.0, 159.0, 191.0], [0, 10.0, 5.0, 150.0, 12.0]])
    out = mrcnn.ops.roi_align(x, rois, (2, 3), 0.5, 0, aligned)
    ref = tv_roi_align(x, rois, (2, 3), 0.5, 0, aligned)
    assert assert_close_counted(out, ref, **TOLERANCES[torch.float32]) == 3 * 2 * 6
    out64 = mrcnn.ops.roi_align(x.double(), rois.double(), (2, 3), 0.5, -1, aligned)
    ref64 = tv_roi_align(x.double(), rois.double(), (2, 3), 0.5, -1, aligned)
    assert assert_close_counted(out64, ref64, **TOLERANCES[torch.float64]) == 36


# ---------------------------------------------------------------- reduced precision


@pytest.mark.parametrize("rois_dtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_matches_fp32_reference(dtype, rois_dtype):
    compared = 0
    for seed in range(6):
        x, rois, output_size, scale = random_case(700 + seed)
        xr = x.to(dtype)
        rr = rois.float() if rois_dtype == "float32" else rois.to(dtype)
        sr, aligned = [(-1, False), (2, True), (0, True)][seed % 3]
        out = mrcnn.ops.roi_align(xr, rr, output_size, scale, sr, aligned)
        assert out.dtype == dtype and out.is_contiguous()
        # fp32 reference on the exactly-upcast input and boxes; ours may differ by the final rounding
        ref = tv_roi_align(xr.float(), rr.float(), output_size, scale, sr, aligned)
        compared += assert_close_counted(out.float(), ref, what=f"seed={seed}", **TOLERANCES[dtype])
    assert compared >= 500, compared


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 1, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.0, 1.5, 10.0, 12.0], [1, -2.0, 3.0, 6.0, 9.5], [1, 4.0, 4.0, 4.5, 20.0], [0, 0.0, 0.0, 15.0, 13.0]],
        dtype=torch.float64,
    )
    assert torch.autograd.gradcheck(
        lambda t: mrcnn.ops.roi_align(t, rois, (3, 2), 0.5, sampling_ratio, aligned), (x,)
    )


@pytest.mark.parametrize("aligned", [False, True])
def test_gradgradcheck(aligned):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(1, 2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 8.0, 9.0], [0, 3.0, -1.0, 11.0, 6.0]], dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda t: mrcnn.ops.roi_align(t, rois, 2, 0.5, -1, aligned), (x,))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_grad_matches_torchvision(dtype, layout):
    compared = 0
    for seed in range(4):
        x, rois, output_size, scale = random_case(900 + seed)
        x, rois = x.to(dtype), rois.to(dtype)
        sr, aligned = [(-1, False), (2, True), (0, True), (1, False)][seed]
        view = x if layout == "contiguous" else strided_views(x, torch.Generator().manual_seed(seed))[layout]
        ours_in = view.detach().requires_grad_()
        ref_in = x.detach().clone().requires_grad_()
        out = mrcnn.ops.roi_align(ours_in, rois, output_size, scale, sr, aligned)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        (out * weight).sum().backward()
        (tv_roi_align(ref_in, rois, output_size, scale, sr, aligned) * weight).sum().backward()
        assert ours_in.grad is not None and ours_in.grad.shape == x.shape
        compared += assert_close_counted(ours_in.grad, ref_in.grad, what=f"seed={seed}", **TOLERANCES[dtype])
    assert compared == 282, compared  # the input elements of the four seeded cases


def test_backward_op_matches_torchvision_backward():
    x, rois, _, scale = random_case(31)
    n, c, h, w = x.shape
    grad = torch.randn(len(rois), c, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for aligned in (False, True):
        ours = torch.ops.mrcnn.roi_align_backward(grad, rois, scale, 3, 4, n, c, h, w, 2, aligned, False)
        ref = torch.ops.torchvision._roi_align_backward(grad, rois, scale, 3, 4, n, c, h, w, 2, aligned)
        assert assert_close_counted(ours, ref, **TOLERANCES[torch.float64]) == x.numel()
        ours_cl = torch.ops.mrcnn.roi_align_backward(grad, rois, scale, 3, 4, n, c, h, w, 2, aligned, True)
        assert assert_close_counted(ours_cl, ref, **TOLERANCES[torch.float64]) == x.numel()


# ---------------------------------------------------------------- determinism


def test_forward_and_backward_are_deterministic():
    x, rois, output_size, scale = random_case(41)
    x, rois = x.float(), rois.float()
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        out = mrcnn.ops.roi_align(xi, rois, output_size, scale, -1, True)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][0].numel() > 0


def test_parallel_backward_is_deterministic():
    # Enough RoIs and channels for the CPU kernels to split the work across threads; many RoIs
    # overlap, so their gradients land on the same input pixels.
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 32, 24, 30, generator=gen)
    rois = random_rois(gen, n_images=2, height=24, width=30, k=300, spatial_scale=0.25)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last, torch.contiguous_format, torch.channels_last):
        xi = x.clone(memory_format=layout).requires_grad_()
        out = mrcnn.ops.roi_align(xi, rois, 7, 0.25, 2, False)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(xi.grad.contiguous())
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])
    assert int(torch.count_nonzero(grads[0])) > x.numel() // 2


def test_boxes_get_no_gradient():
    x, rois, output_size, scale = random_case(43)
    xi, ri = x.clone().requires_grad_(), rois.clone().requires_grad_()
    out = mrcnn.ops.roi_align(xi, ri, output_size, scale, 2, True)
    out.sum().backward()
    assert ri.grad is None
    xr = x.clone().requires_grad_()
    tv_roi_align(xr, rois, output_size, scale, 2, True).sum().backward()
    assert assert_close_counted(xi.grad, xr.grad, **TOLERANCES[torch.float64]) == x.numel()


# ---------------------------------------------------------------- modes: inference, autocast, compile


def test_inference_mode():
    x, rois, output_size, scale = random_case(51)
    with torch.inference_mode():
        out = mrcnn.ops.roi_align(x, rois, output_size, scale, 2, False)
        assert out.is_inference()
    ref = tv_roi_align(x, rois, output_size, scale, 2, False)
    assert assert_close_counted(out, ref, **TOLERANCES[torch.float64]) > 0


def test_autocast_cpu_bf16():
    x, rois, output_size, scale = random_case(52)
    xb, rf = x.to(torch.bfloat16), rois.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mrcnn.ops.roi_align(xb, rf, output_size, scale, 2, False)
        ref_dtype = tv_roi_align(xb, rf, output_size, scale, 2, False).dtype
        # fp32 features stay fp32 under autocast, as with torchvision's op
        out32 = mrcnn.ops.roi_align(x.float(), rf, output_size, scale, 2, False)
        ref32 = tv_roi_align(x.float(), rf, output_size, scale, 2, False)
    assert out.dtype == ref_dtype == torch.bfloat16
    ref = tv_roi_align(xb.float(), rf, output_size, scale, 2, False)
    n = assert_close_counted(out.float(), ref, **TOLERANCES[torch.bfloat16])
    assert n > 0
    assert assert_close_counted(out32, ref32, **TOLERANCES[torch.float32]) == n


def test_torch_compile_fullgraph_matches_eager():
    def pool(x, rois):
        return mrcnn.ops.roi_align(x, rois, (3, 4), 0.25, 2, True)

    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True)
    compared = 0
    for seed in (61, 62):  # two calls with different K: the second exercises dynamic shapes
        x, rois, _, _ = random_case(seed)
        x, rois = x.float(), rois.float()
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, comp = pool(xe, rois), compiled(xc, rois)
        assert torch.equal(comp, eager)
        eager.sum().backward()
        comp.sum().backward()
        assert torch.equal(xc.grad, xe.grad)
        compared += eager.numel()
    assert compared > 0


# ---------------------------------------------------------------- opcheck


def _opcheck_samples():
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(2, 3, 9, 11, generator=gen)
    rois = random_rois(gen, n_images=2, height=9, width=11, k=5, spatial_scale=0.5)
    return [
        (x.clone(), rois, 0.5, 3, 4, 2, False),
        (x.double().requires_grad_(), rois.double(), 0.5, 2, 2, -1, True),
        (x.contiguous(memory_format=torch.channels_last).requires_grad_(), rois, 0.5, 4, 3, 0, False),
        (x.to(torch.bfloat16), rois, 0.5, 3, 3, 2, True),
        (x.clone().requires_grad_(), rois[:0], 0.5, 3, 3, 2, False),
    ]


def test_opcheck_roi_align():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.mrcnn.roi_align.default, args)


def test_opcheck_roi_align_backward():
    gen = torch.Generator().manual_seed(72)
    rois = random_rois(gen, n_images=2, height=9, width=11, k=5, spatial_scale=0.5)
    grad = torch.randn(5, 3, 3, 4, generator=gen)
    for channels_last in (False, True):
        for g in (grad, grad.double().requires_grad_()):
            args = (g, rois.to(g.dtype), 0.5, 3, 4, 2, 3, 9, 11, 2, True, channels_last)
            torch.library.opcheck(torch.ops.mrcnn.roi_align_backward.default, args)


# ---------------------------------------------------------------- bad calls


def _ok_call():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 0.0, 2.0, 7.0, 7.0]])
    return x, rois


DIM_MSG = r"(?i)(4-?d|4 dim|dimension|rank|ndim|\[N, ?C, ?H, ?W\])"
ROIS_SHAPE_MSG = r"(?is)(?=.*(rois|boxes))(?=.*(5|4|shape|dim|column))"
DTYPE_MSG = r"(?i)(dtype|type)"
BATCH_MSG = r"(?i)batch.?(index|idx|ind)"
FINITE_MSG = r"(?i)(finite|nan|inf)"
SIZE_MSG = r"(?i)(output.?size|pooled|positive|> ?0|at least)"
ERRORS = (ValueError, RuntimeError)


def test_bad_input_rank():
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=DIM_MSG):
        mrcnn.ops.roi_align(x[0], rois, 3)
    with pytest.raises(ERRORS, match=DIM_MSG):
        mrcnn.ops.roi_align(x[None], rois, 3)


def test_bad_rois_shape():
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=ROIS_SHAPE_MSG):
        mrcnn.ops.roi_align(x, rois[:, 1:], 3)  # [K, 4] tensor
    with pytest.raises(ERRORS, match=ROIS_SHAPE_MSG):
        mrcnn.ops.roi_align(x, rois[None], 3)  # 3-D
    with pytest.raises(ERRORS, match=ROIS_SHAPE_MSG):
        mrcnn.ops.roi_align(x, rois[0], 3)  # 1-D
    with pytest.raises(ERRORS, match=ROIS_SHAPE_MSG):
        mrcnn.ops.roi_align(x, [rois, rois], 3)  # list entries [L, 5]


@pytest.mark.parametrize(
    "x_dtype,rois_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float64),
    ],
)
def test_mismatched_dtypes(x_dtype, rois_dtype):
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=DTYPE_MSG):
        mrcnn.ops.roi_align(x.to(x_dtype), rois.to(rois_dtype), 3)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_input(dtype):
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=r"(?i)(float|dtype|type|integral|integer)"):
        mrcnn.ops.roi_align(x.to(dtype), rois, 3)


@pytest.mark.parametrize("bad_index", [-1.0, 2.0, 7.0])
@pytest.mark.parametrize("boxes_dtype", [torch.float32, torch.float64])
def test_batch_index_out_of_range(bad_index, boxes_dtype):
    x, rois = _ok_call()
    x, rois = x.to(boxes_dtype), rois.to(boxes_dtype)
    rois[1, 0] = bad_index
    with pytest.raises(ERRORS, match=BATCH_MSG):
        mrcnn.ops.roi_align(x, rois, 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("column", [1, 2, 3, 4])
def test_non_finite_boxes(value, column):
    x, rois = _ok_call()
    rois[1, column] = value
    with pytest.raises(ERRORS, match=FINITE_MSG):
        mrcnn.ops.roi_align(x, rois, 3)
    # the list form is checked too
    with pytest.raises(ERRORS, match=FINITE_MSG):
        mrcnn.ops.roi_align(x, [rois[:1, 1:], rois[1:, 1:]], 3)


def test_non_finite_batch_index():
    x, rois = _ok_call()
    rois[0, 0] = float("nan")
    with pytest.raises(ERRORS, match=r"(?i)(finite|nan|batch)"):
        mrcnn.ops.roi_align(x, rois, 3)


@pytest.mark.parametrize("output_size", [0, (0, 3), (3, 0), (-1, 2), -2])
def test_bad_output_size(output_size):
    x, rois = _ok_call()
    with pytest.raises(ERRORS, match=SIZE_MSG):
        mrcnn.ops.roi_align(x, rois, output_size)


def test_raw_op_rejects_bad_structure():
    # The registered op checks shapes and dtypes itself (it is what torch.compile and C++ callers use).
    x, rois = _ok_call()
    op = torch.ops.mrcnn.roi_align
    with pytest.raises(ERRORS, match=DIM_MSG):
        op(x[0], rois, 1.0, 3, 3, 2, False)
    with pytest.raises(ERRORS, match=ROIS_SHAPE_MSG):
        op(x, rois[:, 1:], 1.0, 3, 3, 2, False)
    with pytest.raises(ERRORS, match=DTYPE_MSG):
        op(x, rois.double(), 1.0, 3, 3, 2, False)
    with pytest.raises(ERRORS, match=r"(?i)(float|dtype|type|integral|integer)"):
        op(x.int(), rois, 1.0, 3, 3, 2, False)
    with pytest.raises(ERRORS, match=SIZE_MSG):
        op(x, rois, 1.0, 0, 3, 2, False)


def test_raw_cpu_op_checks_box_values():
    # On CPU the registered op itself validates box values (no sync to save), so C++ callers and
    # compiled graphs get the same errors as the Python API.
    x, _ = _ok_call()
    for bad, msg in (([2.0, 1, 1, 5, 5], BATCH_MSG), ([-1.0, 1, 1, 5, 5], BATCH_MSG), ([1e9, 1, 1, 5, 5], BATCH_MSG),
                     ([0.0, float("nan"), 1, 5, 5], FINITE_MSG), ([0.0, 1, 1, float("inf"), 5], FINITE_MSG)):
        rois = torch.tensor([[0.0, 1, 1, 4, 4], bad])
        with pytest.raises(ERRORS, match=msg):
            torch.ops.mrcnn.roi_align(x, rois, 1.0, 3, 3, -1, False)
