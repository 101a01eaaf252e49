"""COCO category names in the 91-index label space of torchvision's COCO detection models.

Index 0 is the background; the 10 ids in 1..90 that COCO never used are "N/A"
(80 categories in all). Copied as data from
torchvision's ``_COCO_CATEGORIES`` (torchvision/models/_meta.py).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

__all__ = ["COCO_CATEGORY_NAMES", "COCO_PERSON_KEYPOINT_NAMES", "COCO_PERSON_SKELETON", "default_keypoint_names",
           "default_keypoint_skeleton", "label_names"]

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


# COCO's person keypoints, in the order of its annotations and of torchvision's keypoint models
COCO_PERSON_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# the limbs COCO's person category draws (its "skeleton", 1-based there), as 0-based keypoint pairs
COCO_PERSON_SKELETON: tuple[tuple[int, int], ...] = tuple(
    (a - 1, b - 1) for a, b in (
        (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
        (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
    )
)


def default_keypoint_names(count: int) -> Optional[list[str]]:
    """The names of ``count`` keypoints when nothing says otherwise: COCO's person keypoints for
    17 (torchvision's keypoint models), else None."""
    return list(COCO_PERSON_KEYPOINT_NAMES) if count == len(COCO_PERSON_KEYPOINT_NAMES) else None


def default_keypoint_skeleton(names: Optional[Sequence[str]]) -> Optional[list[list[int]]]:
    """The skeleton of keypoints ``names`` when nothing says otherwise: COCO's for its person
    keypoints, else None."""
    if names is None or list(names) != list(COCO_PERSON_KEYPOINT_NAMES):
        return None
    return [list(p) for p in COCO_PERSON_SKELETON]
