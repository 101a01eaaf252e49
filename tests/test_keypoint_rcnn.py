"""Keypoint R-CNN gives torchvision's results given the same weights (CPU, fp32), trains with
torchvision's losses, and loads torchvision's keypoint checkpoints (current and pre-0.13 key names,
with the FrozenBatchNorm eps each published COCO file needs).

As in test_model_equivalence: seeded random weights copied with strict=True, box_score_thresh=0.0
so every image reaches box_detections_per_img detections (20 here: the 8 x 512 conv keypoint head
costs ~4 GFLOP a detection), small images; every test asserts how many items it compared.
"""
from collections import OrderedDict

import pytest
import torch
import torchvision
import torchvision.models.detection as tvd
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import mrcnn
from _detection_compare import run_both, smooth_images
from mrcnn.checkpoint import load_model, read_metadata, save_checkpoint

DETECTIONS = 20
SETTINGS = dict(min_size=160, max_size=256, box_score_thresh=0.0, rpn_pre_nms_top_n_test=300,
                rpn_post_nms_top_n_test=300, box_detections_per_img=DETECTIONS)
IMAGE_SIZES = [(200, 300), (40, 1000), (500, 130), (24, 20)]


def _images(sizes=IMAGE_SIZES, seed=1234):
    return smooth_images(sizes, seed)


def _assert_same_detections(ours, theirs, *, exact=True) -> int:
    compared = 0
    for a, b in zip(ours, theirs, strict=True):
        assert sorted(a) == sorted(b) == ["boxes", "keypoints", "keypoints_scores", "labels", "scores"]
        n = len(b["boxes"])
        assert a["keypoints"].shape == (n, 17, 3) and a["keypoints_scores"].shape == (n, 17)
        for key in b:
            if exact:
                assert torch.equal(a[key], b[key]), key
            else:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3 if key != "labels" else 0)
        compared += n
    return compared


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tv = tvd.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, **SETTINGS)
    ours = mrcnn.keypointrcnn_resnet50_fpn(**SETTINGS)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv.eval(), ours.eval()


@pytest.mark.parametrize("batching", ["batched", pytest.param("one_at_a_time", marks=pytest.mark.slow)])
def test_same_outputs_as_torchvision(pair, batching):
    tv, ours = pair
    images = _images()
    tv_out, our_out, n_props = run_both(tv, ours, images, batching)  # proposals exactly equal
    assert n_props >= 100 * len(images)
    for (h, w), r in zip(IMAGE_SIZES, tv_out):
        assert len(r["boxes"]) == DETECTIONS, f"torchvision found {len(r['boxes'])} detections on {h}x{w}"
        # keypoints in input-image pixels, inside their boxes (boxes under a pixel wide count as one)
        k, b = r["keypoints"], r["boxes"]
        assert (k[..., 0] >= b[:, None, 0]).all() and (k[..., 0] <= b[:, None, 0] + (b[:, None, 2] - b[:, None, 0]).clamp(min=1)).all()
    assert _assert_same_detections(our_out, tv_out) == DETECTIONS * len(images)


