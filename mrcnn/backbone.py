"""ResNet/ResNeXt feature extractors: with an FPN (outputs '0'..'3', strides 4..32, plus 'pool',
stride 64), or a single map: res4 (stride 16) for the C4 variant, res5 (stride 32) for C5.

Built from torchvision's ResNet and FPN layers, the same modules torchvision's Mask R-CNN uses,
so state_dict keys (``backbone.body.*``, ``backbone.fpn.*``) match.
"""
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torchvision
from torch import nn, Tensor
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .weights_file import load_state_dict_file


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, state_dict keys and fp32 arithmetic) that keeps
    float16/bfloat16 inputs in their dtype: its fp32 scale and shift would otherwise promote every
    activation between autocast's convolutions to fp32 (and back), tripling the memory traffic."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float16 and x.dtype != torch.bfloat16:
            return super().forward(x)  # torchvision's own arithmetic: fp32 results bit-identical
        # torchvision's scale and shift (in fp32, its order), then in the input's dtype
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class Detectron2FrozenBatchNorm2d(FrozenBatchNorm2d):
    """The same buffers and keys, with Detectron2's inference arithmetic: its FrozenBatchNorm2d
    runs ``F.batch_norm(training=False)`` on inputs without gradients (one fused op, other
    rounding than torchvision's ``x * scale + shift``)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad or x.dtype != torch.float32:
            return super().forward(x)
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              training=False, eps=self.eps)


def move_stride_to_1x1(module: nn.Module) -> None:
    """Detectron2's ``STRIDE_IN_1X1`` (the MSRA ResNets its own weights use): each strided
    bottleneck downsamples in its first 1x1 convolution, not in the 3x3 (torchvision's)."""
    for block in module.modules():
        if isinstance(block, resnet.Bottleneck) and block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


_RESNETS = {"resnet18": resnet.resnet18, "resnet50": resnet.resnet50, "resnet101": resnet.resnet101,
            "resnext101_32x8d": resnet.resnext101_32x8d}


def validate_trainable_layers(is_trained: bool, trainable_layers: Optional[int], max_value: int = 5, default: int = 3) -> int:
    """torchvision's rule: without pretrained weights every layer trains; otherwise default to 3."""
    if not is_trained:
        # a randomly initialised backbone has nothing worth freezing
        if trainable_layers is not None:
            warnings.warn(
                "trainable_backbone_layers has no effect without weights or weights_backbone; "
                f"all {max_value} backbone layers are trainable"
            )
        return max_value
    if trainable_layers is None:
        trainable_layers = default
    if not 0 <= trainable_layers <= max_value:
        raise ValueError(f"trainable_backbone_layers should be in [0, {max_value}], got {trainable_layers}")
    return trainable_layers


DEFAULT_RETURNED_LAYERS = [1, 2, 3, 4]


def normalize_returned_layers(returned_layers: Optional[list[int]]) -> list[int]:
    """``returned_layers`` as a sorted list of distinct ResNet stages in 1..4 (None: all four)."""
    if returned_layers is None:
        return list(DEFAULT_RETURNED_LAYERS)
    layers = sorted({int(v) for v in returned_layers})
    if not layers or layers[0] < 1 or layers[-1] > 4 or len(layers) != len(list(returned_layers)):
        raise ValueError(f"returned_layers should be distinct ResNet stages in 1..4, got {list(returned_layers)}")
    return layers


def num_fpn_levels(returned_layers: Optional[list[int]] = None) -> int:
    """FPN levels of a backbone reading ``returned_layers`` (None: all four): one each, plus 'pool'."""
    return len(normalize_returned_layers(returned_layers)) + 1


def _resnet(name: str, weights_backbone: Optional[str], norm_layer: Callable[..., nn.Module]) -> nn.Module:
    """torchvision's ResNet ``name``, with an ImageNet state_dict loaded (strict) if given."""
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(_RESNETS)}")
    resnet = _RESNETS[name](weights=None, norm_layer=norm_layer)
    if weights_backbone is not None:
        state_dict = load_state_dict_file(weights_backbone)
        try:
            resnet.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_backbone}: not a {name} ImageNet state_dict: {e}") from None
    return resnet


