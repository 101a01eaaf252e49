"""Reduced precision (CPU autocast, bf16 and fp16) keeps box geometry in float32, and the
FrozenBatchNorm ResNets keep their activations in the autocast dtype.

At 800x1333 coordinates reach 1333 px, where bf16 steps are 8 px. Against the fp32 run of the
same model: anchors are exactly fp32's; every anchor's decoded box is within 0.1 px of fp32's;
the proposals RoIAlign pools are fp32 and nearly all have an fp32 twin (IoU >= 0.9); at least 90
of fp32's 100 detections have a same-class twin at IoU >= 0.9; outputs are float32; Keypoint
R-CNN's keypoints are fp32's within 1 px. Per-class NMS suppresses exact duplicates of class ids
>= 50, and no two detections of one class overlap beyond its threshold (batched_nms offsets boxes
by class id x (max coordinate + 1), which bf16/fp16 boxes cannot hold). Under autocast no
activation of the FrozenBatchNorm ResNet-50 body is fp32, and at fp32 the model is torchvision's
bit for bit.

The detector is the library's MaskRCNN (transform, RPN, RoI heads, RoIAlign, post-processing) on
a tiny 16-channel backbone with small heads: CPUs without bf16/fp16 instructions run reduced-
precision convolutions ~60x slower than fp32 (a ResNet-50-FPN forward at 800x1333 takes minutes),
and the geometry under test does not depend on the backbone. Seeded random weights;
box_score_thresh 0.0 so every run reaches 100 detections.
"""
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d as TVFrozenBatchNorm2d
from torchvision.ops import box_iou

from _detection_compare import smooth_images
from mrcnn import KeypointRCNN, MaskRCNN
from mrcnn._utils import BoxCoder
from mrcnn.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from mrcnn.ops import MultiScaleRoIAlign
from mrcnn.registry import build_model
from mrcnn.roi_heads import FastRCNNPredictor, MaskRCNNHeads, MaskRCNNPredictor, RoIHeads, TwoMLPHead

IMAGE = (800, 1333)  # (h, w): kept at this size by the default transform (min 800, max 1333)
CHANNELS = 16
NUM_CLASSES = 91
DETECTIONS = 100
PROPOSALS = 300  # the RPN's post-NMS count (default 1000): 300 x 90 candidates keep post-processing short
REDUCED = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


class TinyFPN(nn.Module):
    """Five maps at strides 4-64 named as the ResNet-FPN's ('0'-'3', 'pool'), from strided convs."""

    def __init__(self, channels: int = CHANNELS):
        super().__init__()
        self.out_channels = channels
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 4, stride=4), nn.ReLU())
        self.down = nn.ModuleList(nn.Conv2d(channels, channels, 2, stride=2) for _ in range(3))

    def forward(self, x):
        f = self.stem(x)
        out = OrderedDict([("0", f)])
        for i, down in enumerate(self.down):
            f = down(f)
            out[str(i + 1)] = f
        out["pool"] = F.max_pool2d(f, 1, 2, 0)
        return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaskRCNN(
        TinyFPN(), None, box_score_thresh=0.0, box_detections_per_img=DETECTIONS, rpn_post_nms_top_n_test=PROPOSALS,
        box_head=TwoMLPHead(CHANNELS * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, NUM_CLASSES),
        mask_head=MaskRCNNHeads(CHANNELS, (CHANNELS, CHANNELS), 1),
        mask_predictor=MaskRCNNPredictor(CHANNELS, CHANNELS, NUM_CLASSES),
        mask_output="raw",
    ).eval()


def _forward(model, dtype, image):
    """The outputs, and what the model made on the way: anchors, every anchor's decoded box (before
    top-k) and the boxes given to the box and mask RoIAlign."""
    seen = {}

    # the hooks return None, so they change nothing
    def output_of(key):
        def hook(module, args, output):
            seen[key] = output[0]  # image 0's anchors
        return hook

    def boxes_into(key):
        def hook(module, args):
            seen[key] = args[1][0]  # (features, boxes, image_shapes): image 0's boxes
        return hook

    hooks = [
        model.rpn.anchor_generator.register_forward_hook(output_of("anchors")),
        model.roi_heads.box_roi_pool.register_forward_pre_hook(boxes_into("rois")),
        model.roi_heads.mask_roi_pool.register_forward_pre_hook(boxes_into("mask_rois")),
    ]
    filter_proposals = model.rpn.filter_proposals

    def spy(proposals, *args):
        seen["decoded"] = proposals[0]
        return filter_proposals(proposals, *args)

    model.rpn.filter_proposals = spy
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            seen["out"] = model([image])[0]
    finally:
        del model.rpn.filter_proposals
        for h in hooks:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def image():
    return smooth_images([IMAGE])[0]


