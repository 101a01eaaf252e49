"""Multi-level RoIAlign for FPN features, pooled in one kernel launch.

Same constructor, forward and results as ``torchvision.ops.MultiScaleRoIAlign``; the
difference is how: torchvision loops over levels in Python and gathers the RoIs of
each level (a host sync per level on CUDA); here every RoI carries its level index
and one op pools them all.

``pooler`` picks the operator, for the paper's ablation (Table 2c): ``roi_align_legacy``
(torchvision's default, ``aligned=False``: what its COCO weights were trained with),
``roi_align`` (the half-pixel alignment the paper describes), ``roi_warp`` (corners
rounded to the grid, bilinear bins) and ``roi_pool`` (corners and bins rounded, max). The
first three pool every level in one launch; ``roi_pool`` loops over levels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ._registration import ops
from .roi_align import boxes_to_rois
from .roi_warp import quantize_rois

POOLERS = ("roi_align_legacy", "roi_align", "roi_warp", "roi_pool")


def _infer_scale(feature: Tensor, original_size: tuple[int, int]) -> float:
    # The scale is a power of two: round log2(feature size / image size). Plain Python
    # math (no tensor round-trip) keeps the first call traceable with fullgraph=True.
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** round(math.log2(approx))


class LevelMapper:
    """FPN level of each box, Eq. (1) of Lin et al. (2017), as torchvision computes it."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxes: list[Tensor]) -> Tensor:
        cat = torch.cat(boxes, dim=0)
        s = torch.sqrt((cat[:, 2] - cat[:, 0]) * (cat[:, 3] - cat[:, 1]))
        target = torch.floor(self.lvl0 + torch.log2(s / self.s0) + torch.tensor(self.eps, dtype=s.dtype))
        target = torch.clamp(target, min=self.k_min, max=self.k_max)
        return target.to(torch.int64) - self.k_min


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over a set of FPN feature maps; each box is pooled from the level
    matching its size (canonical box ``canonical_scale`` px maps to ``canonical_level``).

    forward(x: dict[str, Tensor], boxes: list[Tensor[L, 4]], image_shapes: list[(H, W)])
    returns (sum L, C, *output_size). Like torchvision, level scales are inferred from
    the first call's feature and image sizes.
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4, pooler: str = "roi_align_legacy"):
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
        self.pooler = pooler
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(_pair(output_size))
        self.scales: Optional[list[float]] = None
        self.map_levels: Optional[LevelMapper] = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def _setup_scales(self, features: list[Tensor], image_shapes: list[tuple[int, int]]) -> None:
        if not image_shapes:
            raise ValueError("image_shapes is empty: pass the (H, W) of every image in the batch")
        original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        self.scales = [_infer_scale(f, original) for f in features]
        k_min = int(-math.log2(self.scales[0]))
        k_max = int(-math.log2(self.scales[-1]))
        self.map_levels = LevelMapper(k_min, k_max, self.canonical_scale, self.canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        # Dictionary order, as torchvision's _filter_input.
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ValueError(f"none of the feature maps {self.featmap_names} is in the input (keys: {list(x)})")
        if self.scales is None or self.map_levels is None:
            self._setup_scales(features, image_shapes)
        rois = boxes_to_rois(boxes)
        ph, pw = self.output_size
        # one map: every RoI is on level 0 (no level tensor is made)
        levels = self.map_levels(list(boxes)) if len(features) > 1 else None
        scales = self.scales
        if self.pooler == "roi_pool":
            return self._roi_pool(features, rois, levels)
        aligned = self.pooler == "roi_align"
        if self.pooler == "roi_warp":  # corners in cells of each RoI's level: the kernel's scales are 1
            rois = quantize_rois(rois, scales[0] if levels is None else torch.tensor(scales, device=rois.device)[levels])
            scales = [1.0] * len(features)
        if levels is None:
            return ops.roi_align(features[0], rois, scales[0], ph, pw, self.sampling_ratio, aligned)
        return ops.multilevel_roi_align(features, rois, levels, scales, ph, pw, self.sampling_ratio, aligned)

    def _roi_pool(self, features: list[Tensor], rois: Tensor, levels: Optional[Tensor]) -> Tensor:
        ph, pw = self.output_size
        if levels is None:
            return ops.roi_pool(features[0], rois.to(features[0].dtype), self.scales[0], ph, pw)[0]
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], ph, pw))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = ops.roi_pool(feature, rois[idx].to(feature.dtype), scale, ph, pw)[0]
        return out

    def __repr__(self) -> str:
        pooler = "" if self.pooler == "roi_align_legacy" else f", pooler={self.pooler!r}"
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}{pooler})")
