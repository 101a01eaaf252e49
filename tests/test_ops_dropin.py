"""The operators as drop-ins for torchvision's in the ways users rely on beyond plain calls:
TorchScript (functions and modules, saved and loaded), torch.fx of MultiScaleRoIAlign and
torchvision's feature extraction, quantized inputs (against torchvision's quantized kernel),
and the exception type of each malformed call next to torchvision's (the README lists where
they differ)."""

import io
import warnings

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import mrcnn.ops
from mrcnn.ops import MultiScaleRoIAlign, RoIAlign, RoIPool, RoIWarp, roi_align, roi_pool, roi_warp
from mrcnn.ops import poolers
from _roi_reference import edge_rois, random_rois, rois_to_list

POOLERS = ["roi_align_legacy", "roi_align", "roi_warp", "roi_pool"]


@pytest.fixture(autouse=True)
def _quiet():
    # torch.jit.script and quantize_per_tensor warn that they are deprecated; users still call them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _fpn_inputs(seed=0, n_images=2, k=6):
    gen = torch.Generator().manual_seed(seed)
    feats = {str(i): torch.randn(n_images, 4, 64 >> i, 48 >> i, generator=gen) for i in range(4)}
    boxes = []
    for _ in range(n_images):  # sizes from 4 to 250 px reach every level
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([150.0, 200.0])
        wh = torch.exp(torch.rand(k, 2, generator=gen) * 4.1) * 4.0
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return feats, boxes, [(256, 192)] * n_images


# ---------------------------------------------------------------- TorchScript

def _scripted_user_function(x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    # what a user's TorchScript code looks like: our functions called by name, boxes as a list
    return roi_align(x, boxes, [3, 3], 0.5, 2, True) + roi_warp(x, boxes, 3, 0.5, 2) + roi_pool(x, boxes, 3, 0.5)


def test_torchscript_functions_and_a_user_function_calling_them():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 12, 14, generator=gen)
    rois = random_rois(gen, n_images=2, height=24, width=28, k=9, spatial_scale=0.5)
    boxes = rois_to_list(rois, 2)
    for fn, args in ((roi_align, (3, 0.5, 2, True)), (roi_pool, (3, 0.5)), (roi_warp, (3, 0.5, 2))):
        scripted = torch.jit.script(fn)
        for b in (rois, boxes):
            assert torch.equal(scripted(x, b, *args), fn(x, b, *args)), fn.__name__
    user = torch.jit.script(_scripted_user_function)
    out = user(x, boxes)
    assert out.shape == (9, 3, 3, 3)
    assert torch.equal(out, _scripted_user_function(x, boxes))


@pytest.mark.parametrize("module", [RoIAlign((3, 4), 0.5, 2, aligned=True), RoIPool(3, 0.5), RoIWarp(3, 0.5, 2)],
                         ids=lambda m: type(m).__name__)
def test_torchscript_modules_save_load_and_gradients(module):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 12, 14, generator=gen, requires_grad=True)
    rois = random_rois(gen, n_images=2, height=24, width=28, k=7, spatial_scale=0.5)
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    eager = module(x, rois)
    for m in (scripted, loaded):
        out = m(x, rois)
        assert torch.equal(out, eager)
        (grad,) = torch.autograd.grad(out.sum(), x)
        (ref_grad,) = torch.autograd.grad(eager.sum(), x, retain_graph=True)
        assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("pooler", POOLERS)
def test_torchscript_multiscale_roi_align_equals_eager_and_torchvision(pooler):
    feats, boxes, shapes = _fpn_inputs(seed=3)
    eager = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, pooler=pooler)
    scripted = torch.jit.script(MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, pooler=pooler))
    out = scripted(feats, boxes, shapes)
    assert out.shape == (12, 4, 7, 7)
    assert torch.equal(out, eager(feats, boxes, shapes))
    assert scripted.scales == [0.25, 0.125, 0.0625, 0.03125]  # kept from the first call, as eager
    assert torch.equal(scripted(feats, boxes, shapes), out)  # second call reads the kept scales
    if pooler == "roi_align_legacy":
        ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        assert torch.equal(out, ref(feats, boxes, shapes))


def test_torchscript_keeps_our_error_messages():
    scripted = torch.jit.script(roi_align)
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(torch.jit.Error, match=r"boxes\[0\] must be a \[L, 4\] tensor"):
        scripted(x, [torch.zeros(2, 5)], [2, 2], 1.0, -1, False)
    with pytest.raises(Exception, match="output_size must be positive"):
        scripted(x, torch.zeros(1, 5), [0, 2], 1.0, -1, False)


# ---------------------------------------------------------------- torch.fx

