"""mrcnn.ops RoIPool against torchvision.ops.roi_pool (the reference) on CPU: outputs, argmax
(ties included), gradients, gradcheck, opcheck, bad calls. CUDA: the same comparisons, skipped
without a device."""

import pytest
import torch
import torchvision

import mrcnn.ops
from mrcnn.ops import roi_pool
from _roi_reference import edge_rois, random_rois, rois_to_list, strided_views

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and mrcnn.ops.WITH_CUDA else [])


def both(x, rois, output_size, scale):
    ours, our_arg = torch.ops.mrcnn.roi_pool(x, rois, scale, *output_size)
    ref, ref_arg = torch.ops.torchvision.roi_pool(x, rois, scale, *output_size)
    return ours, our_arg, ref, ref_arg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("scale,output_size", [(1.0, (7, 7)), (0.25, (7, 7)), (0.0625, (14, 14)), (0.5, (3, 5))])
def test_forward_and_argmax_equal_torchvision(device, dtype, scale, output_size):
    gen = torch.Generator().manual_seed(int(scale * 1000) + output_size[1])
    compared = 0
    for trial in range(4):
        x = torch.randn(2, 5, 23, 31, generator=gen).to(dtype)
        rois = random_rois(gen, n_images=2, height=23, width=31, k=40, spatial_scale=scale, dtype=dtype)
        ours, our_arg, ref, ref_arg = both(x.to(device), rois.to(device), output_size, scale)
        assert ours.dtype == dtype and our_arg.dtype == torch.int32
        assert torch.equal(ours, ref) and torch.equal(our_arg, ref_arg)
        compared += ours.numel()
    assert compared == 4 * 40 * 5 * output_size[0] * output_size[1]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_first_maximum_and_empty_bins_to_minus_one(device):
    x = torch.zeros(1, 2, 12, 12, device=device)
    x[:, 1] = torch.arange(12.0, device=device).repeat(12, 1) // 4  # plateaus: ties everywhere
    rois = torch.cat([edge_rois(12, 12, 1.0, torch.float32),
                      torch.tensor([[0, 1.0, 1.0, 10.0, 10.0], [0, 3.0, 3.0, 8.0, 8.0]])]).to(device)
    ours, our_arg, ref, ref_arg = both(x, rois, (4, 4), 1.0)
    assert torch.equal(ours, ref) and torch.equal(our_arg, ref_arg)
    assert (our_arg == -1).any() and (our_arg >= 0).sum() > 100  # empty bins and ties were both seen


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_box_lists(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 15, 17, generator=gen).to(device)
    rois = random_rois(gen, n_images=3, height=15, width=17, k=25, spatial_scale=0.5).to(device)
    for name, view in strided_views(x, gen).items():
        ref = torchvision.ops.roi_pool(view.contiguous(), rois, (5, 5), 0.5)
        assert torch.equal(mrcnn.ops.roi_pool(view, rois, (5, 5), 0.5), ref), name
    as_list = rois_to_list(rois, 3)
    assert torch.equal(mrcnn.ops.roi_pool(x, as_list, 5, 0.5), torchvision.ops.roi_pool(x, as_list, 5, 0.5))
    module = mrcnn.ops.RoIPool((5, 5), 0.5)
    assert torch.equal(module(x, rois), torchvision.ops.RoIPool((5, 5), 0.5)(x, rois))
    assert repr(module) == "RoIPool(output_size=(5, 5), spatial_scale=0.5)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_torchvision(device, dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 19, 21, generator=gen).to(device=device, dtype=dtype)
    rois = random_rois(gen, n_images=2, height=19, width=21, k=30, spatial_scale=0.5, dtype=dtype).to(device)
    grad = torch.randn(30, 3, 6, 6, generator=gen).to(device=device, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    mrcnn.ops.roi_pool(a, rois, 6, 0.5).backward(grad)
    torchvision.ops.roi_pool(b, rois, 6, 0.5).backward(grad)
    if device == "cpu":
        assert torch.equal(a.grad, b.grad)  # the same order of sums
    else:
        torch.testing.assert_close(a.grad, b.grad)  # atomics: order differs
    assert (a.grad != 0).sum() > 100


def test_gradcheck_and_no_second_derivative():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 9, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = random_rois(gen, n_images=2, height=9, width=10, k=6, spatial_scale=1.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: mrcnn.ops.roi_pool(t, rois, (3, 4)), (x,))
    out = mrcnn.ops.roi_pool(x, rois, 3)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 9, 11, generator=gen)
    rois = random_rois(gen, n_images=2, height=9, width=11, k=5, spatial_scale=0.5)
    for args in [(x, rois, 0.5, 3, 4), (x.double().requires_grad_(), rois.double(), 0.5, 2, 2),
                 (x.contiguous(memory_format=torch.channels_last).requires_grad_(), rois, 0.5, 4, 3),
                 (x.clone().requires_grad_(), rois[:0], 0.5, 3, 3)]:
        torch.library.opcheck(torch.ops.mrcnn.roi_pool.default, args)
    _, argmax = torch.ops.mrcnn.roi_pool(x, rois, 0.5, 3, 4)
    grad = torch.randn(5, 3, 3, 4, generator=gen)
    torch.library.opcheck(torch.ops.mrcnn.roi_pool_backward.default, (grad, rois, argmax, 0.5, 3, 4, 2, 3, 9, 11))


