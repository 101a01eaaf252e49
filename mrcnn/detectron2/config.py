"""Detectron2 YAML configs: what its weights cannot tell, as this package's model settings.

:func:`read_config` loads a config file as Detectron2 does (``_BASE_`` files first, relative to
the file including it, then the file's own keys merged over them; string values that are
Python literals, such as ``("coco_2017_train",)``, decoded) over Detectron2's defaults
(``config/defaults.py``). :func:`model_settings` turns it into the builder settings of the
matching architecture. Every key is one of:

- used: it sets a model setting here (sizes, anchors, thresholds, pixel mean/std, ...);
- fixed: Detectron2 allows other values, this package implements one (the default): any other
  value is refused with the key's name, never ignored;
- not inference: training, data loading, solver, evaluation and other architectures' sections,
  which do not change what a GeneralizedRCNN Mask R-CNN predicts; accepted whatever they hold.

A key Detectron2 itself does not know is refused, as Detectron2 refuses it.
"""
from __future__ import annotations

import ast
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec

# Detectron2's defaults for every key that can change inference (config/defaults.py).
DEFAULTS: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.FPN.IN_FEATURES": [],
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0,
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.IN_FEATURES": ["res4"],
    "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.CONV_DIMS": [-1],
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "MODEL.ROI_BOX_HEAD.NAME": "",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 0,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
    "MODEL.ROI_MASK_HEAD.NORM": "",
    "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False,
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.FORMAT": "BGR",
    "TEST.DETECTIONS_PER_IMAGE": 100,
    "TEST.AUG.ENABLED": False,
    "DATASETS.TRAIN": [],
    "DATASETS.TEST": [],
}

