"""A batch of padded images together with each image's size before padding."""
import torch
from torch import Tensor


class ImageList:
    """``tensors``: ``[N, C, H_pad, W_pad]``; ``image_sizes``: the resized, unpadded ``(h, w)`` of each image."""

    def __init__(self, tensors: Tensor, image_sizes: list[tuple[int, int]]):
        self.tensors = tensors
        self.image_sizes = image_sizes

    def to(self, device: torch.device) -> "ImageList":
        return ImageList(self.tensors.to(device), self.image_sizes)
