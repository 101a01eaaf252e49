"""Mask R-CNN: the model class, the ResNet-50/101 FPN builders (v1 and v2 recipes) and a small ResNet-18 one."""
from typing import Any, Optional

import torch
from torch import nn, Tensor
from torchvision.ops import FrozenBatchNorm2d

from .anchors import AnchorGenerator
from .backbone import normalize_returned_layers, resnet_fpn_backbone, validate_trainable_layers
from .ops import MultiScaleRoIAlign
from .roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    MaskMLPHead,
    MaskMLPPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    RoIHeads,
    TwoMLPHead,
)
from .rpn import RegionProposalNetwork, RPNHead
from .transform import MASK_OUTPUTS, GeneralizedRCNNTransform

__all__ = [
    "MaskRCNN",
    "build_model",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet101_fpn",
    "maskrcnn_resnet18_fpn_small",
]


class MaskRCNN(nn.Module):
    """Mask R-CNN (He et al., 2017) with the module layout and state_dict keys of torchvision's.

    Eval: ``model(images)`` with ``images`` a list of float ``[3, H, W]`` tensors in 0..1 returns one
    dict per image: ``boxes`` float ``[N, 4]`` (x1, y1, x2, y2, input-image pixels), ``labels`` int64
    ``[N]``, ``scores`` float ``[N]``, and ``masks`` as chosen by ``model.mask_output``:
    "probs" (default; float ``[N, 1, H, W]`` probabilities, as torchvision), "binary" (bool
    ``[N, 1, H, W]``, probability > 0.5) or "raw" (float ``[N, 1, 28, 28]`` per-box probabilities, not
    pasted; paste them with ``mrcnn.paste.paste_masks(masks, boxes, (H, W))``).

    Train: ``model(images, targets)``, each target holding ``boxes`` float ``[G, 4]``, ``labels`` int64
    ``[G]`` and ``masks`` uint8 ``[G, H, W]``, returns the losses ``loss_classifier``, ``loss_box_reg``,
    ``loss_mask``, ``loss_objectness`` and ``loss_rpn_box_reg``.

    The keyword arguments are torchvision's ``MaskRCNN`` ones (see its documentation), plus
    ``rpn_anchor_sizes`` / ``rpn_aspect_ratios`` (per FPN level; plain values, so checkpoints
    record them) as an alternative to passing a whole ``rpn_anchor_generator``, and the paper's
    ablation switches (Table 2), recorded in checkpoints too: ``roi_pooler`` (the default
    poolers' operator: ``roi_align_legacy``, torchvision's; ``roi_align``, ``roi_warp``,
    ``roi_pool``), ``mask_loss`` (``sigmoid`` per class, the paper's; ``softmax`` over classes)
    and ``mask_head_type`` (the default mask head: ``fcn``, four 3x3 convs; ``mlp``, fc layers).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Optional[int] = None,
        # transform
        min_size=800,
        max_size: int = 1333,
        image_mean: Optional[list[float]] = None,
        image_std: Optional[list[float]] = None,
        # RPN
        rpn_anchor_generator: Optional[AnchorGenerator] = None,
        rpn_anchor_sizes: Optional[list[list[int]]] = None,
        rpn_aspect_ratios: Optional[list[list[float]]] = None,
        rpn_head: Optional[nn.Module] = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        # box head
        box_roi_pool: Optional[nn.Module] = None,
        box_head: Optional[nn.Module] = None,
        box_predictor: Optional[nn.Module] = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        bbox_reg_weights: Optional[tuple[float, float, float, float]] = None,
        # mask head
        mask_roi_pool: Optional[nn.Module] = None,
        mask_head: Optional[nn.Module] = None,
        mask_predictor: Optional[nn.Module] = None,
        # ours
        size_divisible: int = 32,
        mask_output: str = "probs",
        roi_pooler: str = "roi_align_legacy",
        mask_loss: str = "sigmoid",
        mask_head_type: str = "fcn",
    ):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should have an out_channels attribute (channels of every feature map)")
        if num_classes is not None:
            if box_predictor is not None or mask_predictor is not None:
                raise ValueError("num_classes should be None when box_predictor or mask_predictor is given")
        elif box_predictor is None or mask_predictor is None:
            raise ValueError("num_classes is required unless box_predictor and mask_predictor are given")
        out_channels = backbone.out_channels

        if rpn_anchor_generator is None:
            rpn_anchor_generator = AnchorGenerator(rpn_anchor_sizes, rpn_aspect_ratios)
        elif rpn_anchor_sizes is not None or rpn_aspect_ratios is not None:
            raise ValueError("give rpn_anchor_generator or rpn_anchor_sizes/rpn_aspect_ratios, not both")
        if rpn_head is None:
            rpn_head = RPNHead(out_channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = RegionProposalNetwork(
            rpn_anchor_generator,
            rpn_head,
            rpn_fg_iou_thresh,
            rpn_bg_iou_thresh,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )

        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2, pooler=roi_pooler)
        if box_head is None:
            resolution = box_roi_pool.output_size[0]
            box_head = TwoMLPHead(out_channels * resolution**2, 1024)
        if box_predictor is None:
            box_predictor = FastRCNNPredictor(1024, num_classes)
        if mask_roi_pool is None:
            mask_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2, pooler=roi_pooler)
        if mask_head_type not in MASK_HEADS:
            raise ValueError(f"mask_head_type must be one of {MASK_HEADS}, got {mask_head_type!r}")
        if mask_head_type == "mlp":
            if (mask_head is None) != (mask_predictor is None):
                raise ValueError("mask_head_type='mlp' builds both the mask head and its predictor: give both or neither")
            if mask_head is None:
                mask_head, mask_predictor = mask_branch("mlp", out_channels, num_classes, (),
                                                        resolution=mask_roi_pool.output_size[0])
        if mask_head is None:
            mask_head = MaskRCNNHeads(out_channels, (256, 256, 256, 256), 1)
        if mask_predictor is None:
            mask_predictor = MaskRCNNPredictor(256, 256, num_classes)

        roi_heads = RoIHeads(
            box_roi_pool,
            box_head,
            box_predictor,
            box_fg_iou_thresh,
            box_bg_iou_thresh,
            box_batch_size_per_image,
            box_positive_fraction,
            bbox_reg_weights,
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            mask_loss=mask_loss,
        )

        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        # same attribute order as torchvision's GeneralizedRCNN, so state_dicts line up key for key
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, size_divisible)
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_output = mask_output

    @property
    def mask_output(self) -> str:
        return self._mask_output

    @mask_output.setter
    def mask_output(self, value: str) -> None:
        if value not in MASK_OUTPUTS:
            raise ValueError(f"mask_output must be one of {MASK_OUTPUTS}, got {value!r}")
        self._mask_output = value

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        if isinstance(images, Tensor) and images.dim() == 3:
            raise ValueError("images should be a list of [C, H, W] tensors (or a [N, C, H, W] batch), got one image")
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            if len(targets) != len(images):
                raise ValueError(f"got {len(images)} images but {len(targets)} targets")
            for i, target in enumerate(targets):
                boxes = target.get("boxes")
                if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(f"target {i}: boxes should be a float tensor of shape [N, 4]")

        original_image_sizes = []
        for i, img in enumerate(images):
            if img.dim() != 3:
                raise ValueError(f"image {i}: expected a [C, H, W] tensor, got shape {list(img.shape)}")
            original_image_sizes.append((int(img.shape[-2]), int(img.shape[-1])))

        image_list, targets = self.transform(images, targets)

        if targets is not None:
            for i, target in enumerate(targets):
                boxes = target["boxes"]
                degenerate = boxes[:, 2:] <= boxes[:, :2]
                if degenerate.any():
                    bad = boxes[torch.where(degenerate.any(dim=1))[0][0]].tolist()
                    raise ValueError(
                        f"all boxes should have positive height and width; found {bad} in target {i}"
                    )

        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)

        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(
            detections, image_list.image_sizes, original_image_sizes, mask_output=self.mask_output
        )


# ---- builders -------------------------------------------------------------------------------


ARCHITECTURES = (
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet101_fpn",
    "maskrcnn_resnet18_fpn_small",
)
SMALL_CHANNELS = 128  # FPN and head width of maskrcnn_resnet18_fpn_small


MASK_HEADS = ("fcn", "mlp")


def mask_branch(kind: str, in_channels: int, num_classes: int, conv_layers, *, norm_layer=None,
                resolution: int = 14) -> tuple[nn.Module, nn.Module]:
    """(mask head, mask predictor): ``fcn``, 3x3 convs then a 2x deconv and per-class 1x1 convs
    (the paper's); ``mlp``, fc 1024 -> 1024 -> classes x 28 x 28 on the flattened features."""
    if kind not in MASK_HEADS:
        raise ValueError(f"mask_head_type must be one of {MASK_HEADS}, got {kind!r}")
    if kind == "mlp":
        return (MaskMLPHead(in_channels * resolution * resolution, (1024, 1024)),
                MaskMLPPredictor(1024, num_classes, 2 * resolution))
    width = conv_layers[-1]
    return (MaskRCNNHeads(in_channels, conv_layers, 1, norm_layer=norm_layer),
            MaskRCNNPredictor(width, width, num_classes))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def build_model(
    architecture: str,
    *,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Build an architecture without loading full-model weights.

    ``pretrained`` says full weights will be loaded next: like torchvision, the v1 recipe then uses
    FrozenBatchNorm2d in the ResNet (BatchNorm2d when training from scratch) and freezes the bottom
    layers (``trainable_backbone_layers``, default 3; all 5 train without any pretrained weights).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    if pretrained:
        weights_backbone = None  # the full checkpoint overwrites the backbone anyway
    if num_classes is None:
        num_classes = 91
    is_trained = pretrained or weights_backbone is not None
    trainable = validate_trainable_layers(is_trained, trainable_backbone_layers)
    returned_layers = normalize_returned_layers(kwargs.pop("returned_layers", None))
    pooler = kwargs.get("roi_pooler", "roi_align_legacy")
    mask_kind = kwargs.get("mask_head_type", "fcn")
    if len(returned_layers) < 4:
        # RoIs are pooled from the FPN levels the backbone has ('pool' is for the RPN only)
        names = [str(i) for i in range(len(returned_layers))]
        kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2, pooler=pooler))
        kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2, pooler=pooler))

    if architecture in ("maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet18_fpn_small"):
        # these build their own RPN head, which needs the anchor count
        anchor_generator = AnchorGenerator(kwargs.pop("rpn_anchor_sizes", None), kwargs.pop("rpn_aspect_ratios", None))
        num_anchors = anchor_generator.num_anchors_per_location()[0]
    if architecture == "maskrcnn_resnet50_fpn_v2":
        # torchvision's v2: BatchNorm2d (not frozen) in the ResNet and the FPN, a two-conv RPN head,
        # 4 conv + BatchNorm + 1 fc box head, 4 conv + BatchNorm mask head
        backbone = resnet_fpn_backbone(
            "resnet50",
            weights_backbone=weights_backbone,
            norm_layer=nn.BatchNorm2d,
            trainable_layers=trainable,
            fpn_norm_layer=nn.BatchNorm2d,
            returned_layers=returned_layers,
        )
        out = backbone.out_channels
        kwargs = {
            "rpn_anchor_generator": anchor_generator,
            "rpn_head": RPNHead(out, num_anchors, conv_depth=2),
            "box_head": FastRCNNConvFCHead((out, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
            **kwargs,
        }
        if mask_kind == "fcn":  # the MLP head has no norm layer: MaskRCNN builds it
            kwargs.setdefault("mask_head", MaskRCNNHeads(out, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d))
    elif architecture == "maskrcnn_resnet18_fpn_small":
        # Ours, for small images and training from scratch on CPUs: ResNet-18, a 128-channel FPN,
        # and two-conv box and mask heads. GroupNorm in the FPN and heads, which train from
        # scratch at any batch size (BatchNorm stays in the ResNet, frozen as v1's when pretrained).
        out = SMALL_CHANNELS
        backbone = resnet_fpn_backbone(
            "resnet18",
            weights_backbone=weights_backbone,
            norm_layer=FrozenBatchNorm2d if is_trained else nn.BatchNorm2d,
            trainable_layers=trainable,
            fpn_norm_layer=_group_norm,
            out_channels=out,
            returned_layers=returned_layers,
        )
        representation = 2 * out
        mask_head, mask_predictor = mask_branch(mask_kind, out, num_classes, [out, out], norm_layer=_group_norm)
        kwargs = {
            "rpn_anchor_generator": anchor_generator,
            "rpn_head": RPNHead(out, num_anchors),
            "box_head": FastRCNNConvFCHead((out, 7, 7), [out, out], [representation], norm_layer=_group_norm),
            "box_predictor": FastRCNNPredictor(representation, num_classes),
            "mask_head": mask_head,
            "mask_predictor": mask_predictor,
            **kwargs,
        }
        num_classes = None  # given to the predictors above
    else:
        # torchvision trains BatchNorm when starting from scratch and freezes it otherwise
        norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
        body = "resnet101" if architecture == "maskrcnn_resnet101_fpn" else "resnet50"
        backbone = resnet_fpn_backbone(
            body, weights_backbone=weights_backbone, norm_layer=norm_layer, trainable_layers=trainable,
            returned_layers=returned_layers,
        )
    model = MaskRCNN(backbone, num_classes=num_classes, **kwargs)
    model.architecture = architecture
    return model


def _build_and_load(architecture: str, weights: Optional[str], **kwargs: Any) -> MaskRCNN:
    model = build_model(architecture, pretrained=weights is not None, **kwargs)
    if weights is not None:
        from .checkpoint import load_weights_into

        load_weights_into(model, weights)
    return model


def maskrcnn_resnet50_fpn(
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN ResNet-50-FPN (torchvision's ``maskrcnn_resnet50_fpn``; 37.9/34.6 box/mask AP with COCO weights).

    ``weights``: path or fsspec URI of a full checkpoint (torchvision state_dict, including the published
    COCO file with its legacy key names, or our format). ``weights_backbone``: path of an ImageNet
    ResNet-50 state_dict. ``progress`` is accepted for compatibility (nothing is downloaded). Other
    keyword arguments go to :class:`MaskRCNN`.
    """
    return _build_and_load(
        "maskrcnn_resnet50_fpn",
        weights,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )


def maskrcnn_resnet50_fpn_v2(
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Improved Mask R-CNN ResNet-50-FPN (torchvision's ``maskrcnn_resnet50_fpn_v2``; 47.4/41.8 AP with COCO weights).

    Same arguments as :func:`maskrcnn_resnet50_fpn`.
    """
    return _build_and_load(
        "maskrcnn_resnet50_fpn_v2",
        weights,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )


def maskrcnn_resnet101_fpn(
    *,
    weights: Optional[str] = None,
    progress: bool = True,
    num_classes: Optional[int] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN ResNet-101-FPN: the v1 recipe on a ResNet-101 body (torchvision has no builder for it).

    Same arguments as :func:`maskrcnn_resnet50_fpn`; ``weights_backbone`` is an ImageNet ResNet-101 state_dict.
    """
    return _build_and_load(
        "maskrcnn_resnet101_fpn",
        weights,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )


def maskrcnn_resnet18_fpn_small(
    *,
    weights: Optional[str] = None,
    num_classes: Optional[int] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> MaskRCNN:
    """A small Mask R-CNN (ours; no torchvision counterpart): ResNet-18 body, 128-channel FPN,
    two-conv GroupNorm box and mask heads; about 14M parameters against ResNet-50-FPN's 44M.

    Meant for small images and training from scratch on CPUs (the synthetic-shapes benchmark).
    ``weights``: one of our checkpoints of this architecture. ``weights_backbone``: an ImageNet
    ResNet-18 state_dict. Other arguments as :func:`maskrcnn_resnet50_fpn`.
    """
    return _build_and_load(
        "maskrcnn_resnet18_fpn_small",
        weights,
        num_classes=num_classes,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        **kwargs,
    )
