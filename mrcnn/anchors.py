"""Anchor boxes for the RPN: one set of cell anchors per feature level, tiled over its grid."""
import math
from typing import Optional, Sequence

import torch
from torch import nn, Tensor

from ._utils import CONVENTIONS
from .image_list import ImageList


DEFAULT_SIZES = (32, 64, 128, 256, 512)  # one per FPN level, as torchvision's Mask R-CNN
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width, on every level


class AnchorGenerator(nn.Module):
    """Generates anchors for a list of feature maps.

    ``sizes[i]`` and ``aspect_ratios[i]`` (height / width) give the cell anchors of level ``i``;
    each level gets ``len(sizes[i]) * len(aspect_ratios[i])`` anchors per location. Cell anchors are
    zero-centred and rounded to whole pixels; the stride of a level is the padded image size
    divided (integer division) by the feature map size. Anchors have the feature maps' dtype, but
    at least float32: float16/bfloat16 (autocast) would round them by up to 4 px at 1024-2048 px.

    ``convention="detectron2"`` makes Detectron2's anchors: cell anchors not rounded (computed in
    float64, then float32) and ordered size-major (every aspect ratio of the first size, then the
    next size), and each level's stride given (``strides``, the backbone's: 4..64 for the FPN) where
    torchvision divides sizes (61, not 64, for an 800-px image's 13-cell stride-64 map).
    """

    def __init__(self, sizes=None, aspect_ratios=None, *, convention: str = "torchvision",
                 strides: Optional[Sequence[int]] = None):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if (strides is None) != (convention == "torchvision"):
            raise ValueError("strides are given for (and only for) the detectron2 convention")
        if sizes is None:
            sizes = DEFAULT_SIZES
        if aspect_ratios is None:
            aspect_ratios = DEFAULT_ASPECT_RATIOS
        # one entry per level; a flat sequence means one value per level (sizes) or the same
        # set on every level (aspect ratios); lists (from a checkpoint's JSON) become tuples
        sizes = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes ({len(sizes)} levels) and aspect_ratios ({len(aspect_ratios)}) must match")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.convention = convention
        self.strides = None if strides is None else tuple(int(v) for v in strides)
        if self.strides is not None and len(self.strides) != len(sizes):
            raise ValueError(f"strides ({len(self.strides)}) and sizes ({len(sizes)} levels) must match")
        make = self.generate_anchors if convention == "torchvision" else detectron2_cell_anchors
        self.cell_anchors = [make(s, a) for s, a in zip(sizes, aspect_ratios)]

    @staticmethod
    def generate_anchors(scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        base_anchors = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base_anchors.round()

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes, strides, cell_anchors) -> list[Tensor]:
        anchors = []
        for (grid_height, grid_width), (stride_height, stride_width), base_anchors in zip(
            grid_sizes, strides, cell_anchors
        ):
            device = base_anchors.device
            shifts_x = torch.arange(0, grid_width, dtype=torch.int32, device=device) * stride_width
            shifts_y = torch.arange(0, grid_height, dtype=torch.int32, device=device) * stride_height
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            # every (location, cell anchor) pair, location-major
            anchors.append((shifts.view(-1, 1, 4) + base_anchors.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors of all levels concatenated, one tensor per image (all images share them)."""
        if len(feature_maps) != len(self.cell_anchors):
            raise ValueError(
                f"got {len(feature_maps)} feature maps but the anchor generator has {len(self.cell_anchors)} levels"
            )
        padded_size = image_list.tensors.shape[-2:]
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        # fp32 at least: in bf16, neighbouring stride-4 anchors beyond 1024 px would coincide
        dtype, device = torch.promote_types(feature_maps[0].dtype, torch.float32), feature_maps[0].device
        given = self.strides or [None] * len(grid_sizes)
        strides = [
            [
                torch.empty((), dtype=torch.int64, device=device).fill_(s or padded_size[0] // g[0]),
                torch.empty((), dtype=torch.int64, device=device).fill_(s or padded_size[1] // g[1]),
            ]
            for g, s in zip(grid_sizes, given)
        ]
        cell_anchors = [a.to(dtype=dtype, device=device) for a in self.cell_anchors]
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides, cell_anchors))
        return [anchors for _ in image_list.image_sizes]


def detectron2_cell_anchors(sizes, aspect_ratios) -> Tensor:
    """Detectron2's zero-centred cell anchors (DefaultAnchorGenerator.generate_cell_anchors): for
    each size, for each aspect ratio h/w, w = sqrt(size^2 / ratio) and h = ratio * w in float64,
    then float32; not rounded."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / float(ratio))
            h = float(ratio) * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)
