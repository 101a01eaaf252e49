"""Detectron2 checkpoints: both file layouts, configs, and detections equal to Detectron2's own
DefaultPredictor (fixtures made with Detectron2 itself: tests/data/detectron2/README.md)."""
import os
import pickle

import numpy as np
import pytest
import torch

import _detectron2_fixture as fx
import mrcnn
from mrcnn import Predictor
from mrcnn.detectron2 import read_config

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")


def _reference(arch):
    return fx.reference(arch)


def _config(arch):
    return fx.config_path(arch)


@pytest.fixture(scope="module")
def r50_weights():
    return fx.detectron2_state_dict("R50-FPN")


def _checkpoint(arch, layout, tmp_path, state_dict=None):
    return fx.write_checkpoint(state_dict if state_dict is not None else fx.detectron2_state_dict(arch),
                               str(tmp_path), layout)


assert_rows_equal_detectron2 = fx.assert_rows_equal_detectron2


# R50-FPN on all three images (portrait, landscape and upscaled), the others on one; the .pkl
# layouts (numpy 2 names here, numpy 1 names for R101) are the job test's and R101's
@pytest.mark.parametrize("arch,layout,images", [("R50-FPN", "pth", ("portrait", "landscape", "small")),
                                                ("R101-FPN", "pkl-numpy1", ("portrait",)),
                                                ("X101-FPN", "pth", ("landscape",)), ("R50-C4", "pkl", ("small",))])
def test_detections_equal_detectron2s_predictor(arch, layout, images, tmp_path, r50_weights):
    path = _checkpoint(arch, layout, tmp_path, r50_weights if arch == "R50-FPN" else None)
    predictor = Predictor.from_checkpoint(path, "cpu", config=_config(arch), channels_last=False)
    assert predictor.model.convention == "detectron2"
    rows = {name: predictor([image])[0] for name, image in fx.images().items() if name in images}
    compared = assert_rows_equal_detectron2(rows, arch)
    assert compared >= 50 * len(images)  # every image has detections (Detectron2's fixture: 50 or 100 each)


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "model_final.pkl"
    # protocol 0: os.system("touch <marker>") when unpickled by a plain pickle.load
    evil.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    for call in (lambda: mrcnn.load_model(evil), lambda: mrcnn.read_metadata(evil),
                 lambda: Predictor.from_checkpoint(evil, "cpu")):
        with pytest.raises(ValueError, match=r"model_final\.pkl.*refuses the global os\.system"):
            call()
    assert not marker.exists()
    # a zoo-shaped file hiding a call among its arrays
    payload = pickle.dumps({"model": {"x": np.zeros(2, np.float32)}, "__author__": "x"}, protocol=2)
    payload = payload.replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cbuiltins\neval\n", 1)
    evil.write_bytes(payload)
    with pytest.raises(ValueError, match="refuses the global builtins.eval"):
        mrcnn.load_model(evil)


def test_config_inheritance_and_defaults():
    cfg = read_config(_config("R101-FPN"))  # R101 <- R50 <- [Base-RCNN-FPN, small-test-size]
    assert [os.path.basename(s) for s in cfg.sources] == ["mask_rcnn_R_101_FPN.yaml", "mask_rcnn_R_50_FPN.yaml",
                                                          "Base-RCNN-FPN.yaml", "small-test-size.yaml"]
    assert cfg["MODEL.RESNETS.DEPTH"] == 101 and cfg["MODEL.ROI_HEADS.SCORE_THRESH_TEST"] == 0.1
    assert cfg["INPUT.MIN_SIZE_TEST"] == 320 and cfg["INPUT.MAX_SIZE_TEST"] == 533
    assert cfg["MODEL.ANCHOR_GENERATOR.SIZES"] == [[32], [64], [128], [256], [512]]
    assert cfg["DATASETS.TRAIN"] == ["coco_2017_train"]  # a tuple literal in the YAML, decoded as Detectron2 does
    assert cfg["MODEL.PIXEL_STD"] == [1.0, 1.0, 1.0] and cfg["INPUT.FORMAT"] == "BGR"  # defaults.py's
    assert cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is True


