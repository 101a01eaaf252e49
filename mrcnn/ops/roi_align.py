"""RoIAlign (He et al., Mask R-CNN): bilinear sampling of box regions, no quantisation.

A drop-in for ``torchvision.ops.roi_align`` / ``torchvision.ops.RoIAlign`` backed by our
own kernels (mrcnn/ops/csrc).
"""
from typing import List, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair

from ._registration import ops

# What every operator accepts as boxes (torchvision's annotation, so TorchScript compiles callers);
# tuples of tensors work too outside TorchScript.
BoxesArg = Union[Tensor, List[Tensor]]


def boxes_to_rois(boxes: BoxesArg) -> Tensor:
    """A [K, 5] tensor of (batch_index, x0, y0, x1, y1) from either accepted box format."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError(f"boxes must be a [K, 5] tensor or a list of [L, 4] tensors, got shape {list(boxes.shape)}")
        return boxes
    if not torch.jit.is_scripting():
        if not isinstance(boxes, (list, tuple)):
            raise TypeError(f"boxes must be a Tensor or a list of Tensors, got {type(boxes).__name__}")
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor):
                raise ValueError(f"boxes[{i}] must be a [L, 4] tensor, got {type(b).__name__}")
    if len(boxes) == 0:
        raise ValueError("boxes is an empty list: pass one [L, 4] tensor per image")
    ref = boxes[0]
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.size(1) != 4:
            raise ValueError(f"boxes[{i}] must be a [L, 4] tensor, got shape {list(b.shape)}")
        if b.device != ref.device or b.dtype != ref.dtype:
            raise ValueError(f"boxes[{i}] is {b.dtype} on {b.device}, boxes[0] is {ref.dtype} on {ref.device}")
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, torch.cat(list(boxes), dim=0)], dim=1)


def check_roi_values(rois: Tensor, batch_size: int, what: str = "roi_align") -> None:
    """Raise ValueError for non-finite boxes or batch indices outside [0, batch_size).

    The CPU kernels check this themselves; on CUDA it costs one device->host sync, so
    callers that produce their own boxes (the model) may skip it: the CUDA kernel never
    reads out of bounds, it writes NaN for such RoIs instead.
    """
    if rois.numel() == 0:
        return
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():
            return
    finite = torch.isfinite(rois).all(dim=1)
    idx = rois[:, 0]
    in_range = (idx >= 0) & (idx < batch_size)
    bad = ~(finite & in_range)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        row: List[float] = rois[k].tolist()
        if not bool(finite[k]):
            raise ValueError(f"{what}: box {k} has non-finite values {row}")
        raise ValueError(f"{what}: box {k} has batch index {row[0]}, outside [0, {batch_size}) "
                         f"for a batch of {batch_size} images")


def roi_align(
    input: Tensor,
    boxes: BoxesArg,
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pools each box of ``boxes`` from ``input`` into a fixed ``output_size`` grid.

    Same signature and results as ``torchvision.ops.roi_align``:
    input (N, C, H, W); boxes a [K, 5] tensor (batch index, x0, y0, x1, y1) or a list of
    [L, 4] tensors, one per image; returns (K, C, *output_size). ``sampling_ratio <= 0``
    samples adaptively (ceil(roi / output) points per bin); ``aligned=True`` shifts
    by half a pixel, the correct alignment.
    Float16/bfloat16 inputs accumulate in float32 and accept float32 boxes.
    """
    if not torch.jit.is_scripting():
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    rois = boxes_to_rois(boxes)
    ph, pw = _pair(output_size)
    if input.is_cuda and input.dim() == 4:
        check_roi_values(rois, input.size(0))
    return ops.roi_align(input, rois, float(spatial_scale), int(ph), int(pw), int(sampling_ratio), bool(aligned))


# torch.fx treats the operator as one leaf call (torchvision's does the same), so symbolic_trace
# and torchvision.models.feature_extraction do not trace into the argument checks.
torch.fx.wrap("roi_align")


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (as ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")
