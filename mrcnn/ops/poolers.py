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
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.utils import _pair

from .._utils import CONVENTIONS
from ._registration import ops
from .roi_align import boxes_to_rois
from .roi_warp import quantize_rois

POOLERS = ("roi_align_legacy", "roi_align", "roi_warp", "roi_pool")


class LevelMapper:
    """FPN level of each box, Eq. (1) of Lin et al. (2017), as torchvision computes it:
    floor(4 + log2(s / 224) + 1e-6); with ``convention="detectron2"`` as Detectron2's
    ``assign_boxes_to_levels``: floor(4 + log2(s / 224 + 1e-8))."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6, convention: str = "torchvision"):
        self.k_min = k_min
        self.k_max = k_max
        self.s0 = canonical_scale
        self.lvl0 = canonical_level
        self.eps = eps
        self.convention = convention

    def __call__(self, boxes: List[Tensor]) -> Tensor:
        cat = torch.cat(boxes, dim=0)
        s = torch.sqrt((cat[:, 2] - cat[:, 0]) * (cat[:, 3] - cat[:, 1]))
        if self.convention == "detectron2":
            target = torch.floor(self.lvl0 + torch.log2(s / self.s0 + 1e-8))
        else:
            target = torch.floor(self.lvl0 + torch.log2(s / self.s0) + torch.tensor(self.eps, dtype=s.dtype))
        target = torch.clamp(target, min=self.k_min, max=self.k_max)
        return target.to(torch.int64) - self.k_min


def _log2(x: float) -> float:
    # Python's math keeps torch.compile's first call in one graph; TorchScript has no math.log2
    if torch.jit.is_scripting():
        return float(torch.log2(torch.tensor(x, dtype=torch.float64)))
    return math.log2(x)


def _symbolic_tracing() -> bool:
    if torch.jit.is_scripting():
        return False
    else:
        return is_fx_symbolic_tracing()


def _level_mapper(scales: List[float], canonical_scale: int, canonical_level: int,
                  convention: str = "torchvision") -> LevelMapper:
    return LevelMapper(int(-_log2(scales[0])), int(-_log2(scales[-1])), canonical_scale, canonical_level,
                       convention=convention)


# The three steps of the forward are leaves for torch.fx (as torchvision wraps its own), so
# symbolic_trace and torchvision.models.feature_extraction see one pooling call, not shape arithmetic.
@torch.fx.wrap
def _filter_input(x: Dict[str, Tensor], featmap_names: List[str]) -> List[Tensor]:
    # dictionary order, as torchvision's
    features: List[Tensor] = []
    for k, v in x.items():
        if k in featmap_names:
            features.append(v)
    if len(features) == 0:
        raise ValueError(f"none of the feature maps {featmap_names} is in the input (keys: {list(x.keys())})")
    return features


@torch.fx.wrap
def _infer_scales(features: List[Tensor], image_shapes: List[Tuple[int, int]]) -> List[float]:
    """Each map's scale, a power of two: round(log2(feature size / largest image height))."""
    if len(image_shapes) == 0:
        raise ValueError("image_shapes is empty: pass the (H, W) of every image in the batch")
    original = 0
    for shape in image_shapes:
        original = max(original, shape[0])
    scales: List[float] = []
    for feature in features:
        approx = float(feature.shape[-2]) / float(original)
        scales.append(2.0 ** float(round(_log2(approx))))
    return scales


@torch.fx.wrap
def _multiscale_roi_align(features: List[Tensor], boxes: List[Tensor], scales: List[float],
                          output_size: Tuple[int, int], sampling_ratio: int, canonical_scale: int,
                          canonical_level: int, pooler: str, convention: str = "torchvision") -> Tensor:
    rois = boxes_to_rois(boxes)
    ph, pw = output_size[0], output_size[1]
    levels: Optional[Tensor] = None
    if len(features) > 1:  # one map: every RoI is on level 0 (no level tensor is made)
        levels = _level_mapper(scales, canonical_scale, canonical_level, convention)(boxes)
    if pooler == "roi_pool":
        # RoIPool computes its bins in the input's dtype: under bf16/fp16 that rounds corners by
        # several cells, so it pools fp32 features (a max picks values, the result is exact).
        dtype = features[0].dtype
        work = torch.float32 if dtype == torch.bfloat16 or dtype == torch.float16 else dtype
        if levels is None:
            return ops.roi_pool(features[0].to(work), rois.to(work), scales[0], ph, pw)[0].to(dtype)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], ph, pw))
        for level, feature in enumerate(features):
            idx = torch.where(levels == level)[0]
            out[idx] = ops.roi_pool(feature.to(work), rois[idx].to(work), scales[level], ph, pw)[0].to(dtype)
        return out
    aligned = pooler == "roi_align"
    if pooler == "roi_warp":  # corners in cells of each RoI's level: the kernel's scales are 1
        level_scales = torch.tensor(scales, device=rois.device)
        rois = quantize_rois(rois, level_scales[0] if levels is None else level_scales[levels])
        scales = [1.0 for _ in scales]
    if levels is None:
        return ops.roi_align(features[0], rois, scales[0], ph, pw, sampling_ratio, aligned)
    return ops.multilevel_roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, aligned)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over a set of FPN feature maps; each box is pooled from the level
    matching its size (canonical box ``canonical_scale`` px maps to ``canonical_level``).

    forward(x: dict[str, Tensor], boxes: list[Tensor[L, 4]], image_shapes: list[(H, W)])
    returns (sum L, C, *output_size). Like torchvision, level scales are inferred from
    the first call's feature and image sizes. TorchScript compiles it; torch.fx sees one leaf call.
    ``convention="detectron2"`` assigns levels as Detectron2's ROIPooler does (see LevelMapper).
    """

    __annotations__ = {"scales": Optional[List[float]], "map_levels": Optional[LevelMapper]}

    def __init__(self, featmap_names: List[str], output_size, sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4, pooler: str = "roi_align_legacy",
                 convention: str = "torchvision"):
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.pooler = pooler
        self.convention = convention
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size: Tuple[int, int] = tuple(_pair(output_size))
        self.scales: Optional[List[float]] = None
        self.map_levels: Optional[LevelMapper] = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        scales = self.scales
        if scales is None:
            scales = _infer_scales(features, image_shapes)
            # kept from the first call, as torchvision; a traced graph infers them on every call
            if not _symbolic_tracing():
                self.scales = scales
                self.map_levels = _level_mapper(scales, self.canonical_scale, self.canonical_level, self.convention)
        return _multiscale_roi_align(features, boxes, scales, self.output_size, self.sampling_ratio,
                                     self.canonical_scale, self.canonical_level, self.pooler, self.convention)

    def __repr__(self) -> str:
        pooler = "" if self.pooler == "roi_align_legacy" else f", pooler={self.pooler!r}"
        pooler += "" if self.convention == "torchvision" else f", convention={self.convention!r}"
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}{pooler})")
