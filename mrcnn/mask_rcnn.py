"""Mask R-CNN: the model class and its architectures: ResNet/ResNeXt-FPN (v1 and v2 recipes, and a
small ResNet-18 one) and the paper's ResNet-50-C4.

The architectures are registered in :mod:`mrcnn.registry`; their builder functions
(``mrcnn.maskrcnn_resnet50_fpn`` ...) and ``mrcnn.get_model`` are in :mod:`mrcnn.models`.
"""
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn, Tensor

from ._utils import CONVENTIONS
from .anchors import AnchorGenerator
from .backbone import (
    DEFAULT_RETURNED_LAYERS,
    Detectron2FrozenBatchNorm2d,
    FrozenBatchNorm2d,
    move_stride_to_1x1,
    normalize_returned_layers,
    resnet_c4_backbone,
    resnet_c5_backbone,
    resnet_fpn_backbone,
    validate_trainable_layers,
)
from .ops import MultiScaleRoIAlign
from .registry import register_model
from .roi_heads import (
    DEFAULT_BBOX_REG_WEIGHTS,
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
from .transform import MASK_OUTPUTS, Detectron2Transform, GeneralizedRCNNTransform

__all__ = ["MaskRCNN", "mask_branch"]

# the ablation switches' defaults: recorded in checkpoints only when set otherwise, so readers
# that predate a switch build the same model from a checkpoint that does not use it
SWITCH_DEFAULTS = {"roi_pooler": "roi_align_legacy", "mask_loss": "sigmoid", "mask_head_type": "fcn"}


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

    Under ``torch.autocast`` (float16/bfloat16) convolutions and fc layers run in that dtype (the
    FrozenBatchNorm ResNets keep their activations in it too), while anchors, box decoding, scores,
    top-k, NMS, clipping, the boxes RoIAlign pools and the mask probabilities stay float32: outputs are
    float32, and boxes are not rounded to bf16's 4-8 px steps at 1024-2048 px.

    The keyword arguments are torchvision's ``MaskRCNN`` ones (see its documentation), plus
    ``rpn_anchor_sizes`` / ``rpn_aspect_ratios`` (per FPN level; plain values, so checkpoints
    record them) as an alternative to passing a whole ``rpn_anchor_generator``, and the paper's
    ablation switches (Table 2), recorded in checkpoints too: ``roi_pooler`` (the default
    poolers' operator: ``roi_align_legacy``, torchvision's; ``roi_align``, ``roi_warp``,
    ``roi_pool``), ``mask_loss`` (``sigmoid`` per class, the paper's; ``softmax`` over classes)
    and ``mask_head_type`` (the default mask head: ``fcn``, four 3x3 convs; ``mlp``, fc layers).

    ``convention="detectron2"`` (inference only) reproduces Detectron2's ``GeneralizedRCNN``
    arithmetic for weights converted from its checkpoints (:mod:`mrcnn.detectron2`):
    :class:`~mrcnn.transform.Detectron2Transform` (``input_format``, "BGR" by default, and
    mean/std in 0..255 units), its anchors and RPN filtering, ROIAlignV2 (aligned, adaptive
    sampling) with its level assignment, no tiny-box filter, its ``detector_postprocess`` and
    grid_sample mask paste; ``rpn_min_size`` is its RPN.MIN_SIZE.
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
        convention: str = "torchvision",
        input_format: Optional[str] = None,
        rpn_min_size: Optional[float] = None,
        # the mask branch: off in KeypointRCNN, which builds its keypoint branch instead
        _with_masks: bool = True,
    ):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        detectron2 = convention == "detectron2"
        if input_format is None:
            input_format = "BGR" if detectron2 else "RGB"
        if not detectron2 and (input_format != "RGB" or rpn_min_size is not None):
            raise ValueError("input_format and rpn_min_size are settings of the detectron2 convention")
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should have an out_channels attribute (channels of every feature map)")
        if not _with_masks:
            if mask_roi_pool is not None or mask_head is not None or mask_predictor is not None:
                raise ValueError("this model has no mask branch: mask_roi_pool, mask_head and mask_predictor must be None")
            if mask_loss != SWITCH_DEFAULTS["mask_loss"] or mask_head_type != SWITCH_DEFAULTS["mask_head_type"]:
                raise ValueError("this model has no mask branch: mask_loss and mask_head_type do not apply")
        if num_classes is not None:
            if box_predictor is not None or mask_predictor is not None:
                raise ValueError("num_classes should be None when box_predictor or mask_predictor is given")
        elif box_predictor is None or (_with_masks and mask_predictor is None):
            raise ValueError("num_classes is required unless the box (and mask) predictors are given")
        out_channels = backbone.out_channels

        if rpn_anchor_generator is None:
            rpn_anchor_generator = anchor_generator(rpn_anchor_sizes, rpn_aspect_ratios, convention, backbone)
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
            convention=convention,
            min_size=rpn_min_size,
        )

        if box_roi_pool is None:
            box_roi_pool = roi_pool(["0", "1", "2", "3"], 7, roi_pooler, convention)
        if box_head is None:
            resolution = box_roi_pool.output_size[0]
            box_head = TwoMLPHead(out_channels * resolution**2, 1024)
        if box_predictor is None:
            box_predictor = FastRCNNPredictor(1024, num_classes)
        if mask_roi_pool is None and _with_masks:
            mask_roi_pool = roi_pool(["0", "1", "2", "3"], 14, roi_pooler, convention)
        if mask_head_type not in MASK_HEADS:
            raise ValueError(f"mask_head_type must be one of {MASK_HEADS}, got {mask_head_type!r}")
        if mask_head_type == "mlp":
            if (mask_head is None) != (mask_predictor is None):
                raise ValueError("mask_head_type='mlp' builds both the mask head and its predictor: give both or neither")
            if mask_head is None:
                mask_head, mask_predictor = mask_branch("mlp", out_channels, num_classes, (),
                                                        resolution=mask_roi_pool.output_size[0])
        if mask_head is None and _with_masks:
            mask_head = MaskRCNNHeads(out_channels, (256, 256, 256, 256), 1)
        if mask_predictor is None and _with_masks:
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
            convention=convention,
        )

        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        # same attribute order as torchvision's GeneralizedRCNN, so state_dicts line up key for key
        if detectron2:
            self.transform = Detectron2Transform(min_size, max_size, image_mean, image_std, size_divisible,
                                                 input_format)
        else:
            self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, size_divisible)
        self.convention = convention
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_output = mask_output
        # the plain settings this model is built with: what a checkpoint records (builder_kwargs)
        # and load_model passes back to the builder
        self.builder_kwargs = {
            "min_size": [int(v) for v in (min_size if isinstance(min_size, (list, tuple)) else [min_size])],
            "max_size": int(max_size),
            "image_mean": [float(v) for v in image_mean],
            "image_std": [float(v) for v in image_std],
            "size_divisible": int(size_divisible),
            "rpn_anchor_sizes": [[int(v) for v in s] for s in rpn_anchor_generator.sizes],
            "rpn_aspect_ratios": [[float(v) for v in a] for a in rpn_anchor_generator.aspect_ratios],
            "rpn_pre_nms_top_n_train": int(rpn_pre_nms_top_n_train),
            "rpn_pre_nms_top_n_test": int(rpn_pre_nms_top_n_test),
            "rpn_post_nms_top_n_train": int(rpn_post_nms_top_n_train),
            "rpn_post_nms_top_n_test": int(rpn_post_nms_top_n_test),
            "rpn_nms_thresh": float(rpn_nms_thresh),
            "rpn_fg_iou_thresh": float(rpn_fg_iou_thresh),
            "rpn_bg_iou_thresh": float(rpn_bg_iou_thresh),
            "rpn_batch_size_per_image": int(rpn_batch_size_per_image),
            "rpn_positive_fraction": float(rpn_positive_fraction),
            "rpn_score_thresh": float(rpn_score_thresh),
            "box_score_thresh": float(box_score_thresh),
            "box_nms_thresh": float(box_nms_thresh),
            "box_detections_per_img": int(box_detections_per_img),
            "box_fg_iou_thresh": float(box_fg_iou_thresh),
            "box_bg_iou_thresh": float(box_bg_iou_thresh),
            "box_batch_size_per_image": int(box_batch_size_per_image),
            "box_positive_fraction": float(box_positive_fraction),
            "bbox_reg_weights": [float(w) for w in (bbox_reg_weights or DEFAULT_BBOX_REG_WEIGHTS)],
        }
        switches = {"roi_pooler": roi_pooler, "mask_loss": mask_loss, "mask_head_type": mask_head_type}
        self.builder_kwargs.update({k: v for k, v in switches.items() if v != SWITCH_DEFAULTS[k]})
        if detectron2:  # recorded only when set: older readers know the torchvision convention
            self.builder_kwargs.update(convention=convention, input_format=input_format)
            if rpn_min_size is not None:
                self.builder_kwargs["rpn_min_size"] = float(rpn_min_size)

    # the RoI poolers the FPN builders make for fewer pyramid levels, and their output sizes
    ROI_POOL_SIZES = {"box_roi_pool": 7, "mask_roi_pool": 14}

    @classmethod
    def small_second_stage(cls, channels: int, num_classes: int, settings: dict) -> dict:
        """The small recipe's second stage on ``channels``-channel RoI features: a two-conv
        GroupNorm box head, one fc and the box predictor, then :meth:`small_heads`."""
        representation = 2 * channels
        return {
            "box_head": FastRCNNConvFCHead((channels, 7, 7), [channels, channels], [representation],
                                           norm_layer=_group_norm),
            "box_predictor": FastRCNNPredictor(representation, num_classes),
            **cls.small_heads(channels, num_classes, settings),
        }

    @staticmethod
    def small_heads(channels: int, num_classes: int, settings: dict) -> dict:
        """The small recipe's second-stage modules besides the box branch (a two-conv GroupNorm
        mask head), given the builder's ``settings``."""
        mask_head, mask_predictor = mask_branch(settings.get("mask_head_type", "fcn"), channels, num_classes,
                                                [channels, channels], norm_layer=_group_norm)
        return {"mask_head": mask_head, "mask_predictor": mask_predictor}

    def reset_predictors(self, num_classes: int) -> None:
        """New, untrained box and (if the model has them) mask predictors for ``num_classes`` classes (the background
        included): fine-tuning on other classes, as torchvision's tutorial does."""
        rh = self.roi_heads
        rh.box_predictor = FastRCNNPredictor(rh.box_predictor.cls_score.in_features, num_classes)
        old = rh.mask_predictor
        if old is None:
            return  # no mask branch (a keypoint model keeps its keypoint predictor: keypoints are not classes)
        if isinstance(old, MaskMLPPredictor):
            rh.mask_predictor = MaskMLPPredictor(old.mask_fc_logits.in_features, num_classes, old.resolution)
        else:
            rh.mask_predictor = MaskRCNNPredictor(old.conv5_mask.in_channels, old.conv5_mask.out_channels, num_classes)

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


