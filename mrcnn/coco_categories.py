"""COCO category names in the 91-index label space of torchvision's COCO detection models.

Index 0 is the background; the 10 ids in 1..90 that COCO never used are "N/A"
(80 categories in all). Copied as data from
torchvision's ``_COCO_CATEGORIES`` (torchvision/models/_meta.py).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

__all__ = ["COCO_CATEGORY_NAMES", "label_names"]

COCO_CATEGORY_NAMES: tuple[str, ...] = (
    "__background__",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def label_names(labels: Iterable[int], class_names: Optional[Sequence[str]] = None) -> list[str]:
    """Names for integer labels; ``class_names`` defaults to COCO.

    A label outside ``class_names`` raises ValueError naming it (it means the model and
    the class list disagree).
    """
    names = COCO_CATEGORY_NAMES if class_names is None else class_names
    out = []
    for label in labels:
        i = int(label)
        if not 0 <= i < len(names):
            raise ValueError(f"label {i} is outside the {len(names)} class names")
        out.append(str(names[i]))
    return out
