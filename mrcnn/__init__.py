"""mrcnn-batch: Mask R-CNN with our own RoIAlign kernels."""
from .checkpoint import load_model, read_metadata, save_checkpoint
from .mask_rcnn import (
    MaskRCNN,
    maskrcnn_resnet18_fpn_small,
    maskrcnn_resnet101_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)

__all__ = [
    "MaskRCNN",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet101_fpn",
    "maskrcnn_resnet18_fpn_small",
    "load_model",
    "read_metadata",
    "save_checkpoint",
]
from .coco_categories import COCO_CATEGORY_NAMES, label_names
from .paste import paste_masks, paste_masks_to_rle, rle_area
from .predictor import Predictor

__all__ += ["Predictor", "paste_masks", "paste_masks_to_rle", "rle_area", "COCO_CATEGORY_NAMES", "label_names"]
