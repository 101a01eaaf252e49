"""mrcnn.Predictor over a torchvision Mask R-CNN and over ours (seeded random weights)."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

import mrcnn
from mrcnn.coco_categories import COCO_CATEGORY_NAMES, label_names
from mrcnn.predictor import Predictor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

SIZES = [(150, 200), (176, 132), (120, 120)]  # (H, W): different sizes in one batch
# Small and quick: few proposals and detections (the semantics do not depend on the counts).
SMALL = dict(min_size=160, max_size=224, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=25)


def make_images(seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for H, W in SIZES:
        # Smooth blobs plus noise: gives the random-weight model something to respond to.
        yy, xx = np.mgrid[0:H, 0:W]
        img = np.zeros((H, W, 3), np.float32)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(15, 60)
            img += rng.uniform(0, 255, 3) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None]
        img += rng.normal(0, 20, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def to_tensors(images):
    return [torch.from_numpy(i).permute(2, 0, 1).float().div(255) for i in images]


@pytest.fixture(scope="module")
def tv_model():
    # A torchvision Mask R-CNN; ResNet-18 FPN keeps the forward pass cheap.
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return MaskRCNN(backbone, num_classes=91, **SMALL).eval()


@pytest.fixture(scope="module")
def tv_bool_results(tv_model):
    images = make_images()
    pred = Predictor(tv_model, device="cpu", score_thresh=0.0, mask_format="bool")
    assert tv_model.roi_heads.score_thresh == 0.0
    return images, pred(images)


def decode(rles):
    return mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])


def test_predictor_matches_torchvision_model(tv_model, tv_bool_results):
    images, results = tv_bool_results
    with torch.inference_mode():
        expected = tv_model(to_tensors(images))  # the same batch, called directly
    assert len(results) == len(images) == 3
    detections = pixels = 0
    for img, res, exp in zip(images, results, expected):
        n = len(exp["boxes"])
        assert n > 0
        np.testing.assert_array_equal(res["boxes"], exp["boxes"].numpy())
        np.testing.assert_array_equal(res["labels"], exp["labels"].numpy())
        np.testing.assert_array_equal(res["scores"], exp["scores"].numpy())
        assert res["boxes"].dtype == np.float32 and res["boxes"].shape == (n, 4)
        assert res["labels"].dtype == np.int64 and res["scores"].dtype == np.float32
        want = (exp["masks"][:, 0] > 0.5).numpy()
        assert res["masks"].dtype == np.bool_ and res["masks"].shape == (n,) + img.shape[:2]
        assert np.array_equal(res["masks"], want)
        np.testing.assert_array_equal(res["areas"], want.sum((1, 2)))
        assert res["areas"].dtype == np.int64
        assert res["label_names"] == label_names(exp["labels"].tolist(), COCO_CATEGORY_NAMES)
        detections += n
        pixels += int(want.sum())
    assert detections >= 30 and pixels > 1000


def test_rle_output_decodes_to_the_bool_masks(tv_model, tv_bool_results):
    images, bool_res = tv_bool_results
    rle_res = Predictor(tv_model, device="cpu", score_thresh=0.0, mask_format="rle")(images)
    compared = 0
    for img, b, r in zip(images, bool_res, rle_res):
        np.testing.assert_array_equal(r["boxes"], b["boxes"])
        assert isinstance(r["masks"], list) and len(r["masks"]) == len(b["masks"]) > 0
        assert all(m["size"] == list(img.shape[:2]) and isinstance(m["counts"], str) for m in r["masks"])
        decoded = decode(r["masks"]).transpose(2, 0, 1).astype(bool)
        assert np.array_equal(decoded, b["masks"])
        np.testing.assert_array_equal(r["areas"], b["areas"])
        compared += len(r["masks"])
    assert compared >= 30


def test_our_model_raw_masks_pasted_by_the_predictor(tmp_path):
    """Our model: the Predictor pastes the raw 28x28 masks; equals the model's own paste > 0.5."""
    torch.manual_seed(1)
    names = ["__background__", "cat", "dog", "bird"]
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=4, box_score_thresh=0.0, **SMALL).eval()
    path = tmp_path / "model.pt"
    mrcnn.save_checkpoint(model, path, class_names=names)
    images = make_images(2)

    pred = Predictor.from_checkpoint(str(path), device="cpu", mask_format="bool")
    assert pred.class_names == names and pred.model.roi_heads.score_thresh == 0.0
    results = pred(images)
    assert pred.model.mask_output == "probs"  # restored after the call
    rle_results = Predictor(pred.model, device="cpu", mask_format="rle")(images)
    with torch.inference_mode():
        expected = pred.model(to_tensors(images))
    detections = pixels = 0
    for img, res, rle, exp in zip(images, results, rle_results, expected):
        n = len(exp["boxes"])
        assert n > 0
        np.testing.assert_array_equal(res["boxes"], exp["boxes"].numpy())
        np.testing.assert_array_equal(res["scores"], exp["scores"].numpy())
        want = (exp["masks"][:, 0] > 0.5).numpy()
        assert np.array_equal(res["masks"], want)
        assert np.array_equal(decode(rle["masks"]).transpose(2, 0, 1).astype(bool), want)
        np.testing.assert_array_equal(rle["areas"], want.sum((1, 2)))
        assert set(res["label_names"]) <= set(names[1:])
        detections += n
        pixels += int(want.sum())
    assert detections >= 30 and pixels > 1000


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((40, 50), np.uint8), "H x W x 3 RGB"),
        (np.zeros((40, 50, 1), np.uint8), "grayscale"),
        (np.zeros((40, 50, 4), np.uint8), "RGBA"),
        (np.zeros((40, 50, 3), np.float32), "uint8"),
    ],
)
def test_bad_images_are_rejected(tv_model, bad, match):
    pred = Predictor(tv_model, device="cpu", mask_format="bool")
    with pytest.raises(ValueError, match=match):
        pred([np.zeros((40, 50, 3), np.uint8), bad])


def test_arguments_are_checked(tv_model):
    with pytest.raises(ValueError, match="mask_format"):
        Predictor(tv_model, device="cpu", mask_format="png")
    with pytest.raises(ValueError, match="class_names has 3 names but the model has 91 classes"):
        Predictor(tv_model, device="cpu", class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="label 95 is outside"):
        label_names([1, 95])
    assert Predictor(tv_model, device="cpu").class_names == list(COCO_CATEGORY_NAMES)
    assert Predictor(tv_model, device="cpu")([]) == []


def test_channels_last_is_the_default_and_can_be_turned_off():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=91, **SMALL).eval()
    conv = model.backbone.body.conv1.weight
    Predictor(model, device="cpu", channels_last=False)
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    Predictor(model, device="cpu")
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone.body.conv1.weight.is_contiguous()


def test_a_cuda_device_that_cannot_run_the_model_is_refused_in_one_line(monkeypatch):
    import mrcnn.ops

    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, min_size=64, max_size=96)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            Predictor(model, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"1 CUDA GPU\(s\) are visible"):
        Predictor(model, device="cuda:1")
    monkeypatch.setattr(mrcnn.ops, "WITH_CUDA", False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels") as e:
        Predictor(model, device="cuda")
    assert "\n" not in str(e.value)
