"""mrcnn-batch: Mask R-CNN with our own RoIAlign kernels."""
from .checkpoint import load_model, read_metadata, save_checkpoint
from .mask_rcnn import MaskRCNN, maskrcnn_resnet101_fpn, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

__all__ = [
    "MaskRCNN",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet101_fpn",
    "load_model",
    "read_metadata",
    "save_checkpoint",
]
