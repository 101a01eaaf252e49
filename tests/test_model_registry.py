"""The registry of architectures: every registered one builds, detects, trains a step and
round-trips its checkpoint; the table is the one place the builders, detection, load_model and
jobs.train read."""
import numpy as np
import pytest
import torch

import mrcnn
from mrcnn import registry
from mrcnn.checkpoint import load_model, read_metadata, save_checkpoint

SIZES = dict(min_size=64, max_size=96)
EXPECTED = {"maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet101_fpn",
            "maskrcnn_resnext101_32x8d_fpn", "maskrcnn_resnet18_fpn_small", "maskrcnn_resnet50_c4",
            "maskrcnn_resnet50_c5", "maskrcnn_resnet18_c5", "keypointrcnn_resnet50_fpn", "keypointrcnn_resnet18_fpn_small"}


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = []
    for k, image in enumerate(images):
        h, w = image.shape[1:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 5:30, 6:40] = 1
        masks[1, 30:60, 20:60] = 1
        # keypoints inside each box, the last few not labelled (visibility 0)
        keypoints = torch.rand(2, 17, 3, generator=g) * torch.tensor([34.0, 25, 1]) + torch.tensor([6.0, 5, 0])
        keypoints[1] += torch.tensor([14.0, 25, 0])
        keypoints[:, :, 2] = 2
        keypoints[:, 14:, 2] = 0
        targets.append({"boxes": torch.tensor([[6.0, 5, 40, 30], [20.0, 30, 60, 60]]),
                        "labels": torch.tensor([1, 2 - k]), "masks": masks, "keypoints": keypoints})
    return images, targets


def test_the_table_lists_every_architecture_once_with_its_builder():
    assert set(mrcnn.list_models()) >= EXPECTED
    assert mrcnn.list_models() == sorted(mrcnn.list_models())
    for name in mrcnn.list_models():
        assert getattr(mrcnn, name).__name__ == name  # the builder function of each name
        assert registry.get_architecture(name).summary
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("maskrcnn_resnet50_fpn", recognise=lambda sd: False, summary="x")(lambda **kw: None)
    with pytest.raises(ValueError, match="unknown architecture 'maskrcnn_vgg16'.*maskrcnn_resnet50_fpn"):
        mrcnn.get_model("maskrcnn_vgg16")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_architecture_builds_trains_a_step_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    model = mrcnn.get_model(name, num_classes=3, **SIZES)
    assert model.architecture == name
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    second = "loss_keypoint" if name.startswith("keypointrcnn") else "loss_mask"
    assert set(losses) == {"loss_classifier", "loss_box_reg", second, "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    missing = [k for k, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing

    model.eval()
    ours, plain = tmp_path / "ours.pt", tmp_path / "plain.pth"
    save_checkpoint(model, ours, class_names=["bg", "a", "b"])
    torch.save(model.state_dict(), plain)
    assert read_metadata(ours)["architecture"] == name
    assert read_metadata(plain)["architecture"] == name  # told apart from the others by its keys alone
    # the same tensors come back (BatchNorm from scratch loads as FrozenBatchNorm2d: not its step counters)
    saved = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    outputs = []
    for path, overrides in ((ours, {}), (plain, SIZES)):
        loaded = load_model(path, **overrides).eval()
        assert loaded.architecture == name
        got = {k: v for k, v in loaded.state_dict().items() if not k.endswith("num_batches_tracked")}
        assert set(got) == set(saved) and all(torch.equal(got[k], v) for k, v in saved.items())
        with torch.no_grad():
            outputs.append(loaded(images))
    compared = 0
    branch = "keypoints" if name.startswith("keypointrcnn") else "masks"
    for a, b in zip(*outputs):  # and both files give the same detections
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a[branch], b[branch])
        compared += len(a["boxes"])
    assert compared > 0


def test_settings_are_recorded_when_the_model_is_built(tmp_path):
    model = mrcnn.maskrcnn_resnet18_fpn_small(num_classes=3, box_score_thresh=0.3, rpn_anchor_sizes=[[16]] * 5,
                                              mask_loss="softmax", **SIZES)
    kw = model.builder_kwargs
    assert kw["box_score_thresh"] == 0.3 and kw["min_size"] == [64] and kw["rpn_anchor_sizes"] == [[16]] * 5
    assert kw["mask_loss"] == "softmax" and "roi_pooler" not in kw and "returned_layers" not in kw
    assert kw["bbox_reg_weights"] == [10.0, 10.0, 5.0, 5.0] and kw["rpn_aspect_ratios"] == [[0.5, 1.0, 2.0]] * 5
    # a runtime change (the Predictor's score threshold) is not a build setting
    model.roi_heads.score_thresh = 0.9
    save_checkpoint(model, tmp_path / "m.pt", class_names=["bg", "a", "b"])
    assert read_metadata(tmp_path / "m.pt")["builder_kwargs"] == kw
    assert load_model(tmp_path / "m.pt").builder_kwargs == kw


