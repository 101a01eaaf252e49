"""mrcnn-batch: Mask R-CNN (and Keypoint R-CNN) with our own RoIAlign kernels."""
from .checkpoint import load_model, read_metadata, save_checkpoint
from .keypoint_rcnn import KeypointRCNN
from .mask_rcnn import MaskRCNN
from .models import (
    get_model,
    keypointrcnn_resnet18_fpn_small,
    keypointrcnn_resnet50_fpn,
    list_models,
    maskrcnn_resnet18_fpn_small,
    maskrcnn_resnet50_c4,
    maskrcnn_resnet50_c5,
    maskrcnn_resnet18_c5,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    maskrcnn_resnet101_fpn,
    maskrcnn_resnext101_32x8d_fpn,
)

__all__ = [
    "MaskRCNN",
    "KeypointRCNN",
    "get_model",
    "list_models",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet101_fpn",
    "maskrcnn_resnext101_32x8d_fpn",
    "maskrcnn_resnet18_fpn_small",
    "maskrcnn_resnet50_c4",
    "maskrcnn_resnet50_c5",
    "maskrcnn_resnet18_c5",
    "keypointrcnn_resnet50_fpn",
    "keypointrcnn_resnet18_fpn_small",
    "load_model",
    "read_metadata",
    "save_checkpoint",
]
from .coco_categories import COCO_CATEGORY_NAMES, COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON, label_names
from .paste import paste_masks, paste_masks_to_rle, rle_area
from .predictor import Predictor

__all__ += ["Predictor", "paste_masks", "paste_masks_to_rle", "rle_area", "COCO_CATEGORY_NAMES",
            "COCO_PERSON_KEYPOINT_NAMES", "COCO_PERSON_SKELETON", "label_names"]