def test_same_training_losses_and_gradients_as_torchvision(pair):
    tv, ours = pair
    images = _images([(96, 128), (120, 100)], seed=7)
    targets = []
    for image in images:
        h, w = image.shape[1:]
        keypoints = torch.rand(2, 17, 3, generator=torch.Generator().manual_seed(h)) * torch.tensor([w, h, 1.0])
        keypoints[..., 2] = (keypoints[..., 2] > 0.3).float() * 2  # about 70% labelled, as visible (2)
        boxes = torch.stack([keypoints[..., 0].amin(1), keypoints[..., 1].amin(1),
                             keypoints[..., 0].amax(1) + 1, keypoints[..., 1].amax(1) + 1], dim=1)
        targets.append({"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "keypoints": keypoints})
    losses = []
    for model in (tv, ours):
        model.train()
        model.zero_grad()
        torch.manual_seed(3)  # the RoI and anchor samplers draw the same samples
        out = model(images, targets)
        sum(out.values()).backward()
        losses.append(out)
        model.eval()
    theirs, mine = losses
    assert sorted(mine) == sorted(theirs) and "loss_keypoint" in mine and len(mine) == 5
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert mine["loss_keypoint"] > 0
    head = dict(ours.named_parameters())
    compared = 0
    for name, p in tv.named_parameters():
        if p.grad is not None and name.startswith("roi_heads.keypoint"):
            torch.testing.assert_close(head[name].grad, p.grad, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == 18  # 8 convs and the predictor, weight and bias each


def test_keypoint_targets_are_checked(pair):
    _, ours = pair
    ours.train()
    try:
        image = torch.rand(3, 64, 64)
        target = {"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([1])}
        with pytest.raises(ValueError, match="target 0 has no 'keypoints' entry"):
            ours([image], [target])
        with pytest.raises(TypeError, match="keypoints must be float32"):
            ours([image], [{**target, "keypoints": torch.zeros(1, 17, 3, dtype=torch.float64)}])
    finally:
        ours.eval()


# ---- checkpoints --------------------------------------------------------------------------------

CKPT_SETTINGS = dict(min_size=128, max_size=192, box_score_thresh=0.0, box_detections_per_img=10,
                     rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200)


@pytest.fixture(scope="module")
def frozen_tv():
    """A torchvision Keypoint R-CNN as its COCO files are used: FrozenBatchNorm2d with non-trivial stats."""
    torch.manual_seed(1)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
    return tvd.KeypointRCNN(backbone, num_classes=2, **CKPT_SETTINGS).eval()


def _legacy(state_dict):
    """The key names of files written before torchvision 0.13, as both published keypoint COCO files."""
    out = OrderedDict()
    for k, v in state_dict.items():
        parts = k.split(".")
        if k.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            k = ".".join(parts[:4] + parts[5:])
        elif k.startswith("rpn.head.conv.0.0."):
            k = "rpn.head.conv." + parts[-1]
        out[k] = v
    return out


def _outputs(model):
    with torch.no_grad():
        return model.eval()(_images([(150, 200), (90, 160)], seed=5))


def _reference(state_dict, eps):
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    model = tvd.KeypointRCNN(backbone, num_classes=2, **CKPT_SETTINGS)
    model.load_state_dict(state_dict)  # torchvision's own remapping of the old names
    if eps is not None:
        torchvision.models.detection._utils.overwrite_eps(model, eps)
    return model


@pytest.mark.parametrize("filename, key_names, eps", [
    ("keypoints.pth", "current", None),
    ("keypointrcnn_resnet50_fpn_coco-fc266e95.pth", "legacy", 0.0),  # torchvision's COCO_V1
    ("keypointrcnn_resnet50_fpn_coco-9f466800.pth", "legacy", None),  # its COCO_LEGACY: default eps
    ("renamed.pth", "legacy", 0.0),  # old names, unknown file: taken for COCO_V1, the default weights
])
def test_torchvision_keypoint_files_load_strict(frozen_tv, tmp_path, filename, key_names, eps):
    state_dict = frozen_tv.state_dict() if key_names == "current" else _legacy(frozen_tv.state_dict())
    path = tmp_path / filename
    torch.save(state_dict, path)
    meta = read_metadata(path)
    assert meta["architecture"] == "keypointrcnn_resnet50_fpn" and meta["num_classes"] == 2
    assert meta["legacy_keys"] is (key_names == "legacy") and meta["frozen_bn_eps"] == eps

    model = load_model(path, **CKPT_SETTINGS)
    assert model.architecture == "keypointrcnn_resnet50_fpn" and model.num_keypoints == 17
    assert model.keypoint_names == list(mrcnn.COCO_PERSON_KEYPOINT_NAMES)
    assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5 if eps is None else eps}
    expected = _outputs(_reference(state_dict, eps))
    assert _assert_same_detections(_outputs(model), expected) == 20
    built = mrcnn.keypointrcnn_resnet50_fpn(weights=path, **CKPT_SETTINGS)
    assert _assert_same_detections(_outputs(built), expected) == 20
    # eps matters here: the other value gives other detections
    other = _outputs(_reference(state_dict, 0.0 if eps is None else 1e-5))
    assert any(not torch.equal(a["keypoints_scores"], b["keypoints_scores"]) for a, b in zip(other, expected))


def test_our_format_records_keypoint_names(frozen_tv, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(frozen_tv.state_dict(), plain)
    model = load_model(plain, **CKPT_SETTINGS)
    expected = _outputs(model)
    path = tmp_path / "ours.pt"
    save_checkpoint(model, path, class_names=["__background__", "person"])
    meta = read_metadata(path)
    assert meta["keypoint_names"] == list(mrcnn.COCO_PERSON_KEYPOINT_NAMES)
    assert meta["builder_kwargs"]["num_keypoints"] == 17
    loaded = load_model(path)
    assert loaded.keypoint_names == meta["keypoint_names"]
    assert _assert_same_detections(_outputs(loaded), expected) == 20
    with pytest.raises(ValueError, match="keypoint_names has 2 entries but the model predicts 17"):
        save_checkpoint(model, tmp_path / "x.pt", class_names=["bg", "person"], keypoint_names=["a", "b"])
    masks = mrcnn.maskrcnn_resnet18_fpn_small(num_classes=2, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="this model has no keypoint head"):
        save_checkpoint(masks, tmp_path / "y.pt", class_names=["bg", "a"], keypoint_names=["a"])
    five = mrcnn.keypointrcnn_resnet18_fpn_small(num_keypoints=5, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="predicts 5 keypoints: give their keypoint_names"):
        save_checkpoint(five, tmp_path / "z.pt", class_names=["bg", "a"])
    assert not any((tmp_path / n).exists() for n in ("x.pt", "y.pt", "z.pt"))


def test_mask_settings_do_not_apply_to_a_keypoint_model():
    with pytest.raises(ValueError, match="no mask branch: mask_loss and mask_head_type do not apply"):
        mrcnn.keypointrcnn_resnet18_fpn_small(mask_loss="softmax", min_size=64, max_size=96)
    with pytest.raises(ValueError, match="num_keypoints=3 but keypoint_predictor predicts 17"):
        mrcnn.KeypointRCNN(mrcnn.keypointrcnn_resnet18_fpn_small().backbone, num_classes=2, num_keypoints=3,
                           keypoint_predictor=mrcnn.keypoint_rcnn.KeypointRCNNPredictor(128, 17))