def resnet_fpn_backbone(
    name: str = "resnet50",
    *,
    weights_backbone: Optional[str] = None,
    norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
    trainable_layers: int = 3,
    fpn_norm_layer: Optional[Callable[..., nn.Module]] = None,
    out_channels: int = 256,
    returned_layers: Optional[list[int]] = None,
) -> BackboneWithFPN:
    """A ResNet with an FPN on layer1-4 (or ``returned_layers``) and a LastLevelMaxPool 'pool' level.

    Args:
        name: "resnet18", "resnet50", "resnet101" or "resnext101_32x8d".
        weights_backbone: path or fsspec URI of an ImageNet ResNet state_dict, loaded (strict) into
            the ResNet before the classifier is dropped.
        norm_layer: normalisation in the ResNet (:class:`FrozenBatchNorm2d` for v1 with pretrained
            weights; it keeps autocast's float16/bfloat16 activations in that dtype).
        trainable_layers: how many of layer4, layer3, layer2, layer1, conv1 (from the top) train.
        fpn_norm_layer: normalisation inside the FPN convs (v2 uses BatchNorm2d).
        out_channels: channels of every FPN level (torchvision's detectors: 256).
        returned_layers: the ResNet stages (1-4) the FPN reads, as torchvision's argument of that
            name (default all four). Without 4, layer4 is not built at all: ``[1, 2, 3]`` gives FPN
            levels '0'-'2' (strides 4-16) plus 'pool' (stride 32), for small objects and small models.
    """
    body = _resnet(name, weights_backbone, norm_layer)
    returned_layers = normalize_returned_layers(returned_layers)
    backbone = _resnet_fpn_extractor(body, trainable_layers, returned_layers=returned_layers, norm_layer=fpn_norm_layer)
    if out_channels != backbone.out_channels:
        # torchvision's extractor (which also freezes the bottom layers) always builds 256 channels
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, out_channels, LastLevelMaxPool(), fpn_norm_layer)
        backbone.out_channels = out_channels
    # layer k has stride 2^(k+1); 'pool' halves the last
    backbone.feature_strides = [2 ** (k + 1) for k in returned_layers] + [2 ** (returned_layers[-1] + 2)]
    return backbone


class ResNetSingleMap(nn.Module):
    """A ResNet up to res4 (stride 16, the paper's C4 variant) or res5 (stride 32, C5), giving the one
    feature map '0'. The C4 backbone's res5 (layer4) is not here: it is the second stage's head.
    ``lateral`` (C5's) maps the ResNet's channels to ``out_channels``, as an FPN's lateral conv does."""

    def __init__(self, body: nn.Module, out_channels: int, lateral: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        self.lateral = lateral
        self.out_channels = out_channels
        self.feature_strides = [16 if "layer4" not in dict(body.named_children()) else 32]

    def forward(self, x):
        features = self.body(x)
        if self.lateral is not None:
            features = OrderedDict((name, self.lateral(f)) for name, f in features.items())
        return features


def _trainable_resnet(name: str, weights_backbone: Optional[str], norm_layer: Callable[..., nn.Module],
                      trainable_layers: int) -> nn.Module:
    """torchvision's ResNet with all but the top ``trainable_layers`` of layer4, layer3, layer2, layer1,
    conv1 frozen (torchvision's rule for its FPN extractor)."""
    resnet = _resnet(name, weights_backbone, norm_layer)
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers should be in [0, 5], got {trainable_layers}")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for param_name, parameter in resnet.named_parameters():
        if not any(param_name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    return resnet


def resnet_c4_backbone(
    name: str = "resnet50",
    *,
    weights_backbone: Optional[str] = None,
    norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
    trainable_layers: int = 3,
) -> tuple[ResNetSingleMap, nn.Module]:
    """(res2-res4 backbone, res5): a ResNet split for the C4 variant (He et al. 2017, Fig. 4 left).

    ``trainable_layers`` counts from the top as for the FPN backbones: layer4 (res5, in the head),
    layer3, layer2, layer1, conv1. ``weights_backbone`` initialises both parts (ImageNet ResNet).
    """
    resnet = _trainable_resnet(name, weights_backbone, norm_layer, trainable_layers)
    body = IntermediateLayerGetter(resnet, return_layers={"layer3": "0"})
    return ResNetSingleMap(body, resnet.layer4[0].conv1.in_channels), resnet.layer4  # res5 reads res4's channels


def resnet_c5_backbone(
    name: str = "resnet50",
    *,
    weights_backbone: Optional[str] = None,
    norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
    trainable_layers: int = 3,
    out_channels: Optional[int] = None,
    lateral_norm_layer: Optional[Callable[..., nn.Module]] = None,
) -> ResNetSingleMap:
    """res2-res5 with res5's output (stride 32) as the one map: the C5 variant of the paper's
    large-stride ablation (Table 2d). Arguments as :func:`resnet_c4_backbone`'s; with
    ``out_channels``, a 1x1 conv (and ``lateral_norm_layer``, as torchvision's FPN lateral) maps
    res5's channels to that many, still at stride 32."""
    resnet = _trainable_resnet(name, weights_backbone, norm_layer, trainable_layers)
    body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
    channels = resnet.fc.in_features  # res5's output channels
    if out_channels is None:
        return ResNetSingleMap(body, channels)
    lateral = Conv2dNormActivation(channels, out_channels, kernel_size=1, padding=0, norm_layer=lateral_norm_layer,
                                   activation_layer=None)
    return ResNetSingleMap(body, out_channels, lateral)