@pytest.fixture(scope="module")
def runs(model, image):
    """fp32, bf16 and fp16 runs of the same model on the same image (a few seconds each on 2 cores)."""
    return {dtype: _forward(model, dtype, image) for dtype in (None, torch.bfloat16, torch.float16)}


def _matched_iou(ref, out):
    """For each of ``ref``'s detections, the best IoU among ``out``'s detections of its class."""
    iou = box_iou(ref["boxes"], out["boxes"].float())
    same_class = ref["labels"][:, None] == out["labels"][None, :]
    return torch.where(same_class, iou, torch.zeros_like(iou)).max(dim=1).values


@pytest.mark.parametrize("dtype", REDUCED)
def test_anchors_are_fp32_and_exact(runs, dtype):
    ref, got = runs[None]["anchors"], runs[dtype]["anchors"]
    assert ref.dtype == got.dtype == torch.float32
    # 3 anchors per cell of the 200x336, 100x168, 50x84, 25x42 and 13x21 maps of the 800x1344 batch
    assert len(ref) == 3 * (200 * 336 + 100 * 168 + 50 * 84 + 25 * 42 + 13 * 21) == 268569
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", REDUCED)
def test_proposals_keep_fp32_geometry(runs, dtype):
    ref, got = runs[None], runs[dtype]
    # every anchor's box before top-k: fp32, off only by what bf16 features do to the (small) deltas
    assert got["decoded"].dtype == torch.float32 and got["decoded"].shape == ref["decoded"].shape == (268569, 4)
    diff = (got["decoded"] - ref["decoded"]).abs().max().item()
    assert diff <= 0.1, f"decoded anchors differ from fp32's by up to {diff:.3f} px"
    # the proposals RoIAlign pools: fp32, and nearly all of fp32's have a twin
    assert got["rois"].dtype == got["mask_rois"].dtype == torch.float32
    n = len(ref["rois"])
    assert n == PROPOSALS
    best = box_iou(ref["rois"], got["rois"]).max(dim=1).values
    matched = int((best >= 0.9).sum())
    assert matched >= 0.9 * n, f"{matched} of {n} fp32 proposals have a twin at IoU >= 0.9 (mean IoU {best.mean():.3f})"


@pytest.mark.parametrize("dtype", REDUCED)
def test_detections_match_fp32(runs, dtype):
    ref, got = runs[None]["out"], runs[dtype]["out"]
    assert len(ref["boxes"]) == len(got["boxes"]) == DETECTIONS
    best = _matched_iou(ref, got)
    matched = best[best >= 0.9]
    assert len(matched) >= 0.9 * DETECTIONS, (
        f"{len(matched)} of {DETECTIONS} fp32 detections have a same-class twin at IoU >= 0.9 "
        f"(IoU mean {best.mean():.3f}, min {best.min():.3f})")
    assert matched.mean() >= 0.99


@pytest.mark.parametrize("dtype", REDUCED)
def test_outputs_are_float32(runs, dtype):
    out = runs[dtype]["out"]
    assert len(out["boxes"]) == DETECTIONS
    assert out["masks"].shape == (DETECTIONS, 1, 28, 28)
    for key in ("boxes", "scores", "masks"):
        assert out[key].dtype == torch.float32, key
        assert torch.isfinite(out[key]).all(), key


def _forward_keypoints(model, dtype, image):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return model([image])[0]


def test_keypoints_match_fp32(image):
    """Keypoint R-CNN on the same tiny backbone: keypoints and boxes are float32, at least 18 of
    fp32's 20 detections have a twin (IoU >= 0.9), and 90% of their keypoints are within 1 px of
    fp32's (the rest: heatmap argmaxes that bf16 features move to another cell)."""
    torch.manual_seed(0)
    model = KeypointRCNN(
        TinyFPN(), None, min_size=800, box_score_thresh=0.0, box_detections_per_img=20,
        rpn_post_nms_top_n_test=PROPOSALS, box_head=TwoMLPHead(CHANNELS * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, 2), keypoint_head=KeypointRCNNHeads(CHANNELS, (CHANNELS, CHANNELS)),
        keypoint_predictor=KeypointRCNNPredictor(CHANNELS, 17),
    ).eval()
    ref = _forward_keypoints(model, None, image)
    assert len(ref["boxes"]) == 20
    for dtype in (torch.bfloat16, torch.float16):
        got = _forward_keypoints(model, dtype, image)
        for key in ("boxes", "scores", "keypoints", "keypoints_scores"):
            assert got[key].dtype == torch.float32, (dtype, key)
        iou = box_iou(ref["boxes"], got["boxes"])
        same_class = ref["labels"][:, None] == got["labels"][None, :]
        best, twin = torch.where(same_class, iou, torch.zeros_like(iou)).max(dim=1)
        matched = best >= 0.9
        assert int(matched.sum()) >= 18, f"{dtype}: {int(matched.sum())} of 20 detections have a twin"
        error = (got["keypoints"][twin[matched], :, :2] - ref["keypoints"][matched, :, :2]).abs().amax(dim=-1)
        close = float((error <= 1.0).float().mean())
        assert close >= 0.9, f"{dtype}: {close:.1%} of {error.numel()} keypoints within 1 px of fp32's"