# Sections and keys that do not change what a GeneralizedRCNN Mask R-CNN predicts.
NOT_INFERENCE_PREFIXES = (
    "SOLVER.", "DATALOADER.", "GLOBAL.", "INPUT.CROP.", "TEST.PRECISE_BN.", "TEST.AUG.",
    "MODEL.RETINANET.", "MODEL.SEM_SEG_HEAD.", "MODEL.PANOPTIC_FPN.", "MODEL.ROI_KEYPOINT_HEAD.",
    "MODEL.ROI_BOX_CASCADE_HEAD.",
)
NOT_INFERENCE_KEYS = {
    "VERSION", "OUTPUT_DIR", "SEED", "CUDNN_BENCHMARK", "VIS_PERIOD", "FLOAT32_PRECISION",
    "MODEL.DEVICE", "MODEL.WEIGHTS", "MODEL.BACKBONE.FREEZE_AT",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "INPUT.MAX_SIZE_TRAIN", "INPUT.RANDOM_FLIP",
    "INPUT.MASK_FORMAT", "DATASETS.PROPOSAL_FILES_TRAIN", "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN",
    "DATASETS.PROPOSAL_FILES_TEST", "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST",
    "TEST.EXPECTED_RESULTS", "TEST.EVAL_PERIOD", "TEST.KEYPOINT_OKS_SIGMAS",
    "MODEL.ANCHOR_GENERATOR.ANGLES",  # rotated anchors only
    "MODEL.RPN.BOUNDARY_THRESH", "MODEL.RPN.IOU_THRESHOLDS", "MODEL.RPN.IOU_LABELS", "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "MODEL.RPN.POSITIVE_FRACTION", "MODEL.RPN.BBOX_REG_LOSS_TYPE", "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
    "MODEL.RPN.SMOOTH_L1_BETA", "MODEL.RPN.LOSS_WEIGHT", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS", "MODEL.ROI_HEADS.IOU_LABELS", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION", "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA",
    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER", "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES",
    "MODEL.RESNETS.DEFORM_MODULATED", "MODEL.RESNETS.DEFORM_NUM_GROUPS",  # used only with DEFORM_ON_PER_STAGE
}
# Keys with one implemented value (Detectron2's default unless said): (allowed values, why)
FIXED: dict[str, tuple[tuple, str]] = {
    "MODEL.META_ARCHITECTURE": (("GeneralizedRCNN",), "only GeneralizedRCNN (R-CNN) models run here"),
    "MODEL.MASK_ON": ((True,), "this job runs Mask R-CNN: a box-only config (MASK_ON False) is not supported"),
    "MODEL.KEYPOINT_ON": ((False,), "keypoint heads of Detectron2 models are not supported"),
    "MODEL.LOAD_PROPOSALS": ((False,), "precomputed proposals are not supported"),
    "MODEL.FPN.OUT_CHANNELS": ((256,), "the FPN has 256 channels"),
    "MODEL.FPN.NORM": (("",), "FPN convolutions without normalisation only"),
    "MODEL.FPN.FUSE_TYPE": (("sum",), "the FPN adds its top-down and lateral paths"),
    "MODEL.PROPOSAL_GENERATOR.NAME": (("RPN",), "only the RPN proposal generator"),
    "MODEL.ANCHOR_GENERATOR.NAME": (("DefaultAnchorGenerator",), "only axis-aligned anchors"),
    "MODEL.ANCHOR_GENERATOR.OFFSET": ((0.0, 0), "anchor offset 0 only"),
    "MODEL.RPN.HEAD_NAME": (("StandardRPNHead",), "only StandardRPNHead"),
    "MODEL.RPN.BBOX_REG_WEIGHTS": (([1.0, 1.0, 1.0, 1.0],), "RPN box weights (1, 1, 1, 1) only"),
    "MODEL.RPN.CONV_DIMS": (([-1],), "one RPN conv as wide as its input"),
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": (("ROIAlignV2",), "ROIAlignV2 only"),
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": ((0,), "adaptive sampling (0) only"),
    "MODEL.ROI_BOX_HEAD.FC_DIM": ((1024,), "fc layers of 1024"),
    "MODEL.ROI_BOX_HEAD.NORM": (("",), "box head without normalisation only"),
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": ((False,), "softmax box classifiers only"),
    "MODEL.ROI_MASK_HEAD.NAME": (("MaskRCNNConvUpsampleHead",), "only MaskRCNNConvUpsampleHead"),
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": ((14,), "14x14 mask RoIs"),
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": ((0,), "adaptive sampling (0) only"),
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": (("ROIAlignV2",), "ROIAlignV2 only"),
    "MODEL.ROI_MASK_HEAD.CONV_DIM": ((256,), "mask head convolutions of 256"),
    "MODEL.ROI_MASK_HEAD.NORM": (("",), "mask head without normalisation only"),
    "MODEL.RESNETS.NORM": (("FrozenBN", "BN", "SyncBN", "naiveSyncBN"), "batch norms (frozen at inference) only"),
    "MODEL.RESNETS.RES5_DILATION": ((1,), "res5 without dilation only"),
    "MODEL.RESNETS.RES2_OUT_CHANNELS": ((256,), "standard ResNet widths only"),
    "MODEL.RESNETS.STEM_OUT_CHANNELS": ((64,), "standard ResNet widths only"),
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": (([False, False, False, False],), "deformable convolutions are not supported"),
    "TEST.AUG.ENABLED": ((False,), "test-time augmentation is not supported"),
    "INPUT.FORMAT": (("BGR", "RGB"), "BGR or RGB input only"),
}
FPN_FEATURES = {"MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
                "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
                "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
                "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"], "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
                "MODEL.ROI_BOX_HEAD.NUM_FC": 2, "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
                "MODEL.ROI_MASK_HEAD.NUM_CONV": 4}
C4_FEATURES = {"MODEL.BACKBONE.NAME": "build_resnet_backbone", "MODEL.RESNETS.OUT_FEATURES": ["res4"],
               "MODEL.RPN.IN_FEATURES": ["res4"], "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
               "MODEL.ROI_HEADS.IN_FEATURES": ["res4"], "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
               "MODEL.ROI_MASK_HEAD.NUM_CONV": 0}