def test_fx_traces_multiscale_roi_align_as_leaf_calls_before_and_after_its_first_call():
    feats, boxes, shapes = _fpn_inputs(seed=4)
    module = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    fresh = torch.fx.symbolic_trace(module)  # scales unknown: the graph infers them on every call
    leaves = [n.target for n in fresh.graph.nodes if n.op == "call_function"]
    assert leaves == [poolers._filter_input, poolers._infer_scales, poolers._multiscale_roi_align]
    assert module.scales is None  # tracing did not fix the scales on the module
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, shapes)
    assert torch.equal(fresh(feats, boxes, shapes), ref)

    module(feats, boxes, shapes)  # the scales are now kept, and traced as constants
    warm = torch.fx.symbolic_trace(module)
    leaves = [n.target for n in warm.graph.nodes if n.op == "call_function"]
    assert leaves == [poolers._filter_input, poolers._multiscale_roi_align]
    assert torch.equal(warm(feats, boxes, shapes), ref)


def test_feature_extraction_sees_the_pooler_as_one_node():
    class BoxFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.pool = MultiScaleRoIAlign(["p2", "p3"], 5, 2)
            self.align = RoIAlign(3, 0.5, 2)

        def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]):
            p2 = self.conv(torch.nn.functional.avg_pool2d(images, 4))
            p3 = torch.nn.functional.max_pool2d(p2, 2)
            pooled = self.pool({"p2": p2, "p3": p3}, boxes, [(images.shape[-2], images.shape[-1])])
            return pooled.flatten(1).relu() + self.align(images, boxes).mean()

    model = BoxFeatures().eval()
    extractor = create_feature_extractor(model, return_nodes={"pool": "pooled", "conv": "p2"})
    call_targets = [n.target for n in extractor.graph.nodes if n.op == "call_function"]
    assert poolers._multiscale_roi_align in call_targets
    assert not any(t in call_targets for t in (torch.ops.mrcnn.multilevel_roi_align, torch.cat, torch.sqrt))
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    boxes = [torch.tensor([[1.0, 2.0, 40.0, 50.0], [10.0, 10.0, 20.0, 18.0]]), torch.tensor([[0.0, 0.0, 63.0, 63.0]])]
    out = extractor(images, boxes)
    assert out["pooled"].shape == (3, 4, 5, 5)
    p2 = model.conv(torch.nn.functional.avg_pool2d(images, 4))
    expected = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 5, 2)(
        {"p2": p2, "p3": torch.nn.functional.max_pool2d(p2, 2)}, boxes, [(64, 64)])
    assert torch.equal(out["pooled"], expected)
    assert torch.equal(out["p2"], p2)


# ---------------------------------------------------------------- quantized inputs

QDTYPES = [torch.quint8, torch.qint8, torch.qint32]


def _quantize(x, rois, dtype, gen):
    scale = float(torch.empty(()).uniform_(0.005, 0.05, generator=gen))
    zero_point = {torch.quint8: 7, torch.qint8: -3, torch.qint32: 11}[dtype]
    qx = torch.quantize_per_tensor(x, scale, zero_point, dtype)
    # RoIs in the input's dtype, as torchvision's kernel takes them; 0.125 keeps box corners exact
    # and quint8's range of 0..255 covers the images below
    qrois = torch.quantize_per_tensor(rois, 0.125, 0, dtype)
    return qx, qrois


@pytest.mark.parametrize("dtype", QDTYPES, ids=str)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_quantized_input_equals_torchvision_quantized_kernel(dtype, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(hash((str(dtype), aligned, sampling_ratio)) % 2**31)
    compared = 0
    for trial in range(6):
        h, w = int(torch.randint(3, 20, (1,), generator=gen)), int(torch.randint(3, 20, (1,), generator=gen))
        scale = [1.0, 0.5, 0.25][trial % 3]
        x = torch.rand(1, 3, h, w, generator=gen) * 4 - 1
        rois = random_rois(gen, n_images=1, height=int(h / scale), width=int(w / scale), k=8, spatial_scale=scale)
        if trial % 2:  # boxes on and past the edges, empty and inverted ones
            edges = edge_rois(h, w, scale, torch.float32)
            if aligned and sampling_ratio <= 0:
                # torchvision's quantized kernel fails on inverted boxes there (a negative sample
                # count sizes a vector); ours pools them to the zero point, as its float kernel to 0
                inverted = (edges[:, 3] < edges[:, 1]) | (edges[:, 4] < edges[:, 2])
                qx, qe = _quantize(torch.rand(1, 3, h, w, generator=gen), edges[inverted].clamp(0, 30), dtype, gen)
                assert torch.equal(roi_align(qx, qe, 2, scale, sampling_ratio, True).int_repr(),
                                   torch.full((int(inverted.sum()), 3, 2, 2), qx.q_zero_point(),
                                              dtype=qx.int_repr().dtype))
                edges = edges[~inverted]
            rois = torch.cat([rois, edges])
        qx, qrois = _quantize(x, rois.clamp(min=0, max=30), dtype, gen)
        ours = roi_align(qx, qrois, (3, 4), scale, sampling_ratio, aligned)
        ref = torchvision.ops.roi_align(qx, qrois, (3, 4), scale, sampling_ratio, aligned)
        assert ours.dtype == dtype and ours.q_scale() == qx.q_scale() and ours.q_zero_point() == qx.q_zero_point()
        assert torch.equal(ours.int_repr(), ref.int_repr()), (trial, h, w, scale)
        compared += ours.numel()
        # the module form takes them too
        assert torch.equal(RoIAlign((3, 4), scale, sampling_ratio, aligned)(qx, qrois).int_repr(), ours.int_repr())
    assert compared >= 6 * 8 * 3 * 12


def test_quantized_bad_calls_name_the_problem():
    x = torch.rand(2, 3, 8, 8)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])
    q2 = torch.quantize_per_tensor(x, 0.01, 0, torch.quint8)
    qrois = torch.quantize_per_tensor(rois, 0.125, 0, torch.quint8)
    with pytest.raises(ValueError, match="quantized input must hold one image"):
        roi_align(q2, qrois, 2)
    with pytest.raises(RuntimeError, match="does not match the quantized input dtype"):
        roi_align(q2[:1], rois, 2)
    per_channel = torch.quantize_per_channel(x[:1], torch.full((3,), 0.01), torch.zeros(3, dtype=torch.long), 1,
                                             torch.quint8)
    with pytest.raises(RuntimeError, match="per-tensor affine"):
        roi_align(per_channel, qrois, 2)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(q2[:1], torch.quantize_per_tensor(torch.tensor([[1.0, 1, 1, 6, 6]]), 0.125, 0, torch.quint8), 2)