def anchor_generator(sizes, aspect_ratios, convention: str, backbone: nn.Module) -> AnchorGenerator:
    """The RPN's anchors; Detectron2's take the backbone's feature strides."""
    if convention == "torchvision":
        return AnchorGenerator(sizes, aspect_ratios)
    return AnchorGenerator(sizes, aspect_ratios, convention=convention, strides=backbone.feature_strides)


def roi_pool(names: list[str], size: int, pooler: str, convention: str) -> MultiScaleRoIAlign:
    """An RoI pooler over feature maps ``names``: torchvision's (2 x 2 samples a bin) or
    Detectron2's (adaptive sampling, its POOLER_SAMPLING_RATIO 0)."""
    return MultiScaleRoIAlign(names, output_size=size, sampling_ratio=2 if convention == "torchvision" else 0,
                              pooler=pooler, convention=convention)


def _convention_settings(kwargs: dict, recipe: str) -> tuple[str, bool, type]:
    """(convention, stride_in_1x1, frozen norm layer) of a builder's settings, taken out of them."""
    convention = kwargs.get("convention", "torchvision")
    stride_in_1x1 = bool(kwargs.pop("stride_in_1x1", False))
    if convention == "detectron2":
        if recipe not in ("v1", "c4"):
            raise ValueError(f"the detectron2 convention is for the v1 FPN and C4 architectures, not the {recipe} recipe")
        kwargs.setdefault("roi_pooler", "roi_align")  # its ROIAlignV2
        return convention, stride_in_1x1, Detectron2FrozenBatchNorm2d
    return convention, stride_in_1x1, FrozenBatchNorm2d