# Detectron2's builtin COCO instance datasets: 80 contiguous classes, COCO category ids 1..90
COCO_DATASET_PREFIXES = ("coco_2014_", "coco_2017_")

_BASE = "_BASE_"


@dataclass
class Detectron2Config:
    """A Detectron2 config, flattened to ``{"MODEL.RPN.NMS_THRESH": 0.7, ...}`` over its defaults,
    and the files it was read from (``sources``, the including file first)."""

    values: dict[str, Any]
    sources: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def _decode(value: Any) -> Any:
    # yacs' _decode_cfg_value: strings that are Python literals become them; tuples become lists
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, tuple):
        return [_decode(v) for v in value]
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _load_yaml(path: str, chain: tuple[str, ...]) -> tuple[dict, list[str]]:
    import yaml

    if path in chain:
        raise ValueError(f"{chain[0]}: _BASE_ files include each other: {' -> '.join(chain + (path,))}")
    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        where = f" (a _BASE_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"Detectron2 config not found: {path}{where}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a YAML file: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Detectron2 config is a mapping of keys, got a {type(data).__name__}")
    sources = [path]
    if _BASE in data:
        bases = data.pop(_BASE)
        merged: dict = {}
        for base in bases if isinstance(bases, list) else [bases]:
            base = os.path.expanduser(str(base))
            if "://" not in base and not base.startswith("/"):
                base = posixpath.join(posixpath.dirname(path), base) if "://" in path else os.path.join(os.path.dirname(path), base)
            loaded, more = _load_yaml(base, chain + (path,))
            _merge(loaded, merged)
            sources += more
        _merge(data, merged)
        data = merged
    return data, sources


def _merge(a: dict, b: dict) -> None:
    """fvcore's merge_a_into_b: a's keys over b's, recursively for mappings."""
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            _merge(v, b[k])
        else:
            b[k] = v


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _decode(v)
    return out


def _is_known(key: str) -> bool:
    return key in DEFAULTS or key in NOT_INFERENCE_KEYS or key.startswith(NOT_INFERENCE_PREFIXES)


def read_config(path) -> Detectron2Config:
    """A Detectron2 YAML config (local path or fsspec URI) over Detectron2's defaults."""
    path = os.fspath(path)
    if path.endswith(".py"):
        raise ValueError(f"{path}: a Detectron2 LazyConfig (Python code) is not read; give the YAML config "
                         "the model was trained with")
    data, sources = _load_yaml(path, ())
    given = _flatten(data)
    unknown = sorted(k for k in given if not _is_known(k))
    if unknown:
        raise ValueError(f"{path}: keys Detectron2's config does not have: {unknown[:5]}")
    values = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
    return Detectron2Config(values, sources)


