"""RoIPool (Girshick, Fast R-CNN): max pooling of box regions over quantised bins.

The pooler Mask R-CNN's RoIAlign replaced (the paper's ablation, Table 2c). A drop-in for
``torchvision.ops.roi_pool`` / ``torchvision.ops.RoIPool`` backed by our own kernels
(mrcnn/ops/csrc/roi_pool*): the same outputs, the same argmax (ties go to the first maximum in
row-major order) and so the same gradients.
"""

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair

from ._registration import ops
from .roi_align import BoxesArg, boxes_to_rois, check_roi_values


def roi_pool(input: Tensor, boxes: BoxesArg, output_size: BroadcastingList2[int],
             spatial_scale: float = 1.0) -> Tensor:
    """Max-pools each box of ``boxes`` from ``input`` into ``output_size`` bins.

    Same signature and results as ``torchvision.ops.roi_pool``: input (N, C, H, W); boxes a
    [K, 5] tensor (batch index, x0, y0, x1, y1) or a list of [L, 4] tensors, one per image;
    returns (K, C, *output_size). Box corners are rounded to the feature grid (``x *
    spatial_scale``); a bin that falls outside the map pools to 0.
    """
    if not torch.jit.is_scripting():
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    rois = boxes_to_rois(boxes)
    ph, pw = _pair(output_size)
    if input.is_cuda and input.dim() == 4:
        check_roi_values(rois, input.size(0), "roi_pool")
    output, _ = ops.roi_pool(input, rois, float(spatial_scale), int(ph), int(pw))
    return output


torch.fx.wrap("roi_pool")  # a leaf for torch.fx, as roi_align


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` (as ``torchvision.ops.RoIPool``)."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"
