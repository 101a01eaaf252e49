"""Input normalisation, resizing and batching, and mapping detections back to the input images.

:class:`GeneralizedRCNNTransform` matches torchvision's, so identical weights see identical
tensors; :class:`Detectron2Transform` is Detectron2's ``DefaultPredictor`` input path and its
``detector_postprocess``, for the models converted from its checkpoints.
"""
import math
from typing import Optional

import numpy as np
import torch
from torch import nn, Tensor
from torch.nn import functional as F

from .image_list import ImageList
from .paste import paste_masks, paste_masks_grid

MASK_OUTPUTS = ("probs", "binary", "raw")
INPUT_FORMATS = ("RGB", "BGR")  # the channel order a model's first convolution reads


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
        stride = float(max(1, self.size_divisible))  # 0: no rounding (Detectron2's C4 backbone)
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


def detectron2_resized_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """(h, w) after Detectron2's ResizeShortestEdge: in float64, the short side to ``short_edge``
    unless the long side would pass ``max_size``, then rounded half up."""
    size = short_edge * 1.0
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


class Detectron2Transform(GeneralizedRCNNTransform):
    """Detectron2's inference input and output path, step for step (``DefaultPredictor`` and
    ``GeneralizedRCNN.inference``):

    - the image as uint8 (float inputs in 0..1 are taken back to their uint8 values, exact for
      the Predictor's ``x / 255``), resized by ``ResizeShortestEdge(min_size, max_size)`` with
      Pillow's bilinear filter on the host (``min_size`` 0: not resized);
    - float32 in the model's ``input_format`` channel order ("BGR" for Detectron2's own
      weights), ``(x - image_mean) / image_std`` with mean and std in 0..255 units, zero-padded
      at the bottom/right to a multiple of ``size_divisible`` (its backbone's: 32 for the FPN,
      none, 0, for C4);
    - ``detector_postprocess``: boxes scaled to the input size by Python-float ratios, clipped
      to it, boxes with no width or height dropped, masks pasted by ``paste_masks_grid``
      (grid_sample; "binary" is values >= 0.5).

    Inference only: Detectron2-convention models are not trained here. Normalising and padding
    are GeneralizedRCNNTransform's (the same operations as Detectron2's).
    """

    def __init__(self, min_size, max_size: int, image_mean: list[float], image_std: list[float],
                 size_divisible: int = 32, input_format: str = "BGR"):
        super().__init__(min_size, max_size, image_mean, image_std, size_divisible)
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.input_format = input_format

    def forward(self, images: list[Tensor], targets=None) -> tuple[ImageList, None]:
        if targets is not None or self.training:
            raise ValueError("a Detectron2-convention model runs inference only (train with the torchvision recipe)")
        resized = [self.resize(image, i) for i, image in enumerate(images)]
        image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        return ImageList(self.batch_images([self.normalize(img) for img in resized]), image_sizes), None

    def resize(self, image: Tensor, index: int = 0) -> Tensor:
        """The image's uint8 values resized on the host (Pillow, as Detectron2), back on its device as
        float32 C x H x W in the model's channel order."""
        from PIL import Image

        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images are expected to be 3 x H x W, got shape {list(image.shape)} at index {index}")
        if image.is_floating_point():
            image = (image * 255.0).round_().clamp_(0, 255)
        hwc = image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        h, w = hwc.shape[:2]
        if self.min_size[-1] > 0:
            newh, neww = detectron2_resized_size(h, w, self.min_size[-1], self.max_size)
            hwc = np.asarray(Image.fromarray(np.ascontiguousarray(hwc)).resize((neww, newh), Image.BILINEAR))
        chw = torch.from_numpy(hwc.astype("float32").transpose(2, 0, 1))
        if self.input_format == "BGR":
            chw = chw.flip(0)
        return chw.to(image.device)

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes, original_image_sizes,
                    mask_output: str = "probs") -> list[dict[str, Tensor]]:
        if mask_output not in MASK_OUTPUTS:
            raise ValueError(f"mask_output must be one of {MASK_OUTPUTS}, got {mask_output!r}")
        out = []
        for pred, (h, w), (oh, ow) in zip(result, image_shapes, original_image_sizes):
            boxes = pred["boxes"].clone()
            boxes[:, 0::2] *= ow / w
            boxes[:, 1::2] *= oh / h
            boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=ow)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=oh)
            keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            pred = {k: v[keep] for k, v in pred.items()}
            pred["boxes"] = boxes[keep]
            if "masks" in pred and mask_output != "raw":
                threshold = 0.5 if mask_output == "binary" else None
                pred["masks"] = paste_masks_grid(pred["masks"], pred["boxes"], (oh, ow), threshold=threshold)
            out.append(pred)
        return out
