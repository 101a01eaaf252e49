"""Keypoint R-CNN (the Mask R-CNN paper, section 5): the box branch and, instead of masks, a
keypoint branch that predicts one M x M heatmap per keypoint type for each detection.

The module layout and state_dict keys are torchvision's ``KeypointRCNN``, so its COCO person
checkpoints load strictly. Architectures: ``keypointrcnn_resnet50_fpn`` (torchvision's) and
``keypointrcnn_resnet18_fpn_small`` (ours, for small images and CPU training).
"""
from typing import Optional

from torch import nn, Tensor
from torch.nn import functional as F

from .mask_rcnn import MASK_LOGITS_KEY, MaskRCNN, _fpn_builder, _fpn_keys, _group_norm, returned_layers_from_keys
from .ops import MultiScaleRoIAlign
from .registry import register_model
from .roi_heads import MaskRCNNHeads

__all__ = ["KeypointRCNN", "KeypointRCNNHeads", "KeypointRCNNPredictor"]

COCO_NUM_KEYPOINTS = 17
KEYPOINT_LOGITS_KEY = "roi_heads.keypoint_predictor.kps_score_lowres.weight"


class KeypointRCNNHeads(nn.Sequential):
    """torchvision's keypoint head: 3x3 conv + ReLU layers (no normalisation) on the 14x14 RoI features."""

    def __init__(self, in_channels: int, layers):
        blocks = []
        previous = in_channels
        for channels in layers:
            blocks += [nn.Conv2d(previous, channels, 3, stride=1, padding=1), nn.ReLU(inplace=True)]
            previous = channels
        super().__init__(*blocks)
        for m in self.children():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)