def test_a_model_given_modules_cannot_be_saved(tmp_path):
    base = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, **SIZES)
    custom = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, rpn_head=base.rpn.head, **SIZES)
    assert custom.custom_modules == ["rpn_head"] and base.custom_modules == []
    with pytest.raises(ValueError, match="cannot record the modules this model was given \\(rpn_head\\)"):
        save_checkpoint(custom, tmp_path / "x.pt", class_names=["bg", "a", "b"])
    assert not (tmp_path / "x.pt").exists()


def test_unknown_state_dicts_name_the_known_architectures(tmp_path):
    with pytest.raises(ValueError, match="not a Mask R-CNN state_dict of any known architecture.*maskrcnn_resnet50_fpn"):
        registry.detect_architecture({"conv1.weight": torch.zeros(1)})


def test_jobs_train_takes_every_registered_architecture_by_either_name():
    from jobs.train.__main__ import parse_args
    from jobs.train.config import ARCHS

    assert set(ARCHS.values()) == set(mrcnn.list_models())
    base = ["--data", "d", "--output", "o"]
    assert parse_args(base + ["--arch", "resnext101_32x8d_fpn"]).arch == "resnext101_32x8d_fpn"
    assert parse_args(base + ["--arch", "maskrcnn_resnext101_32x8d_fpn"]).arch == "resnext101_32x8d_fpn"
    c4 = parse_args(base + ["--arch", "resnet50_c4", "--anchor-sizes", "16", "32", "64"])
    assert c4.anchor_sizes == [16, 32, 64]  # any number: all on the one map
    with pytest.raises(SystemExit):
        parse_args(base + ["--arch", "resnet50_c4", "--returned-layers", "1", "2", "3"])


def test_the_c4_variant_is_the_papers():
    """Fig. 4 (left): RPN and 14x14 RoIAlign on res4 (stride 16), res5 shared by the box and mask
    heads, average pooling before the box predictor, a 2x deconvolution to 14x14 per-class masks."""
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_c4(num_classes=3, **SIZES).eval()
    rh = model.roi_heads
    assert not hasattr(model.backbone.body, "layer4") and model.backbone.out_channels == 1024
    assert rh.box_head.res5 is rh.mask_head.res5  # one set of weights
    assert rh.box_roi_pool.featmap_names == ["0"] and rh.box_roi_pool.output_size == (14, 14)
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    image = torch.rand(3, 64, 96)
    features = model.backbone(model.transform([image])[0].tensors)
    assert list(features) == ["0"] and features["0"].shape[-2:] == (4, 6)  # stride 16
    pooled = torch.rand(5, 1024, 14, 14)
    assert rh.box_head(pooled).shape == (5, 2048)
    assert rh.mask_predictor(rh.mask_head(pooled)).shape == (5, 3, 14, 14)
    # flat anchor sizes all go on the one map; the FPN-only setting is refused
    flat = mrcnn.maskrcnn_resnet50_c4(num_classes=3, rpn_anchor_sizes=[16, 32, 64], **SIZES)
    assert flat.rpn.anchor_generator.sizes == ((16, 32, 64),) and flat.builder_kwargs["rpn_anchor_sizes"] == [[16, 32, 64]]
    with pytest.raises(ValueError, match="returned_layers is for the FPN architectures"):
        mrcnn.maskrcnn_resnet50_c4(num_classes=3, returned_layers=[1, 2, 3])
    with pytest.raises(ValueError, match="one feature map"):
        mrcnn.maskrcnn_resnet50_c4(num_classes=3, rpn_anchor_sizes=[[16], [32]])