@pytest.mark.parametrize("dtype", REDUCED)
def test_box_decoding_keeps_fp32_reference_boxes(dtype):
    """Deltas in the autocast dtype against fp32 boxes decode in fp32: zero deltas give the boxes
    back exactly (not rounded to bf16's 8 px steps beyond 1024 px)."""
    boxes = torch.tensor([[1101.0, 603.0, 1329.0, 797.0], [517.0, 9.0, 1031.0, 411.0], [3.0, 5.0, 45.0, 67.0]])
    codes = torch.zeros(3, 4, dtype=dtype)
    for coder in (BoxCoder((1.0, 1.0, 1.0, 1.0)), BoxCoder((10.0, 10.0, 5.0, 5.0))):
        decoded = coder.decode_single(codes, boxes)
        assert decoded.dtype == torch.float32
        assert torch.equal(decoded, boxes)


@pytest.mark.parametrize("dtype", REDUCED)
def test_nms_suppresses_duplicates_of_high_class_ids(dtype):
    """RoI heads whose predictor scores classes 50-90 alike, on 4 exact copies of each of 3 disjoint
    boxes: each class keeps each box once. 12 x 41 candidates (< 1000) take batched_nms's
    coordinate-offset path, whose offsets (class id x 1331) collapse bf16/fp16 boxes."""
    torch.manual_seed(0)
    predictor = FastRCNNPredictor(32, NUM_CLASSES)
    with torch.no_grad():
        for p in (predictor.cls_score.weight, predictor.bbox_pred.weight, predictor.bbox_pred.bias):
            p.zero_()  # logits = bias and zero deltas: the boxes are the proposals themselves
        predictor.cls_score.bias.fill_(-20.0)
        predictor.cls_score.bias[50:] = 0.0
    heads = RoIHeads(MultiScaleRoIAlign(["0"], 7, 2), TwoMLPHead(CHANNELS * 7 * 7, 32), predictor,
                     0.5, 0.5, 512, 0.25, None, score_thresh=0.01, nms_thresh=0.5, detections_per_img=1000).eval()
    features = {"0": torch.rand(1, CHANNELS, 200, 336)}  # stride 4 over the padded 800x1344 image
    distinct = torch.tensor([[40.0, 30.0, 240.0, 210.0], [620.0, 300.0, 800.0, 470.0], [1100.0, 600.0, 1330.0, 790.0]])
    proposals = [distinct.repeat_interleave(4, dim=0)]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        result, _ = heads(features, proposals, [IMAGE])
    out = result[0]
    classes = range(50, NUM_CLASSES)
    assert sorted(set(out["labels"].tolist())) == list(classes)
    for c in classes:
        kept = out["boxes"][out["labels"] == c]
        assert len(kept) == len(distinct), f"class {c}: {len(kept)} boxes kept of 3 distinct ones"
        assert torch.equal(kept[kept[:, 0].argsort()].float(), distinct), c
    assert len(out["boxes"]) == len(distinct) * len(classes) == 123


@pytest.mark.parametrize("dtype", REDUCED)
def test_model_keeps_no_overlapping_boxes_of_one_class(model, image, dtype):
    """The whole model, its RPN giving 5 pairs of proposals (IoU 0.82 within a pair) spread to the
    image's far corner: 10 x 90 candidates (< 1000) take batched_nms's coordinate-offset path, and
    no two detections of one class may overlap beyond the NMS threshold."""
    base = torch.tensor([[60.0, 40.0, 260.0, 240.0], [400.0, 100.0, 600.0, 300.0], [700.0, 350.0, 900.0, 550.0],
                         [1000.0, 450.0, 1200.0, 650.0], [1118.0, 582.0, 1318.0, 782.0]])
    proposals = torch.cat([base, base + torch.tensor([12.0, 8.0, 12.0, 8.0])])
    model.rpn.forward = lambda images, features, targets=None: ([proposals], {})
    try:
        out = _forward(model, dtype, image)["out"]
    finally:
        del model.rpn.forward
    assert len(out["boxes"]) == DETECTIONS
    assert int((out["labels"] >= 50).sum()) >= 20
    thresh = model.roi_heads.nms_thresh
    pairs = 0
    for c in out["labels"].unique():
        boxes = out["boxes"][out["labels"] == c].float()
        iou = box_iou(boxes, boxes).triu(diagonal=1)
        pairs += len(boxes) * (len(boxes) - 1) // 2
        assert iou.max() <= thresh + 1e-6, f"class {int(c)}: two kept boxes overlap at IoU {iou.max():.3f}"
    assert pairs >= 20  # same-class pairs compared