class KeypointRCNNPredictor(nn.Module):
    """A 4x4 stride-2 transposed conv to one logit map per keypoint (14 -> 28), then bilinear 2x
    upsampling (-> 56): the paper's 56 x 56 heatmaps."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2, padding=1)
        nn.init.kaiming_normal_(self.kps_score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.kps_score_lowres.bias, 0)
        self.up_scale = 2
        self.out_channels = num_keypoints

    def forward(self, x: Tensor) -> Tensor:
        x = self.kps_score_lowres(x)
        return F.interpolate(x, scale_factor=float(self.up_scale), mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)


class KeypointRCNN(MaskRCNN):
    """Keypoint R-CNN with torchvision's module layout, defaults and outputs.

    Eval: one dict per image with ``boxes``, ``labels``, ``scores`` (as :class:`MaskRCNN`),
    ``keypoints`` float ``[N, K, 3]`` (x, y in input-image pixels, and 1) and ``keypoints_scores``
    float ``[N, K]`` (the heatmap logit at each keypoint; COCO's evaluation takes > 0 as visible).

    Train: targets hold ``boxes``, ``labels`` and ``keypoints`` float ``[G, K, 3]`` (x, y,
    visibility; 0 means not labelled); the losses are :class:`MaskRCNN`'s without ``loss_mask``,
    with ``loss_keypoint`` (cross-entropy over each visible keypoint's heatmap cells).

    Keyword arguments: :class:`MaskRCNN`'s box and RPN ones, and torchvision's ``num_keypoints``
    (default 17, COCO's person keypoints), ``keypoint_roi_pool``, ``keypoint_head``,
    ``keypoint_predictor``. ``min_size`` defaults to torchvision's multi-scale (640, ..., 800);
    eval uses the last.
    """

    ROI_POOL_SIZES = {"box_roi_pool": 7, "keypoint_roi_pool": 14}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Optional[int] = None,
        *,
        min_size=None,
        num_keypoints: Optional[int] = None,
        keypoint_roi_pool: Optional[nn.Module] = None,
        keypoint_head: Optional[nn.Module] = None,
        keypoint_predictor: Optional[nn.Module] = None,
        **kwargs,
    ):
        if min_size is None:
            min_size = (640, 672, 704, 736, 768, 800)
        if keypoint_predictor is not None:
            given = int(keypoint_predictor.out_channels)
            if num_keypoints is not None and num_keypoints != given:
                raise ValueError(f"num_keypoints={num_keypoints} but keypoint_predictor predicts {given} keypoints")
            num_keypoints = given
        elif num_keypoints is None:
            num_keypoints = COCO_NUM_KEYPOINTS
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints should be at least 1, got {num_keypoints}")
        super().__init__(backbone, num_classes, min_size=min_size, _with_masks=False, **kwargs)
        if keypoint_roi_pool is None:
            keypoint_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2,
                                                   pooler=kwargs.get("roi_pooler", "roi_align_legacy"))
        if keypoint_head is None:
            keypoint_head = KeypointRCNNHeads(backbone.out_channels, tuple(512 for _ in range(8)))
        if keypoint_predictor is None:
            keypoint_predictor = KeypointRCNNPredictor(512, num_keypoints)
        self.roi_heads.keypoint_roi_pool = keypoint_roi_pool
        self.roi_heads.keypoint_head = keypoint_head
        self.roi_heads.keypoint_predictor = keypoint_predictor
        self.builder_kwargs["num_keypoints"] = int(num_keypoints)

    @property
    def num_keypoints(self) -> int:
        return int(self.roi_heads.keypoint_predictor.out_channels)

    def reset_predictors(self, num_classes: int, num_keypoints: Optional[int] = None) -> None:
        """New, untrained box predictor (and keypoint predictor, when ``num_keypoints`` differs):
        fine-tuning on other classes or other keypoints."""
        super().reset_predictors(num_classes)
        if num_keypoints is not None and num_keypoints != self.num_keypoints:
            old = self.roi_heads.keypoint_predictor
            self.roi_heads.keypoint_predictor = KeypointRCNNPredictor(old.kps_score_lowres.in_channels, num_keypoints)
            self.builder_kwargs["num_keypoints"] = int(num_keypoints)

    @staticmethod
    def small_heads(channels: int, num_classes: int, settings: dict) -> dict:
        """The small recipe's keypoint branch: four 3x3 conv + GroupNorm layers and the predictor."""
        num_keypoints = settings.get("num_keypoints") or COCO_NUM_KEYPOINTS
        return {"keypoint_head": MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=_group_norm),
                "keypoint_predictor": KeypointRCNNPredictor(channels, num_keypoints)}


def _keypoint_keys(state_dict) -> tuple[Optional[str], Optional[str]]:
    """(ResNet body, box head kind) of a Keypoint R-CNN FPN state_dict; (None, None) otherwise."""
    if KEYPOINT_LOGITS_KEY not in state_dict or MASK_LOGITS_KEY in state_dict:
        return None, None
    return _fpn_keys(state_dict)


def _settings_from_keys(state_dict) -> dict:
    """The builder settings a plain state_dict implies: its FPN stages and its keypoint count."""
    return {**returned_layers_from_keys(state_dict), "num_keypoints": int(state_dict[KEYPOINT_LOGITS_KEY].shape[1])}


register_model("keypointrcnn_resnet50_fpn", recognise=lambda sd: _keypoint_keys(sd) == ("resnet50", "fc"),
               settings_from_keys=_settings_from_keys, num_classes=2, outputs="keypoints",
               summary="Keypoint R-CNN ResNet-50-FPN (torchvision's keypointrcnn_resnet50_fpn; 54.6 box / 65.0 "
                       "keypoint AP with its COCO_V1 person weights): 8 x 512 conv keypoint head, 56x56 heatmaps."
               )(_fpn_builder("resnet50", "v1", KeypointRCNN))
register_model("keypointrcnn_resnet18_fpn_small", recognise=lambda sd: _keypoint_keys(sd) == ("resnet18", "conv"),
               settings_from_keys=_settings_from_keys, num_classes=2, outputs="keypoints",
               summary="A small Keypoint R-CNN (ours): maskrcnn_resnet18_fpn_small's backbone and box head with a "
                       "four-conv GroupNorm keypoint head; for small images and training from scratch on CPUs."
               )(_fpn_builder("resnet18", "small", KeypointRCNN))