# ---- the FPN architectures ------------------------------------------------------------------

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


def _fpn_builder(body: str, recipe: str, model_class=None):
    """The builder of a ResNet-FPN model (``model_class``, default :class:`MaskRCNN`; or
    KeypointRCNN): ``recipe`` "v1" (torchvision's maskrcnn_resnet50_fpn / keypointrcnn_resnet50_fpn),
    "v2" (maskrcnn_resnet50_fpn_v2) or "small" (ours, see maskrcnn_resnet18_fpn_small)."""
    model_class = model_class or MaskRCNN
    if recipe == "v2" and model_class is not MaskRCNN:
        raise ValueError("the v2 recipe is Mask R-CNN's")

    def build(*, num_classes, is_trained, weights_backbone, trainable_backbone_layers, returned_layers=None,
              **kwargs) -> MaskRCNN:
        trainable = validate_trainable_layers(is_trained, trainable_backbone_layers)
        returned_layers = normalize_returned_layers(returned_layers)
        convention, stride_in_1x1, frozen_norm = _convention_settings(kwargs, recipe)
        pooler = kwargs.get("roi_pooler", "roi_align_legacy")
        if len(returned_layers) < 4:
            # RoIs are pooled from the FPN levels the backbone has ('pool' is for the RPN only)
            names = [str(i) for i in range(len(returned_layers))]
            for key, size in model_class.ROI_POOL_SIZES.items():
                kwargs.setdefault(key, roi_pool(names, size, pooler, convention))
        if recipe != "v1":
            # these build their own RPN head, which needs the anchor count
            anchor_generator = AnchorGenerator(kwargs.pop("rpn_anchor_sizes", None), kwargs.pop("rpn_aspect_ratios", None))
            num_anchors = anchor_generator.num_anchors_per_location()[0]
        if recipe == "v2":
            # torchvision's v2: BatchNorm2d (not frozen) in the ResNet and the FPN, a two-conv RPN head,
            # 4 conv + BatchNorm + 1 fc box head, 4 conv + BatchNorm mask head
            backbone = resnet_fpn_backbone(body, weights_backbone=weights_backbone, norm_layer=nn.BatchNorm2d,
                                           trainable_layers=trainable, fpn_norm_layer=nn.BatchNorm2d,
                                           returned_layers=returned_layers)
            out = backbone.out_channels
            kwargs = {
                "rpn_anchor_generator": anchor_generator,
                "rpn_head": RPNHead(out, num_anchors, conv_depth=2),
                "box_head": FastRCNNConvFCHead((out, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
                **kwargs,
            }
            if kwargs.get("mask_head_type", "fcn") == "fcn":  # the MLP head has no norm layer: MaskRCNN builds it
                kwargs.setdefault("mask_head", MaskRCNNHeads(out, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d))
        elif recipe == "small":
            # For small images and training from scratch on CPUs: a 128-channel FPN and two-conv
            # heads. GroupNorm in the FPN and heads, which train from scratch at any batch size
            # (BatchNorm stays in the ResNet, frozen as v1's when pretrained).
            out = SMALL_CHANNELS
            backbone = resnet_fpn_backbone(body, weights_backbone=weights_backbone,
                                           norm_layer=FrozenBatchNorm2d if is_trained else nn.BatchNorm2d,
                                           trainable_layers=trainable, fpn_norm_layer=_group_norm, out_channels=out,
                                           returned_layers=returned_layers)
            kwargs = {
                "rpn_anchor_generator": anchor_generator,
                "rpn_head": RPNHead(out, num_anchors),
                **model_class.small_second_stage(out, num_classes, kwargs),
                **kwargs,
            }
            num_classes = None  # given to the predictors above
        else:
            # torchvision trains BatchNorm when starting from scratch and freezes it otherwise
            backbone = resnet_fpn_backbone(body, weights_backbone=weights_backbone,
                                           norm_layer=frozen_norm if is_trained else nn.BatchNorm2d,
                                           trainable_layers=trainable, returned_layers=returned_layers)
        if stride_in_1x1:
            move_stride_to_1x1(backbone)
        model = model_class(backbone, num_classes=num_classes, **kwargs)
        if returned_layers != DEFAULT_RETURNED_LAYERS:  # recorded only when set: older readers know the default
            model.builder_kwargs["returned_layers"] = returned_layers
        if stride_in_1x1:
            model.builder_kwargs["stride_in_1x1"] = True
        return model

    return build


MASK_LOGITS_KEY = "roi_heads.mask_predictor.mask_fcn_logits.weight"


def _fpn_keys(state_dict) -> tuple[Optional[str], Optional[str]]:
    """(ResNet body, box head kind "fc" / "conv") of an FPN R-CNN state_dict; (None, None) otherwise."""
    if not any(k.startswith("backbone.fpn.") for k in state_dict):
        return None, None
    head = "conv" if "roi_heads.box_head.0.0.weight" in state_dict else "fc" if "roi_heads.box_head.fc6.weight" in state_dict else None
    if "backbone.body.layer1.0.conv3.weight" not in state_dict:
        return "resnet18", head  # BasicBlocks: two convs a block
    conv2 = state_dict.get("backbone.body.layer1.0.conv2.weight")
    if conv2 is not None and conv2.shape[0] != conv2.shape[1]:
        return "resnext101_32x8d", head  # grouped 3x3 convs
    # ResNet-50 has layer3.0-5, ResNet-101 layer3.0-22
    return ("resnet101" if "backbone.body.layer3.6.conv1.weight" in state_dict else "resnet50"), head


def returned_layers_from_keys(state_dict) -> dict:
    """The ResNet stages a state_dict's FPN reads (its deepest stage and FPN inputs, contiguous as
    the builders make them), as builder settings: {} for the default, all four."""
    deepest = max((k for k in range(1, 5) if f"backbone.body.layer{k}.0.conv1.weight" in state_dict), default=4)
    inputs = {key.split(".")[3] for key in state_dict if key.startswith("backbone.fpn.inner_blocks.")}
    layers = list(range(deepest - len(inputs) + 1, deepest + 1)) if inputs else list(DEFAULT_RETURNED_LAYERS)
    return {} if layers == DEFAULT_RETURNED_LAYERS else {"returned_layers": layers}


def _register_fpn(name: str, body: str, recipe: str, summary: str) -> None:
    head = "fc" if recipe == "v1" else "conv"
    register_model(name, recognise=lambda sd: MASK_LOGITS_KEY in sd and _fpn_keys(sd) == (body, head), summary=summary,
                   settings_from_keys=returned_layers_from_keys)(_fpn_builder(body, recipe))


_register_fpn("maskrcnn_resnet50_fpn", "resnet50", "v1",
              "Mask R-CNN ResNet-50-FPN (torchvision's maskrcnn_resnet50_fpn; 37.9/34.6 box/mask AP with COCO weights).")
_register_fpn("maskrcnn_resnet50_fpn_v2", "resnet50", "v2",
              "Improved Mask R-CNN ResNet-50-FPN (torchvision's maskrcnn_resnet50_fpn_v2; 47.4/41.8 AP with COCO weights).")
_register_fpn("maskrcnn_resnet101_fpn", "resnet101", "v1",
              "Mask R-CNN ResNet-101-FPN: the v1 recipe on a ResNet-101 body (torchvision has no builder for it).")
_register_fpn("maskrcnn_resnext101_32x8d_fpn", "resnext101_32x8d", "v1",
              "Mask R-CNN ResNeXt-101 32x8d-FPN: the v1 recipe on torchvision's ResNeXt-101 32x8d body "
              "(the paper's strongest backbone).")
_register_fpn("maskrcnn_resnet18_fpn_small", "resnet18", "small",
              "A small Mask R-CNN (ours; no torchvision counterpart): ResNet-18 body, 128-channel FPN, two-conv "
              "GroupNorm box and mask heads; about 14M parameters against ResNet-50-FPN's 44M. Meant for small "
              "images and training from scratch on CPUs (the synthetic-shapes benchmark).")


# ---- the single-map architectures: C4 and C5 ----------------------------------------------

C4_ANCHOR_SIZES = [[32, 64, 128, 256, 512]]  # every size on the one map, as Detectron's C4
C4_POOLED = 14  # RoIs pooled 14x14 from res4; res5 (first block strided) makes them 7x7
C5_POOLED = {"box": 7, "mask": 14}  # from res5, the FPN recipe's sizes: 7x7 box features, 28x28 masks


def _single_map_builder(body: str, stage: int):
    """The builder of the paper's C4 variant (``stage`` 4; Fig. 4 left, Detectron2's Res5ROIHeads):
    an RPN on res4 alone, RoIAlign 14x14 from res4, res5 as the head shared by the box branch (then
    average pooling and the box predictor) and the mask branch (then a 2x deconvolution and per-class
    14x14 masks).

    ``stage`` 5 is its stride-32 variant, C5 (the large-stride rows of the paper's Table 2d): res5
    moves from the head into the backbone, so the RPN runs on res5 and RoIs are pooled from res5
    (7x7 for boxes, 14x14 for masks). res5 is then no longer there to be the head, and the paper
    does not describe its C5 head; here the second stage is the small FPN model's
    (``maskrcnn_resnet18_fpn_small``), so that C5 differs from it in the features alone: a 1x1
    conv + GroupNorm maps res5 to 128 channels (the FPN's lateral conv, at stride 32 only), and
    each branch has two 3x3 conv + GroupNorm layers, then one fc and the box predictor, or the 2x
    deconvolution and per-class 28x28 masks (an MLP with ``mask_head_type="mlp"``). Average
    pooling straight into the predictors, as the C4 head ends, did not learn to localise from
    scratch (bench/RESULTS.md).
    """

    def build(*, num_classes, is_trained, weights_backbone, trainable_backbone_layers, **kwargs) -> MaskRCNN:
        name = f"the C{stage} variant"
        if "returned_layers" in kwargs:
            raise ValueError(f"returned_layers is for the FPN architectures; {name} reads res{stage} only")
        if stage == 4 and kwargs.get("mask_head_type", "fcn") != "fcn":
            raise ValueError(f"{name}'s mask head is res5 and a deconvolution: mask_head_type must be 'fcn'")
        trainable = validate_trainable_layers(is_trained, trainable_backbone_layers)
        convention, stride_in_1x1, frozen_norm = _convention_settings(kwargs, f"c{stage}")
        norm_layer = frozen_norm if is_trained else nn.BatchNorm2d
        sizes = kwargs.pop("rpn_anchor_sizes", None) or C4_ANCHOR_SIZES
        if all(isinstance(s, int) for s in sizes):
            sizes = [list(sizes)]  # a flat list: all of them on the one map
        ratios = kwargs.pop("rpn_aspect_ratios", None)
        if len(sizes) != 1:
            raise ValueError(f"{name} has one feature map: rpn_anchor_sizes should be one list of sizes, "
                             f"got {len(sizes)} levels")
        pooler = kwargs.get("roi_pooler", "roi_align_legacy")
        if stage == 4:
            backbone, res5 = resnet_c4_backbone(body, weights_backbone=weights_backbone, norm_layer=norm_layer,
                                                trainable_layers=trainable)
            if stride_in_1x1:
                move_stride_to_1x1(backbone)
                move_stride_to_1x1(res5)
            width = 2 * backbone.out_channels  # res5's output channels
            box_pooled = mask_pooled = C4_POOLED
            # the same res5 module (one set of weights, listed under both heads in the state_dict);
            # the mask branch runs it again on its own RoIs, as torchvision's RoIHeads pools them
            heads = {
                "box_head": nn.Sequential(OrderedDict(res5=res5, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())),
                "box_predictor": FastRCNNPredictor(width, num_classes),
                "mask_head": nn.Sequential(OrderedDict(res5=res5)),
                "mask_predictor": MaskRCNNPredictor(width, 256, num_classes),
            }
        else:
            out = SMALL_CHANNELS
            backbone = resnet_c5_backbone(body, weights_backbone=weights_backbone, norm_layer=norm_layer,
                                          trainable_layers=trainable, out_channels=out, lateral_norm_layer=_group_norm)
            box_pooled, mask_pooled = C5_POOLED["box"], C5_POOLED["mask"]
            heads = MaskRCNN.small_second_stage(out, num_classes, kwargs)
        generator = anchor_generator(sizes, ratios, convention, backbone)
        kwargs = {
            # Detectron's C4 proposal counts: the one level holds what the FPN spreads over five
            "rpn_pre_nms_top_n_train": 12000,
            "rpn_pre_nms_top_n_test": 6000,
            "rpn_anchor_generator": generator,
            "rpn_head": RPNHead(backbone.out_channels, generator.num_anchors_per_location()[0]),
            "box_roi_pool": roi_pool(["0"], box_pooled, pooler, convention),
            "mask_roi_pool": roi_pool(["0"], mask_pooled, pooler, convention),
            **heads,
            **kwargs,
        }
        model = MaskRCNN(backbone, num_classes=None, **kwargs)
        if stride_in_1x1:  # recorded only when set: older readers know the default
            model.builder_kwargs["stride_in_1x1"] = True
        return model

    return build


def _single_map_keys(state_dict) -> Optional[tuple[str, int]]:
    """(ResNet body, 4 or 5) of a C4 or C5 Mask R-CNN state_dict; None for any other."""
    if MASK_LOGITS_KEY not in state_dict or any(k.startswith("backbone.fpn.") for k in state_dict):
        return None
    if "roi_heads.box_head.res5.0.conv1.weight" in state_dict:
        stage = 4
    elif "backbone.body.layer4.0.conv1.weight" in state_dict:
        stage = 5
    else:
        return None
    if "backbone.body.layer1.0.conv3.weight" not in state_dict:
        return "resnet18", stage  # BasicBlocks: two convs a block
    return ("resnet101" if "backbone.body.layer3.6.conv1.weight" in state_dict else "resnet50"), stage


register_model("maskrcnn_resnet50_c4", recognise=lambda sd: _single_map_keys(sd) == ("resnet50", 4), features="single",
               summary="Mask R-CNN ResNet-50-C4, the paper's C4 variant (Fig. 4 left): RPN and RoIAlign (14x14) on "
                       "res4, res5 as the shared box and mask head, 14x14 per-class masks.")(_single_map_builder("resnet50", 4))
register_model("maskrcnn_resnet50_c5", recognise=lambda sd: _single_map_keys(sd) == ("resnet50", 5), features="single",
               summary="Mask R-CNN ResNet-50-C5, the stride-32 variant of the C4 model (the paper's Table 2d): res5 in "
                       "the backbone, RPN and RoIAlign on res5 (7x7 box, 14x14 mask RoIs), average pooling and the "
                       "box predictor, a deconvolution to 28x28 per-class masks.")(_single_map_builder("resnet50", 5))
register_model("maskrcnn_resnet18_c5", recognise=lambda sd: _single_map_keys(sd) == ("resnet18", 5), features="single",
               summary="Mask R-CNN ResNet-18-C5 (ours): maskrcnn_resnet50_c5 on a ResNet-18 body (512-channel res5), "
                       "small enough to train the paper's stride-32 ablation rows on CPUs.")(_single_map_builder("resnet18", 5))
