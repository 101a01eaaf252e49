"""The paper's ablation switches (Table 2c-e) as builder arguments: the pooler, the mask loss and
the mask head. Each builds, trains a step and round-trips its checkpoint; the poolers equal
torchvision's operators level by level; the softmax loss is a per-pixel multinomial."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mrcnn.checkpoint import load_model, save_checkpoint
from mrcnn.registry import build_model
from mrcnn.ops import MultiScaleRoIAlign
from mrcnn.roi_heads import MaskMLPHead, maskrcnn_inference, maskrcnn_loss
from _roi_reference import fpn_features

SWITCHES = [dict(roi_pooler="roi_align"), dict(roi_pooler="roi_warp"), dict(roi_pooler="roi_pool"),
            dict(mask_loss="softmax"), dict(mask_head_type="mlp")]


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    targets = []
    for k in range(2):
        masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
        masks[0, 10:50, 12:60] = 1
        masks[1, 40:90, 70:120] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10, 60, 50], [70.0, 40, 120, 90]]),
                        "labels": torch.tensor([1, 2 - k]), "masks": masks})
    return images, targets


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_builds_trains_a_step_and_round_trips(switch, tmp_path):
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet18_fpn_small", num_classes=3, min_size=96, max_size=128, **switch)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    mask_grads = [p.grad for p in model.roi_heads.mask_head.parameters()]
    assert mask_grads and all(g is not None and torch.isfinite(g).all() for g in mask_grads)
    assert any(g.abs().sum() > 0 for g in mask_grads)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, class_names=["__background__", "a", "b"])
    loaded = load_model(path)
    (key, value), = switch.items()
    assert loaded.checkpoint_metadata["builder_kwargs"][key] == value
    rh, lrh = model.roi_heads, loaded.roi_heads
    assert lrh.box_roi_pool.pooler == rh.box_roi_pool.pooler and lrh.mask_roi_pool.pooler == rh.mask_roi_pool.pooler
    assert lrh.mask_loss == rh.mask_loss and type(lrh.mask_head) is type(rh.mask_head)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = model(images[:1])[0], loaded(images[:1])[0]
    assert a["boxes"].shape == b["boxes"].shape and a["boxes"].shape[0] > 0
    torch.testing.assert_close(a["masks"], b["masks"], atol=1e-4, rtol=1e-4)


def test_the_defaults_are_recorded_as_before():
    model = build_model("maskrcnn_resnet18_fpn_small", num_classes=3)
    assert not {"roi_pooler", "mask_loss", "mask_head_type"} & set(model.builder_kwargs)
    assert model.roi_heads.box_roi_pool.pooler == "roi_align_legacy" and model.roi_heads.mask_loss == "sigmoid"


@pytest.mark.parametrize("kwargs,match", [(dict(roi_pooler="roi_max"), "pooler must be one of"),
                                          (dict(mask_loss="hinge"), "mask_loss must be one of"),
                                          (dict(mask_head_type="rnn"), "mask_head_type must be one of")])
def test_unknown_switch_values_are_refused(kwargs, match):
    for arch in ("maskrcnn_resnet18_fpn_small", "maskrcnn_resnet50_fpn"):
        with pytest.raises(ValueError, match=match):
            build_model(arch, num_classes=3, **kwargs)


def _round_half_away(t):
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


@pytest.mark.parametrize("pooler", ["roi_align", "roi_warp", "roi_pool"])
def test_multiscale_poolers_equal_torchvision_level_by_level(pooler):
    g = torch.Generator().manual_seed(3)
    shapes = [(256, 320), (240, 300)]
    names = ["0", "1", "2", "3"]
    feats = fpn_features(g, n_images=2, image_shapes=shapes, channels=8, names=names, dtype=torch.float32)
    boxes = []
    for h, w in shapes:
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w, h])
        size = torch.exp(torch.empty(40, 2).uniform_(2.0, 6.5, generator=g))  # 7 to 665 px: every level
        boxes.append(torch.cat([xy, xy + size], 1))
    pool = MultiScaleRoIAlign(names, 7, 2, pooler=pooler)
    ours = pool(feats, boxes, shapes)
    levels = pool.map_levels(boxes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    ref = torch.empty_like(ours)
    for level, (name, scale) in enumerate(zip(names, pool.scales)):
        idx = torch.where(levels == level)[0]
        x = feats[name]
        if pooler == "roi_align":
            ref[idx] = torchvision.ops.roi_align(x, rois[idx], 7, scale, 2, aligned=True)
        elif pooler == "roi_warp":
            cells = torch.cat([rois[idx, :1], _round_half_away(rois[idx, 1:] * scale)], 1)
            ref[idx] = torchvision.ops.roi_align(x, cells, 7, 1.0, 2, aligned=False)
        else:
            ref[idx] = torchvision.ops.roi_pool(x, rois[idx], 7, scale)
    assert len(set(levels.tolist())) >= 3  # several levels were compared
    assert torch.equal(ours, ref) and ours.shape[0] == 80
    assert f"pooler='{pooler}'" in repr(pool)


def test_softmax_mask_loss_is_a_per_pixel_multinomial():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 28, 28, generator=g)
    masks = (torch.rand(3, 28, 28, generator=g) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[0.0, 0, 28, 28]] * 3)
    labels = torch.tensor([1, 3, 2])
    loss = maskrcnn_loss(logits, [boxes], [masks], [labels], [torch.arange(3)], kind="softmax")
    projected = torchvision.ops.roi_align(masks[:, None].float(), torch.cat([torch.arange(3.0)[:, None], boxes], 1),
                                          28, 1.0)[:, 0]
    target = torch.where(projected >= 0.5, labels[:, None, None], 0)
    log_p = logits.log_softmax(dim=1)
    manual = -log_p.gather(1, target[:, None]).mean()
    torch.testing.assert_close(loss, manual)
    sigmoid = maskrcnn_loss(logits, [boxes], [masks], [labels], [torch.arange(3)])
    assert not torch.allclose(loss, sigmoid)
    (probs,) = maskrcnn_inference(logits, [labels], kind="softmax")
    torch.testing.assert_close(probs[:, 0], F.softmax(logits, 1)[torch.arange(3), labels])


def test_the_mlp_mask_head_is_the_papers():
    model = build_model("maskrcnn_resnet50_fpn", num_classes=81, mask_head_type="mlp")
    head, predictor = model.roi_heads.mask_head, model.roi_heads.mask_predictor
    assert isinstance(head, MaskMLPHead)
    widths = [m.out_features for m in list(head) + [predictor.mask_fc_logits] if isinstance(m, torch.nn.Linear)]
    assert widths == [1024, 1024, 81 * 28 * 28]  # fc 1024 -> 1024 -> classes x 28 x 28 (Table 2e)
    out = predictor(head(torch.randn(2, 256, 14, 14)))
    assert out.shape == (2, 81, 28, 28)
