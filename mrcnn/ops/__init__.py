"""RoIAlign operators with our own CPU and CUDA kernels (registered as torch.ops.mrcnn.*)."""
from ._registration import WITH_CUDA
from .poolers import LevelMapper, MultiScaleRoIAlign
from .roi_align import RoIAlign, roi_align

__all__ = ["roi_align", "RoIAlign", "MultiScaleRoIAlign", "LevelMapper", "WITH_CUDA"]