# ---- FrozenBatchNorm2d -------------------------------------------------------------------------

SMALL = dict(min_size=128, max_size=192, box_score_thresh=0.0, box_detections_per_img=10,
             rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200)


@pytest.fixture(scope="module")
def frozen_pair():
    """torchvision's Mask R-CNN ResNet-50-FPN as its COCO weights are used (FrozenBatchNorm2d, here
    with non-trivial statistics) and ours built for loaded weights, with its state_dict."""
    torch.manual_seed(0)
    backbone = tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    for m in backbone.modules():
        if isinstance(m, TVFrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
    tv = TVMaskRCNN(backbone, num_classes=NUM_CLASSES, **SMALL).eval()
    ours = build_model("maskrcnn_resnet50_fpn", num_classes=NUM_CLASSES, pretrained=True, **SMALL)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours.eval()


def test_frozen_batchnorm_fp32_is_torchvisions_bit_for_bit(frozen_pair):
    tv, ours = frozen_pair
    frozen = [m for m in ours.backbone.body.modules() if isinstance(m, TVFrozenBatchNorm2d)]
    assert len(frozen) == 53  # every norm layer of the ResNet-50 (isinstance holds for checkpoint.py)
    assert list(ours.state_dict()) == list(tv.state_dict())
    images = smooth_images([(120, 160)], seed=5)
    with torch.no_grad():
        expected, got = tv(images)[0], ours(images)[0]
    assert len(expected["boxes"]) == 10
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("dtype", REDUCED)
def test_frozen_batchnorm_keeps_the_autocast_dtype(frozen_pair, dtype):
    """Every module of the ResNet-50 body (convs, FrozenBatchNorm, ReLU, the blocks whose output
    is the residual add + ReLU, the stages) gives ``dtype`` under autocast: nothing between
    convolutions is fp32."""
    body = frozen_pair[1].backbone.body
    outputs = []

    def record(name):
        def hook(module, args, out):
            values = out.values() if isinstance(out, dict) else [out]
            outputs.extend((name, type(module).__name__, v.dtype) for v in values)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in body.named_modules()]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            body(torch.rand(1, 3, 96, 128))
    finally:
        for h in hooks:
            h.remove()
    wrong = [(name, kind, str(d)) for name, kind, d in outputs if d != dtype]
    assert not wrong, f"{len(wrong)} of {len(outputs)} module outputs are not {dtype}: {wrong[:5]}"
    kinds = {kind for _, kind, _ in outputs}
    assert {"Conv2d", "FrozenBatchNorm2d", "ReLU", "Bottleneck", "MaxPool2d"} <= kinds
    # 53 norm layers, 53 convs, 49 ReLU calls, 16 blocks, 4 stages, 4 downsample branches, maxpool, the body
    assert len(outputs) == 53 + 53 + 49 + 16 + 4 + 4 + 1 + 4


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roi_pool_pooler_keeps_fp32_corners(levels, dtype):
    # RoIPool rounds box corners to the grid; in bf16/fp16 a 1333-px coordinate is off by up to 4 px
    # before that rounding. The pooler must pool the reduced-precision features with fp32 boxes.
    g = torch.Generator().manual_seed(0)
    names = [f"p{i}" for i in range(levels)]
    feats = OrderedDict((n, torch.randn(1, 8, 200 >> i, 334 >> i, generator=g).to(dtype)) for i, n in enumerate(names))
    xy = torch.rand(400, 2, generator=g) * torch.tensor([1200.0, 700.0])
    wh = 8 + torch.rand(400, 2, generator=g) * 120
    boxes = [torch.cat([xy, xy + wh], dim=1)]
    pooler = MultiScaleRoIAlign(names, 7, 2, pooler="roi_pool")
    out = pooler(feats, boxes, [IMAGE])
    assert out.dtype == dtype and out.shape == (400, 8, 7, 7)
    # the reference: the same values pooled in fp32 from fp32 boxes (a maximum is exact in any dtype)
    ref = MultiScaleRoIAlign(names, 7, 2, pooler="roi_pool")(
        OrderedDict((n, f.float()) for n, f in feats.items()), boxes, [IMAGE])
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0)
    # non-vacuous: boxes rounded to the reduced dtype pool other cells for many of the 400 RoIs
    rounded = MultiScaleRoIAlign(names, 7, 2, pooler="roi_pool")(
        OrderedDict((n, f.float()) for n, f in feats.items()), [b.to(dtype).float() for b in boxes], [IMAGE])
    assert (rounded != ref).flatten(1).any(dim=1).sum() >= 50
