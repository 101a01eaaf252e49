"""Loading torchvision Mask R-CNN state_dicts (current and legacy key names) and our own checkpoint
format, all through torch.load(weights_only=True); clear errors for bad files.

The reference is torchvision's own MaskRCNN with a FrozenBatchNorm2d ResNet-50 (what its builder
makes when weights are loaded), seeded random weights, one small image, ten detections.
"""
from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import mrcnn
from mrcnn.checkpoint import FORMAT

SMALL = dict(
    min_size=128,
    max_size=192,
    box_score_thresh=0.0,
    box_detections_per_img=10,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=200,
)
N_DET = 10


def _image():
    return torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(7))


def _outputs(model):
    with torch.no_grad():
        return model.eval()([_image()])[0]


def _assert_same(a, b):
    assert len(a["boxes"]) == len(b["boxes"]) == N_DET
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key]), key


def _frozen_bn_eps(model):
    return {m.eps for m in model.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)}


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    # non-trivial FrozenBatchNorm statistics, so a wrong eps or a skipped buffer would show
    for m in backbone.modules():
        if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
    return TVMaskRCNN(backbone, num_classes=91, **SMALL).eval()


@pytest.fixture(scope="module")
def tv_file(tv_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tv_v1.pth"
    torch.save(tv_model.state_dict(), path)
    return str(path)


def _legacy(state_dict):
    """The key names of files written before torchvision 0.13 (e.g. the published v1 COCO weights)."""
    out = OrderedDict()
    for k, v in state_dict.items():
        parts = k.split(".")
        if k.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            k = ".".join(parts[:4] + parts[5:])  # inner_blocks.{i}.0.weight -> inner_blocks.{i}.weight
        elif k.startswith("rpn.head.conv.0.0."):
            k = "rpn.head.conv." + parts[-1]
        elif k.startswith("roi_heads.mask_head."):
            k = f"roi_heads.mask_head.mask_fcn{int(parts[2]) + 1}.{parts[-1]}"
        out[k] = v
    return out


def test_torchvision_state_dict_loads_strict(tv_model, tv_file):
    expected = _outputs(tv_model)
    meta = mrcnn.read_metadata(tv_file)
    assert meta["format"] == "torchvision" and meta["architecture"] == "maskrcnn_resnet50_fpn"
    assert meta["num_classes"] == 91 and meta["legacy_keys"] is False

    model = mrcnn.load_model(tv_file, **SMALL)
    assert model.architecture == "maskrcnn_resnet50_fpn"
    assert _frozen_bn_eps(model) == {1e-5}
    _assert_same(_outputs(model), expected)

    built = mrcnn.maskrcnn_resnet50_fpn(weights=tv_file, **SMALL)
    _assert_same(_outputs(built), expected)


@pytest.mark.parametrize("with_metadata", [False, True])
def test_legacy_key_names_load_like_torchvision(tv_model, tmp_path, with_metadata):
    legacy = _legacy(tv_model.state_dict())
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    assert "backbone.fpn.inner_blocks.3.weight" in legacy and "backbone.fpn.layer_blocks.0.bias" in legacy
    if with_metadata:
        # as an old file carries it: module versions 1
        legacy._metadata = OrderedDict((k, {"version": 1}) for k in tv_model.state_dict()._metadata)
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)

    # torchvision's reference: its own remapping on load, then eps 0.0 as for the v1 COCO weights
    reference = TVMaskRCNN(
        resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3), num_classes=91, **SMALL
    )
    reference.load_state_dict(_legacy(tv_model.state_dict()))
    torchvision.models.detection._utils.overwrite_eps(reference, 0.0)

    meta = mrcnn.read_metadata(path)
    assert meta["legacy_keys"] is True and meta["frozen_bn_eps"] == 0.0
    model = mrcnn.load_model(path, **SMALL)
    assert _frozen_bn_eps(model) == {0.0}
    _assert_same(_outputs(model), _outputs(reference))


def test_our_format_round_trips(tv_file, tmp_path):
    model = mrcnn.load_model(tv_file, **SMALL)
    expected = _outputs(model)
    names = ["__background__"] + [f"class{i}" for i in range(1, 91)]
    path = tmp_path / "ours.pt"
    mrcnn.save_checkpoint(model, path, class_names=names, extra_meta={"dataset": "synthetic", "epochs": 3})

    # plain containers only: loadable with weights_only=True by anyone
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and set(raw) == {"format", "format_version", "metadata", "state_dict"}

    meta = mrcnn.read_metadata(path)
    assert meta["architecture"] == "maskrcnn_resnet50_fpn" and meta["num_classes"] == 91
    assert meta["class_names"] == names
    assert meta["score_thresh"] == 0.0 and meta["min_size"] == [128] and meta["max_size"] == 192
    assert meta["builder_kwargs"]["box_detections_per_img"] == N_DET
    assert meta["extra"] == {"dataset": "synthetic", "epochs": 3}

    loaded = mrcnn.load_model(path)  # no overrides: the recorded settings
    assert loaded.class_names == names
    _assert_same(_outputs(loaded), expected)

    tighter = mrcnn.load_model(path, box_score_thresh=0.5)
    assert tighter.roi_heads.score_thresh == 0.5 and tighter.transform.max_size == 192