@pytest.mark.parametrize("yaml_text,message", [
    ("MODEL:\n  FPN:\n    NORM: GN\n", r"MODEL\.FPN\.NORM = 'GN' is not supported"),
    ("MODEL:\n  RESNETS:\n    DEFORM_ON_PER_STAGE: [False, True, True, True]\n", "deformable"),
    ("TEST:\n  AUG:\n    ENABLED: True\n", "test-time augmentation"),
    ("MODEL:\n  ROI_BOX_HEAD:\n    NUM_CONV: 4\n", r"MODEL\.ROI_BOX_HEAD\.NUM_CONV = 4"),
    ("MODEL:\n  NOT_A_KEY: 1\n", r"keys Detectron2's config does not have: \['MODEL\.NOT_A_KEY'\]"),
    ("MODEL:\n  RESNETS:\n    DEPTH: 101\n", r"the config has MODEL\.RESNETS\.DEPTH = 101, the weights 50"),
    ("MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 3\n", r"NUM_CLASSES = 3, the weights 80"),
])
def test_unsupported_config_values_are_refused(yaml_text, message, tmp_path, r50_weights):
    path = _checkpoint("R50-FPN", "pth", tmp_path, r50_weights)
    config = tmp_path / "config.yaml"
    config.write_text(f"_BASE_: {_config('R50-FPN')}\n" + yaml_text)
    with pytest.raises(ValueError, match=message):
        mrcnn.load_model(path, config=config)


def test_base_cycle_and_missing_base_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ValueError, match="include each other"):
        read_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        read_config(tmp_path / "c.yaml")


def test_custom_dataset_model_keeps_its_class_indices(tmp_path, r50_weights):
    """Without a COCO dataset in the config, class i is label i + 1 and names are the caller's."""
    path = _checkpoint("R50-FPN", "pth", tmp_path, r50_weights)
    config = tmp_path / "custom.yaml"
    config.write_text(f"_BASE_: {_config('R50-FPN')}\nDATASETS:\n  TRAIN: ('my_parts_train',)\n  TEST: ()\n")
    model = mrcnn.load_model(path, config=config)
    assert model.roi_heads.box_predictor.cls_score.out_features == 81 and model.class_names is None
    names = ["background"] + [f"part{i}" for i in range(80)]
    rows = Predictor(model, device="cpu", channels_last=False, class_names=names)([fx.images()["landscape"]])[0]
    ref = _reference("R50-FPN")["images"]["landscape"]
    assert list(rows["labels"]) == [c + 1 for c in ref["classes"]] and len(rows["labels"]) == 100
    assert rows["label_names"][0] == f"part{ref['classes'][0]}"


def test_without_config_detectron2s_defaults_apply(tmp_path, r50_weights):
    meta = mrcnn.read_metadata(_checkpoint("R50-FPN", "pkl", tmp_path, r50_weights))
    assert meta["format"] == "detectron2-pkl" and meta["architecture"] == "maskrcnn_resnet50_fpn"
    assert (meta["min_size"], meta["max_size"]) == (800, 1333)
    assert meta["builder_kwargs"]["input_format"] == "BGR" and meta["builder_kwargs"]["stride_in_1x1"] is True
    assert meta["class_names"] is None  # Detectron2's default DATASETS are empty: no COCO label map


def test_converted_model_saves_and_reloads_in_our_format(tmp_path, r50_weights):
    path = _checkpoint("R50-FPN", "pth", tmp_path, r50_weights)
    model = mrcnn.load_model(path, config=_config("R50-FPN"))
    ours = tmp_path / "converted.pt"
    mrcnn.save_checkpoint(model, ours, class_names=model.class_names)
    again = Predictor.from_checkpoint(ours, "cpu", channels_last=False)
    assert again.model.convention == "detectron2"
    assert assert_rows_equal_detectron2({"small": again([fx.images()["small"]])[0]}, "R50-FPN") == 100


def test_level_assignment_follows_detectron2_at_the_boundary():
    """A box just under 112 px (level 3's lower edge) goes to level 2 by Detectron2's rule
    floor(4 + log2(s / 224 + 1e-8)) and to level 3 by torchvision's floor(4 + log2(s / 224) + 1e-6)."""
    from mrcnn.ops import LevelMapper

    side = 112 * (1 - 3e-7)
    boxes = [torch.tensor([[0.0, 0.0, side, side], [0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 400.0, 400.0]])]
    assert LevelMapper(2, 5, convention="detectron2")(boxes).tolist() == [0, 0, 2]
    assert LevelMapper(2, 5)(boxes).tolist() == [1, 0, 2]


def test_files_of_other_kinds_are_refused_by_name(tmp_path):
    lazy = tmp_path / "mask_rcnn_R_50_FPN_100ep_LSJ.py"
    lazy.write_text("from detectron2.config import LazyCall as L\n")
    with pytest.raises(ValueError, match="LazyConfig"):
        read_config(lazy)
    blobs = tmp_path / "R-50.pkl"  # a Caffe2 / Detectron1 file
    blobs.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, protocol=2))
    with pytest.raises(ValueError, match=r"R-50\.pkl: a Caffe2 / Detectron1 file"):
        mrcnn.load_model(blobs)
