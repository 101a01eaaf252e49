"""Input normalisation, resizing and batching, and mapping detections back to the input images.

Matches torchvision's GeneralizedRCNNTransform, so identical weights see identical tensors.
"""
import math
from typing import Optional

import torch
from torch import nn, Tensor
from torch.nn import functional as F

from .image_list import ImageList
from .paste import paste_masks

MASK_OUTPUTS = ("probs", "binary", "raw")


def resize_image_and_masks(
    image: Tensor, min_size: int, max_size: int, target: Optional[dict[str, Tensor]] = None
) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
    """Scale so the short side is ``min_size`` unless the long side would pass ``max_size``.

    Bilinear for the image, nearest for target masks; ``recompute_scale_factor=True`` makes the
    output size ``floor(side * scale)``, as in torchvision.
    """
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    image = F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]
    if target is not None and "masks" in target:
        masks = target["masks"]
        masks = F.interpolate(masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True)[:, 0].byte()
        target["masks"] = masks
    return image, target


def _ratios(original_size, new_size, device) -> list[Tensor]:
    """(height, width) ratios of ``new_size`` to ``original_size``, float32 tensors as torchvision computes them."""
    return [
        torch.tensor(s, dtype=torch.float32, device=device) / torch.tensor(s_orig, dtype=torch.float32, device=device)
        for s, s_orig in zip(new_size, original_size)
    ]


def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """Scale ``[x1, y1, x2, y2]`` boxes from an image of ``original_size`` (h, w) to ``new_size``."""
    ratio_height, ratio_width = _ratios(original_size, new_size, boxes.device)
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin * ratio_width, ymin * ratio_height, xmax * ratio_width, ymax * ratio_height), dim=1)


def resize_keypoints(keypoints: Tensor, original_size, new_size) -> Tensor:
    """Scale ``[..., K, 3]`` keypoints (x, y, visibility) from ``original_size`` (h, w) to ``new_size``."""
    ratio_h, ratio_w = _ratios(original_size, new_size, keypoints.device)
    resized = keypoints.clone()
    resized[..., 0] *= ratio_w
    resized[..., 1] *= ratio_h
    return resized


class GeneralizedRCNNTransform(nn.Module):
    """Normalise, resize and pad a list of images (and their targets) into an ImageList.

    ``min_size`` may be a sequence: training picks one at random per image, eval uses the last.
    """

    def __init__(
        self,
        min_size,
        max_size: int,
        image_mean: list[float],
        image_std: list[float],
        size_divisible: int = 32,
    ):
        super().__init__()
        if not isinstance(min_size, (list, tuple)):
            min_size = (min_size,)
        self.min_size = tuple(min_size)
        self.max_size = max_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.size_divisible = size_divisible

    def forward(
        self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None
    ) -> tuple[ImageList, Optional[list[dict[str, Tensor]]]]:
        images = list(images)
        if targets is not None:
            # shallow copies, so the caller's dicts are not modified
            targets = [dict(t) for t in targets]
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"images are expected to be 3-D tensors [C, H, W], got shape {list(image.shape)} at index {i}")
            target = targets[i] if targets is not None else None
            image = self.normalize(image)
            image, target = self.resize(image, target)
            images[i] = image
            if targets is not None:
                targets[i] = target
        image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        return ImageList(self.batch_images(images), image_sizes), targets

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {image.dtype}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        h, w = image.shape[-2:]
        if self.training:
            # torch RNG (not Python's) so seeding torch makes training reproducible
            size = self.min_size[int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())]
        else:
            size = self.min_size[-1]
        image, target = resize_image_and_masks(image, size, self.max_size, target)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
            if "keypoints" in target:
                target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), image.shape[-2:])
        return image, target

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad every image at the bottom/right to the batch maximum, rounded up to ``size_divisible``."""
        stride = float(self.size_divisible)
        channels = max(img.shape[0] for img in images)
        height = int(math.ceil(float(max(img.shape[1] for img in images)) / stride) * stride)
        width = int(math.ceil(float(max(img.shape[2] for img in images)) / stride) * stride)
        batched = images[0].new_full((len(images), channels, height, width), 0)
        for i, img in enumerate(images):
            batched[i, : img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        return batched

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
        mask_output: str = "probs",
    ) -> list[dict[str, Tensor]]:
        """Boxes and keypoints back to input-image pixels; masks pasted per ``mask_output``:

        - "probs": float ``[N, 1, H, W]`` probabilities (torchvision's output)
        - "binary": bool ``[N, 1, H, W]``, probability > 0.5
        - "raw": the ``[N, 1, 28, 28]`` per-box probabilities, not pasted
        """
        if mask_output not in MASK_OUTPUTS:
            raise ValueError(f"mask_output must be one of {MASK_OUTPUTS}, got {mask_output!r}")
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "keypoints" in pred:
                pred["keypoints"] = resize_keypoints(pred["keypoints"], im_s, o_im_s)
            if "masks" in pred and mask_output != "raw":
                threshold = 0.5 if mask_output == "binary" else None
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], tuple(o_im_s), threshold=threshold)
        return result

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(\n    Normalize(mean={self.image_mean}, std={self.image_std})\n"
            f"    Resize(min_size={self.min_size}, max_size={self.max_size}, mode='bilinear')\n)"
        )
