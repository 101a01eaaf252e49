"""RoIAlign, RoIPool and RoIWarp operators with our own CPU and CUDA kernels (registered as torch.ops.mrcnn.*)."""
from ._registration import WITH_CUDA
from .poolers import LevelMapper, MultiScaleRoIAlign
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool
from .roi_warp import RoIWarp, roi_warp

__all__ = ["roi_align", "RoIAlign", "roi_pool", "RoIPool", "roi_warp", "RoIWarp", "MultiScaleRoIAlign", "LevelMapper",
           "WITH_CUDA"]