def test_the_c5_variant_moves_res5_into_the_backbone_with_the_small_models_heads():
    """Table 2d's large-stride features: res5 (stride 32) mapped to 128 channels by a 1x1 conv
    (the small FPN's lateral), the RPN and the RoI poolers on it, 7x7 box and 14x14 mask RoIs, and
    the small FPN model's second stage: two 3x3 conv + GroupNorm layers that keep where in the RoI a
    feature lies, then one fc and the box predictor, or a 2x deconvolution to 28x28 masks. The
    ResNet is the C4 model's, each block used once."""
    from torch import nn

    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_c5(num_classes=3, **SIZES).eval()
    small = mrcnn.maskrcnn_resnet18_fpn_small(num_classes=3, **SIZES)
    rh = model.roi_heads
    assert hasattr(model.backbone.body, "layer4") and model.backbone.out_channels == 128
    assert isinstance(model.backbone.lateral[1], nn.GroupNorm) and model.backbone.lateral[0].in_channels == 2048
    assert not any("res5" in name for name, _ in rh.named_modules())
    assert rh.box_roi_pool.output_size == (7, 7) and rh.mask_roi_pool.output_size == (14, 14)
    image = torch.rand(3, 64, 96)
    features = model.backbone(model.transform([image])[0].tensors)
    assert list(features) == ["0"] and features["0"].shape[-3:] == (128, 2, 3)  # stride 32
    rois = torch.rand(5, 128, 7, 7)
    assert rh.box_head(rois).shape == (5, 256)
    # the box features depend on where in the RoI the input lies, not only on its average
    assert not torch.allclose(rh.box_head(rois), rh.box_head(rois.flip(-1)))
    assert rh.mask_predictor(rh.mask_head(torch.rand(5, 128, 14, 14))).shape == (5, 3, 28, 28)
    # the second stage is the small FPN model's, parameter for parameter
    for part in ("box_head", "box_predictor", "mask_head", "mask_predictor"):
        assert ([p.shape for p in getattr(rh, part).parameters()]
                == [p.shape for p in getattr(small.roi_heads, part).parameters()]), part
    c4 = mrcnn.maskrcnn_resnet50_c4(num_classes=3, **SIZES)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.backbone.body) == count(c4.backbone.body) + count(c4.roi_heads.box_head.res5)
    # the ablation's switches reach its poolers and its mask head; detection by keys tells it from C4 and ResNet-18
    pooled = mrcnn.maskrcnn_resnet18_c5(num_classes=3, roi_pooler="roi_pool", **SIZES)
    assert pooled.roi_heads.box_roi_pool.pooler == "roi_pool" and pooled.backbone.lateral[0].in_channels == 512
    mlp = mrcnn.maskrcnn_resnet18_c5(num_classes=3, mask_head_type="mlp", **SIZES).roi_heads
    assert mlp.mask_predictor(mlp.mask_head(torch.rand(2, 128, 14, 14))).shape == (2, 3, 28, 28)
    assert registry.detect_architecture(model.state_dict()) == "maskrcnn_resnet50_c5"
    assert registry.detect_architecture(c4.state_dict()) == "maskrcnn_resnet50_c4"
    assert registry.detect_architecture(pooled.state_dict()) == "maskrcnn_resnet18_c5"
    with pytest.raises(ValueError, match="C5 variant reads res5 only"):
        mrcnn.maskrcnn_resnet18_c5(num_classes=3, returned_layers=[1, 2, 3])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_architecture_runs_in_bf16_and_fp16_under_the_predictor(name):
    """The Predictor's reduced precisions (autocast) on every architecture give results of the
    fp32 form, finite. (Agreement with fp32 needs trained weights: random ones amplify rounding,
    so it is checked on the shipped model, tests/test_shipped_model.py.)"""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    # 100 proposals, not 1000: the check is on the form of the results, and C4's res5 runs per RoI
    model = mrcnn.get_model(name, num_classes=3, box_score_thresh=0.0, box_detections_per_img=10,
                            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100, **SIZES)
    with torch.no_grad():  # torchvision's zero_init_residual: random deep ResNets otherwise overflow fp16
        for m in model.modules():
            if isinstance(m, (Bottleneck, BasicBlock)):
                (m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight.zero_()
    arrays = [(image.permute(1, 2, 0) * 255).byte().numpy() for image in _batch()[0]]
    branch = "keypoints" if name.startswith("keypointrcnn") else "masks"
    reference = mrcnn.Predictor(model, precision="fp32", class_names=["bg", "a", "b"])(arrays)
    detections = 0
    for precision in ("bf16", "fp16"):
        for ref, out, image in zip(reference, mrcnn.Predictor(model, precision=precision)(arrays), arrays):
            assert sorted(out) == sorted(ref)
            n = len(out["boxes"])
            assert n <= 10 and out["boxes"].dtype == out["scores"].dtype == np.float32
            assert np.isfinite(out["boxes"]).all() and np.isfinite(out["scores"]).all()
            assert len(out[branch]) == n
            if branch == "keypoints":
                assert out["keypoints"].shape == (n, 17, 3) and np.isfinite(out["keypoints"]).all()
            else:
                assert all(m["size"] == list(image.shape[:2]) for m in out["masks"])
            detections += n
    assert detections > 0
