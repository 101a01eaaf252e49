"""The builder functions users call: ``get_model(name, ...)`` and one function per architecture
(``maskrcnn_resnet50_fpn(weights=...)`` ...), with torchvision's arguments.

The architectures themselves are declared once, where their models are defined (``@register_model``
in :mod:`mrcnn.mask_rcnn` and :mod:`mrcnn.keypoint_rcnn`); importing those modules here fills the registry.
"""
from typing import Any, Optional

from torch import nn

from . import keypoint_rcnn, mask_rcnn  # noqa: F401  (register the Mask R-CNN and Keypoint R-CNN architectures)
from .checkpoint import load_weights_into
from .registry import build_model, get_architecture, list_models

__all__ = ["get_model", "list_models"]


def get_model(
    name: str,
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build architecture ``name`` (one of :func:`list_models`), and load ``weights`` if given.

    ``weights``: path or fsspec URI of a full checkpoint (a torchvision state_dict, including the
    published COCO files with their legacy key names, or our format). ``weights_backbone``: path of
    an ImageNet state_dict of the architecture's ResNet/ResNeXt body. ``progress`` is accepted for
    compatibility (nothing is downloaded). Other keyword arguments are the model's (see
    :class:`mrcnn.MaskRCNN`).
    """
    model = build_model(name, num_classes=num_classes, pretrained=weights is not None,
                        weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                        **kwargs)
    if weights is not None:
        load_weights_into(model, weights)
    return model


def _builder(name: str):
    def builder(*, weights: Optional[str] = None, progress: bool = True, num_classes: Optional[int] = None,
                weights_backbone: Optional[str] = None, trainable_backbone_layers: Optional[int] = None,
                **kwargs: Any) -> nn.Module:
        return get_model(name, weights=weights, num_classes=num_classes, weights_backbone=weights_backbone,
                         trainable_backbone_layers=trainable_backbone_layers, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{get_architecture(name).summary}\n\nThe arguments of :func:`get_model`."
    return builder


maskrcnn_resnet50_fpn = _builder("maskrcnn_resnet50_fpn")
maskrcnn_resnet50_fpn_v2 = _builder("maskrcnn_resnet50_fpn_v2")
maskrcnn_resnet101_fpn = _builder("maskrcnn_resnet101_fpn")
maskrcnn_resnext101_32x8d_fpn = _builder("maskrcnn_resnext101_32x8d_fpn")
maskrcnn_resnet18_fpn_small = _builder("maskrcnn_resnet18_fpn_small")
maskrcnn_resnet50_c4 = _builder("maskrcnn_resnet50_c4")
maskrcnn_resnet50_c5 = _builder("maskrcnn_resnet50_c5")
maskrcnn_resnet18_c5 = _builder("maskrcnn_resnet18_c5")
keypointrcnn_resnet50_fpn = _builder("keypointrcnn_resnet50_fpn")
keypointrcnn_resnet18_fpn_small = _builder("keypointrcnn_resnet18_fpn_small")
__all__ += list_models()
# every registered architecture has its builder function here
assert all(callable(globals().get(name)) for name in list_models()), "an architecture lacks its builder function"