def test_torch_compile_matches_eager():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 12, 12, generator=gen)
    rois = random_rois(gen, n_images=2, height=12, width=12, k=8, spatial_scale=1.0)
    compiled = torch.compile(lambda a, r: mrcnn.ops.roi_pool(a, r, 4), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, rois), mrcnn.ops.roi_pool(x, rois, 4))


def _ok():
    return torch.randn(2, 3, 8, 8), torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 0.0, 2.0, 7.0, 7.0]])


@pytest.mark.parametrize("make,match", [
    (lambda x, r: (x[0], r, 3), "4-D"),
    (lambda x, r: (x, r[:, 1:], 3), "boxes must be"),
    (lambda x, r: (x, r.double(), 3), "dtype"),
    (lambda x, r: (x.long(), r, 3), "floating point"),
    (lambda x, r: (x, r, 0), "output_size must be positive"),
    (lambda x, r: (x, torch.tensor([[2, 1.0, 1, 4, 4]]), 3), "batch index 2, outside"),
    (lambda x, r: (x, torch.tensor([[0, float("nan"), 1, 4, 4]]), 3), "non-finite"),
])
def test_bad_calls_name_the_problem(make, match):
    x, rois = _ok()
    with pytest.raises((ValueError, RuntimeError), match=match):
        mrcnn.ops.roi_pool(*make(x, rois))
    with pytest.raises(ValueError, match="spatial_scale"):
        torch.ops.mrcnn.roi_pool(x, rois, 0.0, 2, 2)
    _, argmax = torch.ops.mrcnn.roi_pool(x, rois, 1.0, 2, 2)
    with pytest.raises(ValueError, match="argmax"):
        torch.ops.mrcnn.roi_pool_backward(torch.ones(2, 3, 2, 2), rois, argmax.long(), 1.0, 2, 2, 2, 3, 8, 8)


# ---------------------------------------------------------------- RoIWarp: quantised corners, bilinear bins

def _round_half_away(v):
    import math

    return math.copysign(math.floor(abs(v) + 0.5), v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0625])
def test_roi_warp_is_roialign_on_corners_rounded_to_the_grid(device, scale):
    gen = torch.Generator().manual_seed(int(1 / scale))
    x = torch.randn(2, 4, 21, 27, generator=gen).to(device)
    rois = random_rois(gen, n_images=2, height=21, width=27, k=30, spatial_scale=scale)
    cells = torch.tensor([[r[0]] + [_round_half_away(v * scale) for v in r[1:]] for r in rois.tolist()])
    ref = torchvision.ops.roi_align(x, cells.to(device), (6, 6), 1.0, 2, aligned=False)
    ours = mrcnn.ops.roi_warp(x, rois.to(device), (6, 6), scale, 2)
    assert torch.equal(ours, ref) and ours.numel() == 30 * 4 * 36
    # not RoIAlign: quantising moved the samples
    assert not torch.allclose(ours, mrcnn.ops.roi_align(x, rois.to(device), (6, 6), scale, 2))
    # sub-cell moves of the box do not change the result
    nudged = rois.clone()
    nudged[:, 1:] += 0.2 / scale * torch.sign(cells[:, 1:] / scale - rois[:, 1:])
    assert torch.equal(mrcnn.ops.roi_warp(x, nudged.to(device), (6, 6), scale, 2), ours)
    assert repr(mrcnn.ops.RoIWarp(6, scale, 2)).startswith("RoIWarp(output_size=6")


def test_roi_warp_gradcheck():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, 9, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = random_rois(gen, n_images=1, height=9, width=10, k=5, spatial_scale=0.5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: mrcnn.ops.roi_warp(t, rois, 3, 0.5, 2), (x,))


def test_torch_fx_traces_the_operators_as_leaves():
    # Modules call the operators through their own module's globals, which torch.fx.wrap patches;
    # a user's own function reaches them with Tracer(autowrap_functions=...), as for torchvision's.
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.align, self.pool, self.warp = mrcnn.ops.RoIAlign(3, 0.5, 2), mrcnn.ops.RoIPool(2, 0.5), mrcnn.ops.RoIWarp(2, 0.5)

        def forward(self, x, rois):
            return self.align(x, rois).sum() + self.pool(x, rois).sum() + self.warp(x, rois).sum()

    graph = torch.fx.symbolic_trace(Model())
    leaves = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert {mrcnn.ops.roi_align, mrcnn.ops.roi_pool, mrcnn.ops.roi_warp} <= leaves
    x, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]])
    assert torch.equal(graph(x, rois), Model()(x, rois))

    traced = torch.fx.Tracer(autowrap_functions=(roi_pool,)).trace(_user_fn)
    assert [n.target for n in traced.nodes if n.op == "call_function"] == [roi_pool]


def _user_fn(x, rois):  # calls the operator by a name of its own module's globals
    return roi_pool(x, rois, 2, 0.5)


def test_torch_export_keeps_our_ops_in_the_graph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.align, self.pool = mrcnn.ops.RoIAlign(3, 0.5, 2), mrcnn.ops.RoIPool(2, 0.5)

        def forward(self, x, rois):
            return self.align(x, rois).sum() + self.pool(x, rois).sum()

    x, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]])
    program = torch.export.export(Model(), (x, rois))
    ops_called = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"mrcnn.roi_align.default", "mrcnn.roi_pool.default"} <= ops_called
    assert torch.equal(program.module()(x, rois), Model()(x, rois))