def test_our_format_keeps_legacy_eps_and_works_on_fsspec_uris(tv_model, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(_legacy(tv_model.state_dict()), path)
    model = mrcnn.load_model(path, **SMALL)
    expected = _outputs(model)
    uri = "memory://mrcnn-test/eps0.pt"
    mrcnn.save_checkpoint(model, uri, class_names=[str(i) for i in range(91)])
    assert mrcnn.read_metadata(uri)["frozen_bn_eps"] == 0.0
    loaded = mrcnn.load_model(uri)
    assert _frozen_bn_eps(loaded) == {0.0}
    _assert_same(_outputs(loaded), expected)


class _Sneaky:
    """Unpickling this would create a file: weights_only loading must refuse before that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused(tv_model, tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "format_version": 1, "metadata": {"x": _Sneaky(str(marker))},
               "state_dict": tv_model.state_dict()}
    torch.save(payload, path)
    for load in (mrcnn.load_model, mrcnn.read_metadata, lambda p: mrcnn.maskrcnn_resnet50_fpn(weights=p)):
        with pytest.raises(ValueError, match="weights-only") as err:
            load(str(path))
        assert str(path) in str(err.value)
    assert not marker.exists()


def test_bad_files_give_clear_errors(tv_model, tv_file, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        mrcnn.load_model(missing)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        mrcnn.load_model(corrupt)

    not_a_model = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, not_a_model)
    with pytest.raises(ValueError, match="resnet.pth.*not a Mask R-CNN"):
        mrcnn.load_model(not_a_model)

    incomplete = tmp_path / "incomplete.pth"
    sd = tv_model.state_dict()
    del sd["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    torch.save(sd, incomplete)
    with pytest.raises(ValueError, match=r"(?s)incomplete.pth.*Missing.*mask_fcn_logits.bias"):
        mrcnn.load_model(incomplete)

    with pytest.raises(ValueError, match="holds a maskrcnn_resnet50_fpn checkpoint, but the model is maskrcnn_resnet50_fpn_v2"):
        mrcnn.maskrcnn_resnet50_fpn_v2(weights=tv_file)
    with pytest.raises(ValueError, match="91 classes"):
        mrcnn.load_model(tv_file, num_classes=5)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="class_names has 2 entries but the model has 3"):
        mrcnn.save_checkpoint(model, tmp_path / "x.pt", class_names=["bg", "a"])
    with pytest.raises(TypeError, match="not a plain value"):
        mrcnn.save_checkpoint(model, tmp_path / "x.pt", class_names=["bg", "a", "b"], extra_meta={"f": object()})


def test_resnet101_variant_is_detected_and_loads(tmp_path):
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet101_fpn(num_classes=3, **SMALL).eval()
    assert len(model.backbone.body.layer3) == 23  # ResNet-101
    path = tmp_path / "r101.pth"
    torch.save(model.state_dict(), path)
    assert mrcnn.read_metadata(path)["architecture"] == "maskrcnn_resnet101_fpn"
    loaded = mrcnn.load_model(path, **SMALL)
    assert loaded.architecture == "maskrcnn_resnet101_fpn" and len(loaded.backbone.body.layer3) == 23
    # BatchNorm2d (from scratch) -> FrozenBatchNorm2d (loaded): every tensor but the BN step counters
    saved = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = loaded.state_dict()
    assert set(got) == set(saved) and len(saved) > 500
    assert all(torch.equal(got[k], v) for k, v in saved.items())


def test_small_architecture_round_trips_and_is_detected(tmp_path):
    """maskrcnn_resnet18_fpn_small: a ResNet-18 body, 128-channel FPN, GroupNorm conv heads."""
    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet18_fpn_small(num_classes=4, **SMALL).eval()
    assert model.backbone.out_channels == 128 and len(model.backbone.body.layer3) == 2  # ResNet-18
    assert isinstance(model.roi_heads.mask_head[0][1], torch.nn.GroupNorm)
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # from scratch: BatchNorm trains
    assert sum(p.numel() for p in model.parameters()) < 15e6
    images = [torch.rand(3, 90, 120), torch.rand(3, 100, 80)]
    with torch.no_grad():
        expected = model(images)
    assert sum(len(r["boxes"]) for r in expected) > 0  # random weights still give detections to compare

    ours = tmp_path / "small.pt"
    mrcnn.save_checkpoint(model, ours, class_names=["bg", "a", "b", "c"])
    plain = tmp_path / "small_state_dict.pth"
    torch.save(model.state_dict(), plain)
    assert mrcnn.read_metadata(plain)["architecture"] == "maskrcnn_resnet18_fpn_small"  # told from v2 by its body
    for path, overrides in ((ours, {}), (plain, SMALL)):
        loaded = mrcnn.load_model(path, **overrides).eval()
        assert loaded.architecture == "maskrcnn_resnet18_fpn_small"
        with torch.no_grad():
            got = loaded(images)
        for g, e in zip(got, expected):
            assert torch.equal(g["boxes"], e["boxes"]) and torch.equal(g["masks"], e["masks"])
    with pytest.raises(ValueError, match="holds a maskrcnn_resnet18_fpn_small checkpoint, but the model is maskrcnn_resnet50_fpn_v2"):
        mrcnn.maskrcnn_resnet50_fpn_v2(weights=ours)


def test_anchor_sizes_are_recorded_and_rebuilt(tmp_path):
    """Small-object anchors change every proposal: a checkpoint must bring them back."""
    torch.manual_seed(0)
    sizes = [[16], [32], [64], [128], [256]]
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, rpn_anchor_sizes=sizes, **SMALL)
    assert model.rpn.anchor_generator.sizes == tuple(tuple(s) for s in sizes)
    path = tmp_path / "small_anchors.pt"
    mrcnn.save_checkpoint(model, path, class_names=["__background__", "a", "b"])
    assert mrcnn.read_metadata(path)["builder_kwargs"]["rpn_anchor_sizes"] == sizes

    loaded = mrcnn.load_model(path)
    assert loaded.rpn.anchor_generator.sizes == tuple(tuple(s) for s in sizes)
    again = _outputs(mrcnn.load_model(path))
    _assert_same(_outputs(loaded), again)
    # the same weights with the default anchors propose, and so detect, something else
    default = mrcnn.load_model(path, rpn_anchor_sizes=[[32], [64], [128], [256], [512]])
    assert not torch.equal(_outputs(default)["boxes"], again["boxes"])

    plain = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, **SMALL)
    assert plain.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    with pytest.raises(ValueError, match="not both"):
        mrcnn.maskrcnn_resnet50_fpn(num_classes=3, rpn_anchor_generator=plain.rpn.anchor_generator,
                                    rpn_anchor_sizes=sizes)


@pytest.mark.parametrize("returned_layers", [[1, 2, 3], [2, 3, 4]])
def test_returned_layers_are_recorded_and_rebuilt(tmp_path, returned_layers):
    """A backbone without layer4 (or without layer1's FPN level) saves, loads and detects as it was."""
    torch.manual_seed(0)
    levels = len(returned_layers) + 1
    sizes = [[16 * 2**i] for i in range(levels)]
    model = mrcnn.maskrcnn_resnet18_fpn_small(num_classes=4, returned_layers=returned_layers, rpn_anchor_sizes=sizes,
                                              **SMALL).eval()
    assert hasattr(model.backbone.body, "layer4") == (4 in returned_layers)
    assert len(model.backbone.fpn.inner_blocks) == len(returned_layers)
    assert model.roi_heads.box_roi_pool.featmap_names == [str(i) for i in range(len(returned_layers))]
    expected = _outputs(model)
    assert len(expected["boxes"]) > 0
    ours, plain = tmp_path / "rl.pt", tmp_path / "rl_state_dict.pth"
    mrcnn.save_checkpoint(model, ours, class_names=["bg", "a", "b", "c"])
    assert mrcnn.read_metadata(ours)["builder_kwargs"]["returned_layers"] == returned_layers
    torch.save(model.state_dict(), plain)
    for path, overrides in ((ours, {}), (plain, {**SMALL, "rpn_anchor_sizes": sizes})):
        _assert_same(_outputs(mrcnn.load_model(path, **overrides)), expected)
    # the default (all four stages) is not recorded, so older readers build the same model
    full = mrcnn.maskrcnn_resnet18_fpn_small(num_classes=4, **SMALL)
    mrcnn.save_checkpoint(full, tmp_path / "full.pt", class_names=["bg", "a", "b", "c"])
    assert "returned_layers" not in mrcnn.read_metadata(tmp_path / "full.pt")["builder_kwargs"]
    with pytest.raises(ValueError, match="returned_layers should be distinct ResNet stages in 1..4"):
        mrcnn.maskrcnn_resnet18_fpn_small(num_classes=4, returned_layers=[0, 1])
