"""Training mode on CPU: the five torchvision loss terms, gradients where (and only where) parameters
train, a loss that falls over a few SGD steps, and the edge cases of inference.

A small configuration (min_size 128-160, fewer RPN/RoI samples) keeps each test to seconds; the
backbone starts from a random "ImageNet" ResNet-50 state_dict file so the pretrained-backbone path
(FrozenBatchNorm2d, trainable_backbone_layers) is the one exercised.
"""
import math

import pytest
import torch
import torchvision

import mrcnn

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
SMALL = dict(
    min_size=128,
    max_size=192,
    rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=300,
    # the mask head costs ~1 GFLOP per RoI: few sampled RoIs in training, few detections in eval
    box_batch_size_per_image=32,
    box_detections_per_img=10,
)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A random ResNet-50 whose BatchNorm statistics are calibrated on random images, so that with
    FrozenBatchNorm2d its activations stay normalised as a trained network's do."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    resnet.train()
    with torch.no_grad():
        for _ in range(2):
            resnet(torch.randn(4, 3, 96, 96))
    path = tmp_path_factory.mktemp("weights") / "resnet50_random.pth"
    torch.save(resnet.state_dict(), path)
    return str(path)


def _synthetic(h, w, shapes, seed):
    """An image with filled rectangles/ellipses on a noisy background, and its target."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) * 0.2
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    masks, boxes, labels = [], [], []
    for kind, (x1, y1, x2, y2), label in shapes:
        if kind == "rect":
            m = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        else:
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            m = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
        image[:, m] = torch.rand(3, 1, generator=g) * 0.6 + 0.4
        ys, xs = torch.where(m)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
        masks.append(m.to(torch.uint8))
        labels.append(label)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks),
    }
    return image, target


def _two_images():
    a = _synthetic(120, 160, [("rect", (10, 15, 70, 80), 1), ("ellipse", (80, 30, 150, 110), 2)], seed=1)
    b = _synthetic(144, 112, [("ellipse", (5, 5, 60, 50), 3), ("rect", (40, 60, 100, 140), 1), ("rect", (70, 5, 108, 40), 2)], seed=2)
    return [a[0], b[0]], [a[1], b[1]]


def test_training_step_losses_and_gradients(resnet50_file):
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(
        num_classes=4, weights_backbone=resnet50_file, trainable_backbone_layers=2, **SMALL
    ).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # trainable_backbone_layers=2: layer3 and layer4 train, conv1/layer1/layer2 do not
    assert any(n.startswith("backbone.body.layer4.") for n in trainable)
    assert any(n.startswith("backbone.body.layer3.") for n in trainable)
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1.", "backbone.body.layer2.")) for n in trainable)
    assert any(n.startswith("backbone.body.layer2.") for n in frozen) and len(frozen) > 0

    images, targets = _two_images()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{name} = {value}"
    total = sum(losses.values())
    assert total.item() > 0
    total.backward()

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01).step()
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), f"frozen {name} changed"
    # FrozenBatchNorm2d statistics are buffers and must not move either
    assert all(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for n, m in model.backbone.body.named_modules() if "bn" in n)


# ten forward/backward passes: ~15 s of CPU, 30-40 s wall on the shared CI box
@pytest.mark.slow
def test_sgd_steps_reduce_the_loss(resnet50_file):
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(
        num_classes=4, weights_backbone=resnet50_file, trainable_backbone_layers=0, **SMALL
    ).train()
    image, target = _synthetic(128, 128, [("rect", (16, 20, 70, 90), 1), ("ellipse", (60, 50, 120, 120), 2)], seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    totals = []
    for _ in range(10):
        losses = model([image], [target])
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        # randomly initialised heads start with a large mask loss; clipping keeps the first steps sane
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals), totals
    # the same image every step: the heads fit it quickly
    assert totals[-1] < 0.5 * totals[0], totals


def test_background_only_image_trains():
    """An image with no objects (empty boxes/masks) is valid training data, as in torchvision."""
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, **SMALL).train()
    image = torch.rand(3, 96, 128)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64), "masks": torch.zeros((0, 96, 128), dtype=torch.uint8)}
    losses = model([image], [target])
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0 and losses["loss_mask"].item() == 0


@pytest.fixture(scope="module")
def eval_model():
    torch.manual_seed(0)
    return mrcnn.maskrcnn_resnet50_fpn(num_classes=5, box_score_thresh=0.0, **SMALL).eval()


@pytest.mark.parametrize("mask_output", ["probs", "binary", "raw"])
def test_no_detections_gives_empty_outputs(eval_model, mask_output):
    eval_model.roi_heads.score_thresh = 1.0  # softmax scores never exceed 1
    eval_model.mask_output = mask_output
    try:
        with torch.no_grad():
            out = eval_model([torch.rand(3, 60, 90)])
    finally:
        eval_model.roi_heads.score_thresh = 0.0
        eval_model.mask_output = "probs"
    r = out[0]
    assert r["boxes"].shape == (0, 4) and r["boxes"].dtype == torch.float32
    assert r["labels"].shape == (0,) and r["labels"].dtype == torch.int64
    assert r["scores"].shape == (0,) and r["scores"].dtype == torch.float32
    expected = {"probs": ((0, 1, 60, 90), torch.float32), "binary": ((0, 1, 60, 90), torch.bool), "raw": ((0, 1, 28, 28), torch.float32)}
    assert (tuple(r["masks"].shape), r["masks"].dtype) == expected[mask_output]


@pytest.mark.parametrize("size", [(20, 24), (40, 1000), (1000, 40), (1, 1)])
def test_tiny_and_elongated_images(eval_model, size):
    h, w = size
    with torch.no_grad():
        r = eval_model([torch.rand(3, h, w)])[0]
    n = len(r["boxes"])
    assert n > 0  # score threshold 0: every image yields detections
    assert r["masks"].shape == (n, 1, h, w)
    # boxes are in input-image pixels, inside the image
    assert (r["boxes"][:, 0::2] >= 0).all() and (r["boxes"][:, 0::2] <= w).all()
    assert (r["boxes"][:, 1::2] >= 0).all() and (r["boxes"][:, 1::2] <= h).all()


def test_bad_inputs_are_rejected(eval_model):
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        eval_model([torch.rand(1, 3, 32, 32)])
    with pytest.raises(TypeError, match="float"):
        eval_model([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, **SMALL).train()
    with pytest.raises(ValueError, match="targets are required"):
        model([torch.rand(3, 32, 32)])
    bad = {"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([1]), "masks": torch.zeros(1, 32, 32, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="positive height and width"):
        model([torch.rand(3, 32, 32)], [bad])


def test_training_as_jobs_train_lays_it_out_on_cuda_feeds_roi_align_the_pyramid_as_it_is(monkeypatch):
    # jobs.train trains channels-last on CUDA so that the CUDA RoIAlign, which reads NHWC, makes
    # no transposed copy of the pyramid per call: every map the box and mask heads pool from
    # arrives channels-last contiguous (checked here on CPU, where the layout propagates alike).
    from types import SimpleNamespace

    from jobs.train.loop import model_layout
    from mrcnn.ops import poolers

    assert model_layout(torch.device("cuda")) == torch.channels_last
    assert model_layout(torch.device("cpu")) == torch.contiguous_format
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=4, **SMALL).train().to(memory_format=model_layout("cuda"))
    seen, ops = [], poolers.ops

    def multilevel_roi_align(features, *args):
        seen.extend(f.is_contiguous(memory_format=torch.channels_last) for f in features)
        return ops.multilevel_roi_align(features, *args)

    proxy = SimpleNamespace(multilevel_roi_align=multilevel_roi_align, roi_align=ops.roi_align, roi_pool=ops.roi_pool)
    monkeypatch.setattr(poolers, "ops", proxy)
    images, targets = _two_images()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert len(seen) == 8 and all(seen), seen  # box and mask heads, four levels each
