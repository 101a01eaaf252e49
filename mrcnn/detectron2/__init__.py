"""Detectron2's Mask R-CNN checkpoints, run by this package's model with Detectron2's arithmetic.

:func:`load_detectron2_model` reads a Detectron2 ``.pth`` (``DetectionCheckpointer``) or model zoo
``.pkl`` file (:mod:`.files`, no code unpickled) and its YAML config if given (:mod:`.config`;
else Detectron2's defaults), converts the weights to the torchvision layout (:mod:`.convert`) and
builds the matching architecture with ``convention="detectron2"``: the detections equal
Detectron2's ``DefaultPredictor``'s. R50, R101 and X101-32x8d FPN and R50-C4 Mask R-CNN are
supported. A COCO model (a config naming Detectron2's COCO datasets) writes COCO's category ids
and names, as torchvision's COCO models do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from ..coco_categories import COCO_CATEGORY_NAMES
from ..registry import build_model
from .config import Detectron2Config, check_weights, default_config, is_coco, model_settings, read_config
from .convert import architecture_of, to_torchvision_layout
from .files import is_pickle_file, read_weights, tensors

__all__ = ["load_detectron2_model", "read_metadata", "is_detectron2_checkpoint", "is_pickle_file", "read_config",
           "read_weights", "coco_label_ids"]

_D2_MARKERS = ("backbone.bottom_up.", "backbone.res", "proposal_generator.", "roi_heads.box_predictor.cls_score")


def coco_label_ids() -> list[int]:
    """COCO's 80 category ids in Detectron2's contiguous class order (its ``thing_dataset_id_to_contiguous_id``)."""
    return [i for i, name in enumerate(COCO_CATEGORY_NAMES) if i > 0 and name != "N/A"]


def _model_dict(obj: Any) -> Optional[dict]:
    """The ``"model"`` dict of a Detectron2 checkpoint object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        return None
    keys = [str(k).removeprefix("module.") for k in obj["model"]]
    return obj["model"] if any(k.startswith(_D2_MARKERS) for k in keys) else None


def is_detectron2_checkpoint(obj: Any) -> bool:
    """Whether a read weights file is Detectron2's (``{"model": {Detectron2 names: arrays}, ...}``)."""
    return _model_dict(obj) is not None


@dataclass
class _Checkpoint:
    """A Detectron2 checkpoint read with its config: what building or describing its model needs."""

    path: str
    weights: dict[str, Tensor]  # Detectron2's names
    architecture: str
    config: Detectron2Config
    settings: dict  # builder settings
    label_ids: Optional[list[int]]  # COCO category id of each class, for a COCO model

    @property
    def class_names(self) -> Optional[list[str]]:
        return list(COCO_CATEGORY_NAMES) if self.label_ids is not None else None


def _read(path, config, obj) -> _Checkpoint:
    path = os.fspath(path)
    if obj is None:
        obj = read_weights(path)
    model_dict = _model_dict(obj)
    if model_dict is None:
        if isinstance(obj, dict) and "blobs" in obj:
            raise ValueError(f"{path}: a Caffe2 / Detectron1 file (\"blobs\"), not supported: convert it with "
                             "Detectron2 and save a Detectron2 checkpoint")
        raise ValueError(f"{path}: not a Detectron2 checkpoint (no \"model\" dict of Detectron2 weight names)")
    weights = {k.removeprefix("module."): v for k, v in tensors(model_dict, path).items()}
    found = architecture_of(weights, path)
    if isinstance(config, Detectron2Config):
        cfg = config
    else:
        cfg = read_config(config) if config is not None else default_config(found.kind)
    where = cfg.sources[0] if cfg.sources else f"{path} (with Detectron2's default config)"
    settings = model_settings(cfg, found.kind, where)
    check_weights(cfg, depth=found.depth, groups=found.groups,
                  num_classes=weights["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1,
                  agnostic_boxes=weights["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4,
                  agnostic_masks=weights["roi_heads.mask_head.predictor.weight"].shape[0] == 1, where=where)
    return _Checkpoint(path, weights, found.name, cfg, settings, coco_label_ids() if is_coco(cfg) else None)


def read_metadata(path, config=None, *, obj: Any = None) -> dict:
    """What a Detectron2 checkpoint and its config say (as :func:`mrcnn.checkpoint.read_metadata`)."""
    return _metadata(_read(path, config, obj))


def _metadata(ck: _Checkpoint) -> dict:
    return {
        "format": "detectron2-pkl" if is_pickle_file(ck.path) else "detectron2",
        "architecture": ck.architecture,
        # labels with the background: COCO's 91 for a COCO model, else the classes and the background
        "num_classes": max(ck.label_ids) + 1 if ck.label_ids else ck.weights["roi_heads.box_predictor.cls_score.weight"].shape[0],
        "class_names": ck.class_names,
        "class_names_source": "coco" if ck.label_ids is not None else None,
        "config": ck.config.sources[0] if ck.config.sources else None,
        "min_size": ck.settings["min_size"],
        "max_size": ck.settings["max_size"],
        "score_thresh": ck.settings["box_score_thresh"],
        "builder_kwargs": dict(ck.settings),
    }


def load_detectron2_model(path, config=None, *, obj: Any = None, **overrides) -> nn.Module:
    """Build the Mask R-CNN a Detectron2 checkpoint holds (``path``: local or fsspec URI; ``obj``:
    the file already read) with ``config`` (a YAML path or URI, or a read config; None:
    Detectron2's defaults) and Detectron2's inference arithmetic. ``overrides`` replace builder
    settings (e.g. ``box_score_thresh``). The model has ``class_names`` (COCO's for a COCO
    config, else None) and ``checkpoint_metadata``."""
    ck = _read(path, config, obj)
    architecture, state_dict, num_labels = to_torchvision_layout(ck.weights, ck.path, ck.label_ids)
    model = build_model(architecture, num_classes=num_labels, pretrained=True, **{**ck.settings, **overrides})
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ck.path}: Detectron2 weights do not fit {architecture}: {str(e).splitlines()[0]}") from None
    model.class_names = ck.class_names
    model.checkpoint_metadata = _metadata(ck)
    return model
