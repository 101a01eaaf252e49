"""RoIWarp (Dai et al., MNC), the middle row of Mask R-CNN's pooler ablation (Table 2c).

Box corners are quantised to the feature grid, as RoIPool does (``round(x * spatial_scale)``,
halves away from zero), then each bin is sampled bilinearly and averaged, as RoIAlign does
without its half-pixel alignment. It is our RoIAlign kernel run on the quantised boxes, so it
has RoIAlign's devices, dtypes, autograd and checks.
"""
import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair

from ._registration import ops
from .roi_align import BoxesArg, boxes_to_rois, check_roi_values


def quantize_rois(rois: Tensor, spatial_scale: Tensor) -> Tensor:
    """[K, 5] RoIs with corners in feature-map cells, rounded as RoIPool rounds them
    (``spatial_scale``: a 0-d tensor for all, or a [K] tensor of each RoI's own)."""
    xy = rois[:, 1:] * spatial_scale.to(rois.dtype).reshape(-1, 1)
    return torch.cat([rois[:, :1], torch.sign(xy) * torch.floor(xy.abs() + 0.5)], dim=1)


def roi_warp(input: Tensor, boxes: BoxesArg, output_size: BroadcastingList2[int],
             spatial_scale: float = 1.0, sampling_ratio: int = -1) -> Tensor:
    """Bilinear pooling of RoIs quantised to the feature grid; arguments as ``roi_align``'s."""
    if not torch.jit.is_scripting():
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    rois = boxes_to_rois(boxes)
    if input.is_cuda and input.dim() == 4:
        check_roi_values(rois, input.size(0), "roi_warp")
    ph, pw = _pair(output_size)
    # corners already in cells: the kernel's scale is 1, so no rounding creeps back in
    return ops.roi_align(input, quantize_rois(rois, torch.tensor(spatial_scale, device=rois.device)), 1.0, int(ph), int(pw),
                         int(sampling_ratio), False)


torch.fx.wrap("roi_warp")  # a leaf for torch.fx, as roi_align


class RoIWarp(nn.Module):
    """Module form of :func:`roi_warp`."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = -1):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_warp(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio})")