# ---------------------------------------------------------------- malformed calls

_X = torch.rand(2, 3, 10, 10)
_ROIS = torch.tensor([[0, 0.5, 0.5, 6.3, 7.1]])
_BOXES = [torch.tensor([[0.5, 0.5, 6.3, 7.1]]), torch.zeros(0, 4)]

# name: (a call given a module of operators, our exception type and message, torchvision's type;
# None where torchvision accepts the call). The README lists the rows where the types differ.
MALFORMED = {
    "feature map not 4-D": (lambda m: m.roi_align(_X[0], _ROIS, 3), ValueError, "must be 4-D", RuntimeError),
    "input not a tensor": (lambda m: m.roi_align([1.0], _ROIS, 3), TypeError, "input must be a Tensor", AttributeError),
    "rois tensor not [K, 5]": (lambda m: m.roi_align(_X, _ROIS[:, 1:], 3), ValueError, r"\[K, 5\] tensor",
                               AssertionError),
    "a list entry not [L, 4]": (lambda m: m.roi_align(_X, [_ROIS], 3), ValueError, r"boxes\[0\] must be",
                                AssertionError),
    "boxes neither tensor nor list": (lambda m: m.roi_align(_X, 5, 3), TypeError, "boxes must be a Tensor",
                                      AssertionError),
    "rois dtype differs from input": (lambda m: m.roi_align(_X, _ROIS.double(), 3), RuntimeError,
                                      "does not match", RuntimeError),
    "integer feature map": (lambda m: m.roi_align(_X.long(), _ROIS.long(), 3), RuntimeError, "floating point",
                            RuntimeError),
    "batch index out of range": (lambda m: m.roi_align(_X, torch.tensor([[5.0, 0, 0, 3, 3]]), 3), ValueError,
                                 "batch index 5", None),
    "non-finite box": (lambda m: m.roi_align(_X, torch.tensor([[0.0, float("nan"), 0, 3, 3]]), 3), ValueError,
                       "non-finite", ValueError),
    "output_size 0": (lambda m: m.roi_align(_X, _ROIS, 0), ValueError, "output_size must be positive", None),
    "negative output_size": (lambda m: m.roi_align(_X, _ROIS, (-1, 2)), ValueError, "output_size must be positive",
                             RuntimeError),
    "empty box list": (lambda m: m.roi_align(_X, [], 3), ValueError, "empty list", ValueError),
    "roi_pool: batch index out of range": (lambda m: m.roi_pool(_X, torch.tensor([[5.0, 0, 0, 3, 3]]), 3),
                                           ValueError, "batch index 5", None),
    "MultiScaleRoIAlign: no image_shapes": (lambda m: m.MultiScaleRoIAlign(["0"], 3, 2)({"0": _X}, _BOXES, []),
                                            ValueError, "image_shapes is empty", ValueError),
    "MultiScaleRoIAlign: no named map": (lambda m: m.MultiScaleRoIAlign(["a"], 3, 2)({"0": _X}, _BOXES, [(40, 40)]),
                                         ValueError, "none of the feature maps", IndexError),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_call_exception_types_next_to_torchvision(case):
    call, ours, message, theirs = MALFORMED[case]
    with pytest.raises(ours, match=message):
        call(mrcnn.ops)
    if theirs is None:  # torchvision accepts it (reads out of bounds, or returns an empty output)
        call(torchvision.ops)
    else:
        with pytest.raises(theirs):
            call(torchvision.ops)