def default_config(kind: str) -> Detectron2Config:
    """Detectron2's defaults with its Base-RCNN-FPN (``kind`` "fpn") or Base-RCNN-C4 keys: what a
    file without a config is read with (MASK_ON as its weights say)."""
    values = {**DEFAULTS, **(FPN_FEATURES if kind == "fpn" else C4_FEATURES), "MODEL.MASK_ON": True}
    if kind == "fpn":
        values.update({"MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
                       "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000})
    return Detectron2Config(values, [])


def model_settings(cfg: Detectron2Config, kind: str, where: str) -> dict[str, Any]:
    """Builder settings (``convention="detectron2"``) of the ``kind`` ("fpn" / "c4") architecture a
    config describes; refuses, naming the key, any value this package does not implement."""
    v = cfg.values
    for key, (allowed, why) in FIXED.items():
        if v[key] not in allowed:
            raise ValueError(f"{where}: {key} = {v[key]!r} is not supported ({why})")
    structure = FPN_FEATURES if kind == "fpn" else C4_FEATURES
    for key, expected in structure.items():
        if v[key] != expected:
            raise ValueError(f"{where}: {key} = {v[key]!r}, but the weights are a {kind.upper()} Mask R-CNN, "
                             f"whose {key} is {expected!r}")
    sizes, ratios = v["MODEL.ANCHOR_GENERATOR.SIZES"], v["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"]
    levels = 5 if kind == "fpn" else 1
    if kind == "fpn" and len(sizes) == 1:  # one list: the same sizes on every level (Detectron2 broadcasts)
        sizes = sizes * levels
    if len(ratios) == 1:
        ratios = ratios * levels
    if len(sizes) != levels or len(ratios) != levels:
        raise ValueError(f"{where}: MODEL.ANCHOR_GENERATOR needs 1 or {levels} lists of sizes and aspect ratios")
    if len(v["MODEL.PIXEL_MEAN"]) != 3 or len(v["MODEL.PIXEL_STD"]) != 3:
        raise ValueError(f"{where}: MODEL.PIXEL_MEAN and PIXEL_STD need 3 values (one per channel)")
    min_size = v["INPUT.MIN_SIZE_TEST"]
    return {
        "convention": "detectron2",
        "input_format": v["INPUT.FORMAT"],
        "stride_in_1x1": bool(v["MODEL.RESNETS.STRIDE_IN_1X1"]),
        "min_size": int(min_size),
        "size_divisible": 32 if kind == "fpn" else 0,  # its backbones' size_divisibility
        "max_size": int(v["INPUT.MAX_SIZE_TEST"]),
        "image_mean": [float(x) for x in v["MODEL.PIXEL_MEAN"]],
        "image_std": [float(x) for x in v["MODEL.PIXEL_STD"]],
        "rpn_anchor_sizes": [[int(s) for s in level] for level in sizes],
        "rpn_aspect_ratios": [[float(r) for r in level] for level in ratios],
        "rpn_pre_nms_top_n_test": int(v["MODEL.RPN.PRE_NMS_TOPK_TEST"]),
        "rpn_post_nms_top_n_test": int(v["MODEL.RPN.POST_NMS_TOPK_TEST"]),
        "rpn_nms_thresh": float(v["MODEL.RPN.NMS_THRESH"]),
        "rpn_min_size": float(v["MODEL.PROPOSAL_GENERATOR.MIN_SIZE"]),
        "box_score_thresh": float(v["MODEL.ROI_HEADS.SCORE_THRESH_TEST"]),
        "box_nms_thresh": float(v["MODEL.ROI_HEADS.NMS_THRESH_TEST"]),
        "box_detections_per_img": int(v["TEST.DETECTIONS_PER_IMAGE"]),
        "bbox_reg_weights": [float(x) for x in v["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"]],
    }


def is_coco(cfg: Detectron2Config) -> bool:
    """Whether the config trains on Detectron2's builtin COCO instance datasets (80 classes)."""
    names = list(cfg["DATASETS.TRAIN"]) + list(cfg["DATASETS.TEST"])
    return bool(names) and all(str(n).startswith(COCO_DATASET_PREFIXES) for n in names) \
        and int(cfg["MODEL.ROI_HEADS.NUM_CLASSES"]) == 80


def check_weights(cfg: Detectron2Config, *, depth: int, groups: int, num_classes: int, agnostic_boxes: bool,
                  agnostic_masks: bool, where: str) -> None:
    """Refuses a config that describes other weights than the file's."""
    v = cfg.values
    pairs = [("MODEL.RESNETS.DEPTH", depth), ("MODEL.RESNETS.NUM_GROUPS", groups),
             ("MODEL.ROI_HEADS.NUM_CLASSES", num_classes),
             ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", agnostic_boxes),
             ("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", agnostic_masks)]
    if groups > 1:
        pairs.append(("MODEL.RESNETS.WIDTH_PER_GROUP", 8))
    for key, found in pairs:
        if v[key] != found:
            raise ValueError(f"{where}: the config has {key} = {v[key]!r}, the weights {found!r}")
