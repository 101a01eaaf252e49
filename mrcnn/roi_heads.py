"""Second stage: box classification/regression and mask prediction on RPN proposals.

Features are pooled with our RoIAlign operators (``mrcnn.ops``); everything else follows
torchvision.models.detection.roi_heads so that outputs and losses agree.

Under autocast (float16/bfloat16) the heads' convolutions and fc layers run in that dtype; their
outputs (class logits, box deltas, mask and keypoint logits) are cast to float32 where they leave
the network, so softmax/sigmoid, box decoding, clipping, NMS, the boxes given to RoIAlign, mask
probabilities and keypoints are fp32.
"""
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn, Tensor
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation, boxes as box_ops

from ._utils import CONVENTIONS, BalancedPositiveNegativeSampler, BoxCoder, Matcher, full_precision
from .ops._registration import ops as raw_ops

DEFAULT_BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the box coder's (wx, wy, ww, wh), torchvision's



def _init_convs(module: nn.Module) -> None:
    """He initialisation of every conv (torchvision's choice for the conv heads)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

class TwoMLPHead(nn.Module):
    """v1 box head: flatten, fc6 + ReLU, fc7 + ReLU."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class FastRCNNConvFCHead(nn.Sequential):
    """v2 box head: 3x3 conv+norm+ReLU layers, flatten, then fc+ReLU layers."""

    def __init__(
        self,
        input_size: tuple[int, int, int],
        conv_layers: list[int],
        fc_layers: list[int],
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        in_channels, in_height, in_width = input_size
        blocks = []
        previous = in_channels
        for channels in conv_layers:
            blocks.append(Conv2dNormActivation(previous, channels, norm_layer=norm_layer))
            previous = channels
        blocks.append(nn.Flatten())
        previous = previous * in_height * in_width
        for features in fc_layers:
            blocks.append(nn.Linear(previous, features))
            blocks.append(nn.ReLU(inplace=True))
            previous = features
        super().__init__(*blocks)
        _init_convs(self)


class FastRCNNPredictor(nn.Module):
    """Class logits (``num_classes``) and per-class box deltas (``num_classes * 4``)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 4 and list(x.shape[2:]) != [1, 1]:
            raise ValueError(f"expected box features of shape [N, C] or [N, C, 1, 1], got {list(x.shape)}")
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(nn.Sequential):
    """Mask head: 3x3 conv (+ optional norm) + ReLU layers on the 14x14 pooled features."""

    # version 2 renamed ``mask_fcn{i+1}.{weight,bias}`` to ``{i}.0.{weight,bias}``
    _version = 2

    def __init__(self, in_channels: int, layers, dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None):
        blocks = []
        previous = in_channels
        for channels in layers:
            blocks.append(
                Conv2dNormActivation(
                    previous, channels, kernel_size=3, stride=1, padding=dilation, dilation=dilation, norm_layer=norm_layer
                )
            )
            previous = channels
        super().__init__(*blocks)
        _init_convs(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            for i in range(len(self)):
                for kind in ("weight", "bias"):
                    old_key, new_key = f"{prefix}mask_fcn{i + 1}.{kind}", f"{prefix}{i}.0.{kind}"
                    if old_key in state_dict:
                        state_dict[new_key] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class MaskRCNNPredictor(nn.Sequential):
    """2x2 stride-2 transposed conv + ReLU (14 -> 28), then a 1x1 conv to one mask logit map per class."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(
            OrderedDict(
                [
                    ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
                ]
            )
        )
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")


class MaskMLPHead(nn.Sequential):
    """The paper's MLP mask head (Table 2e): the pooled RoI features flattened, then fc + ReLU layers."""

    def __init__(self, in_features: int, layers=(1024, 1024)):
        blocks = [nn.Flatten(start_dim=1)]
        previous = in_features
        for width in layers:
            blocks += [nn.Linear(previous, width), nn.ReLU(inplace=True)]
            previous = width
        super().__init__(*blocks)


class MaskMLPPredictor(nn.Module):
    """One fc layer to ``num_classes`` M x M mask logit maps (the MLP head's last layer)."""

    def __init__(self, in_features: int, num_classes: int, resolution: int = 28):
        super().__init__()
        self.resolution = resolution
        self.mask_fc_logits = nn.Linear(in_features, num_classes * resolution * resolution)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fc_logits(x).view(x.shape[0], -1, self.resolution, self.resolution)


MASK_LOSSES = ("sigmoid", "softmax")


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets):
    """Cross-entropy over all sampled RoIs; smooth L1 (beta 1/9) on the GT class deltas of positives."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)

    pos = torch.where(labels > 0)[0]
    labels_pos = labels[pos]
    N = class_logits.shape[0]
    box_regression = box_regression.reshape(N, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos, labels_pos], regression_targets[pos], beta=1 / 9, reduction="sum")
    return classification_loss, box_loss / labels.numel()


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, M: int) -> Tensor:
    """Crop each matched GT mask to its proposal box and resample it to ``M x M`` (RoIAlign, scale 1,
    as ``roi_align(gt_masks, rois, (M, M), 1.0)``). The RoIs are ours (finite proposals, indices of
    this image's masks), so the operator is called without the public function's value check,
    which waits for the GPU once per image."""
    matched_idxs = matched_idxs.to(boxes)
    rois = torch.cat([matched_idxs[:, None], boxes], dim=1)
    gt_masks = gt_masks[:, None].to(rois)
    return raw_ops.roi_align(gt_masks, rois, 1.0, M, M, -1, False)[:, 0]


def maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs, kind: str = "sigmoid"):
    """The mask loss of positive RoIs against their projected GT masks.

    ``sigmoid`` (the paper's): per-pixel BCE of the GT class's own mask logits, the other classes
    untouched. ``softmax`` (the ablation's alternative, Table 2b): a per-pixel softmax over the
    classes and a multinomial loss, the GT class where the mask is, background elsewhere, so
    classes compete for every pixel.
    """
    M = mask_logits.shape[-1]
    labels = [gt_label[idxs] for gt_label, idxs in zip(gt_labels, mask_matched_idxs)]
    mask_targets = [project_masks_on_boxes(m, p, i, M) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)]
    labels = torch.cat(labels, dim=0)
    mask_targets = torch.cat(mask_targets, dim=0)
    if mask_targets.numel() == 0:
        # no positive RoI: a zero loss that still depends on the logits
        return mask_logits.sum() * 0
    if kind == "softmax":
        pixel_class = torch.where(mask_targets >= 0.5, labels[:, None, None], torch.zeros_like(labels)[:, None, None])
        return F.cross_entropy(mask_logits, pixel_class)
    return F.binary_cross_entropy_with_logits(
        mask_logits[torch.arange(labels.shape[0], device=labels.device), labels], mask_targets
    )


def maskrcnn_inference(mask_logits: Tensor, labels: list[Tensor], kind: str = "sigmoid") -> list[Tensor]:
    """The predicted class's mask probabilities (sigmoid, or its share of the per-pixel softmax),
    ``[D_i, 1, M, M]`` per image."""
    mask_prob = mask_logits.softmax(dim=1) if kind == "softmax" else mask_logits.sigmoid()
    boxes_per_image = [label.shape[0] for label in labels]
    labels = torch.cat(labels)
    index = torch.arange(mask_logits.shape[0], device=labels.device)
    return mask_prob[index, labels][:, None].split(boxes_per_image, dim=0)


def keypoints_to_heatmap(keypoints: Tensor, rois: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """Each GT keypoint's cell in its RoI's ``heatmap_size`` square grid (a flat index) and whether
    it counts (visible and inside the RoI); a keypoint on the RoI's right/bottom edge takes the last cell."""
    offset_x, offset_y = rois[:, 0:1], rois[:, 1:2]
    scale_x = heatmap_size / (rois[:, 2:3] - rois[:, 0:1])
    scale_y = heatmap_size / (rois[:, 3:4] - rois[:, 1:2])
    x, y = keypoints[..., 0], keypoints[..., 1]
    on_right, on_bottom = x == rois[:, 2:3], y == rois[:, 3:4]
    x = ((x - offset_x) * scale_x).floor().long()
    y = ((y - offset_y) * scale_y).floor().long()
    x[on_right] = heatmap_size - 1
    y[on_bottom] = heatmap_size - 1
    inside = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size)
    valid = (inside & (keypoints[..., 2] > 0)).long()
    return (y * heatmap_size + x) * valid, valid


def keypointrcnn_loss(keypoint_logits: Tensor, proposals, gt_keypoints, keypoint_matched_idxs) -> Tensor:
    """Cross-entropy over each keypoint's M x M heatmap cells (one-hot at its GT cell), visible
    keypoints of positive RoIs only: the paper's keypoint loss."""
    N, K, H, W = keypoint_logits.shape
    if H != W:
        raise ValueError(f"keypoint logits should be square heatmaps, got {H}x{W}")
    targets, valid = [], []
    for boxes, gt, idxs in zip(proposals, gt_keypoints, keypoint_matched_idxs):
        cells, ok = keypoints_to_heatmap(gt[idxs], boxes, H)
        targets.append(cells.view(-1))
        valid.append(ok.view(-1))
    targets = torch.cat(targets)
    valid = torch.where(torch.cat(valid) > 0)[0]
    if targets.numel() == 0 or valid.numel() == 0:
        return keypoint_logits.sum() * 0  # nothing to learn from, but a loss that depends on the logits
    return F.cross_entropy(keypoint_logits.view(N * K, H * W)[valid], targets[valid])


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """Keypoints ``[R, K, 3]`` (x, y, 1) and their scores ``[R, K]`` from heatmaps ``[R, K, M, M]``:
    each map resized bicubically to its box's size in pixels, the argmax cell's centre (Detectron's
    and torchvision's decoding, so results match theirs)."""
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    num_keypoints = maps.shape[1]
    xy = torch.zeros((len(rois), 3, num_keypoints), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((len(rois), num_keypoints), dtype=torch.float32, device=maps.device)
    index = torch.arange(num_keypoints, device=maps.device)
    for i in range(len(rois)):
        map_w, map_h = int(widths_ceil[i].item()), int(heights_ceil[i].item())
        roi_map = F.interpolate(maps[i][:, None], size=(map_h, map_w), mode="bicubic", align_corners=False)[:, 0]
        pos = roi_map.reshape(num_keypoints, -1).argmax(dim=1)
        x_int = pos % map_w
        y_int = torch.div(pos - x_int, map_w, rounding_mode="floor")
        xy[i, 0] = (x_int.float() + 0.5) * (widths[i] / map_w) + rois[i, 0]
        xy[i, 1] = (y_int.float() + 0.5) * (heights[i] / map_h) + rois[i, 1]
        xy[i, 2] = 1
        scores[i] = roi_map[index, y_int, x_int]
    return xy.permute(0, 2, 1), scores


def keypointrcnn_inference(keypoint_logits: Tensor, boxes: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per image: keypoints ``[D, K, 3]`` and keypoint scores ``[D, K]`` of its detections."""
    keypoints, scores = [], []
    for maps, b in zip(keypoint_logits.split([len(b) for b in boxes], dim=0), boxes):
        k, s = heatmaps_to_keypoints(maps, b)
        keypoints.append(k)
        scores.append(s)
    return keypoints, scores


class RoIHeads(nn.Module):
    """Box, mask and keypoint heads with training-time RoI sampling and eval-time post-processing
    (the mask and keypoint branches are optional, as in torchvision's)."""

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        # training
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: Optional[tuple[float, float, float, float]],
        # inference
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        # mask
        mask_roi_pool: Optional[nn.Module] = None,
        mask_head: Optional[nn.Module] = None,
        mask_predictor: Optional[nn.Module] = None,
        mask_loss: str = "sigmoid",
        # keypoints
        keypoint_roi_pool: Optional[nn.Module] = None,
        keypoint_head: Optional[nn.Module] = None,
        keypoint_predictor: Optional[nn.Module] = None,
        *,
        convention: str = "torchvision",
    ):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.convention = convention
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        self.mask_loss = mask_loss
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        if bbox_reg_weights is None:
            bbox_reg_weights = DEFAULT_BBOX_REG_WEIGHTS
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.keypoint_roi_pool = keypoint_roi_pool
        self.keypoint_head = keypoint_head
        self.keypoint_predictor = keypoint_predictor

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None

    def has_keypoint(self) -> bool:
        return (self.keypoint_roi_pool is not None and self.keypoint_head is not None
                and self.keypoint_predictor is not None)

    # ---- training-time sampling -------------------------------------------------------------

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = [], []
        for proposals_in_image, gt_boxes_in_image, gt_labels_in_image in zip(proposals, gt_boxes, gt_labels):
            device = proposals_in_image.device
            if gt_boxes_in_image.numel() == 0:
                # an image without objects: every proposal is background
                clamped = torch.zeros((proposals_in_image.shape[0],), dtype=torch.int64, device=device)
                labels_in_image = torch.zeros((proposals_in_image.shape[0],), dtype=torch.int64, device=device)
            else:
                matched = self.proposal_matcher(box_ops.box_iou(gt_boxes_in_image, proposals_in_image))
                clamped = matched.clamp(min=0)
                labels_in_image = gt_labels_in_image[clamped].to(dtype=torch.int64)
                labels_in_image[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels_in_image[matched == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
            matched_idxs.append(clamped)
            labels.append(labels_in_image)
        return matched_idxs, labels

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        return [torch.where(pos | neg)[0] for pos, neg in zip(sampled_pos, sampled_neg)]

    def check_targets(self, targets) -> None:
        if targets is None:
            raise ValueError("targets are required in training mode")
        for i, t in enumerate(targets):
            required = ("boxes", "labels") + (("masks",) if self.has_mask() else ()) + (
                ("keypoints",) if self.has_keypoint() else ())
            for key in required:
                if key not in t:
                    raise ValueError(f"target {i} has no {key!r} entry")

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Add the GT boxes to the proposals, match, and sample ``batch_size_per_image`` RoIs per image."""
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]

        proposals = [torch.cat((p, gt)) for p, gt in zip(proposals, gt_boxes)]
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        sampled_inds = self.subsample(labels)

        matched_gt_boxes = []
        for img_id in range(len(proposals)):
            inds = sampled_inds[img_id]
            proposals[img_id] = proposals[img_id][inds]
            labels[img_id] = labels[img_id][inds]
            matched_idxs[img_id] = matched_idxs[img_id][inds]
            gt_boxes_in_image = gt_boxes[img_id]
            if gt_boxes_in_image.numel() == 0:
                gt_boxes_in_image = torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(gt_boxes_in_image[matched_idxs[img_id]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets

    # ---- inference-time post-processing -----------------------------------------------------

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """Softmax, per-class decode, clip, drop background, score > thresh, drop tiny boxes,
        per-class NMS, and keep the ``detections_per_img`` best. ``convention="detectron2"``
        (its ``fast_rcnn_inference``): RoIs with a non-finite box or score dropped first, and no
        tiny-box filter."""
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)

        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(
            pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0), image_shapes
        ):
            if self.convention == "detectron2":
                valid = torch.isfinite(boxes).flatten(1).all(dim=1) & torch.isfinite(scores).all(dim=1)
                boxes, scores = boxes[valid], scores[valid]
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)

            # every (RoI, foreground class) pair becomes its own candidate
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)

            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            if self.convention == "torchvision":
                keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if targets is not None:
            for i, t in enumerate(targets):
                if not t["boxes"].is_floating_point():
                    raise TypeError(f"target {i} boxes must be floating point, got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target {i} labels must be int64, got {t['labels'].dtype}")
                if self.has_keypoint() and "keypoints" in t and t["keypoints"].dtype != torch.float32:
                    raise TypeError(f"target {i} keypoints must be float32, got {t['keypoints'].dtype}")

        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)

        box_features = self.box_roi_pool(features, proposals, image_shapes)
        box_features = self.box_head(box_features)
        class_logits, box_regression = self.box_predictor(box_features)
        # fp32 under autocast: bf16 boxes are rounded by pixels, and batched_nms's per-class
        # offsets (class id x max coordinate) in bf16 stop separating classes >= 20
        class_logits, box_regression = full_precision(class_logits), full_precision(box_regression)

        result: list[dict[str, Tensor]] = []
        losses: dict[str, Tensor] = {}
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        else:
            boxes, scores, det_labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            result = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, det_labels, scores)]

        if self.training and (self.has_mask() or self.has_keypoint()):
            # the mask and keypoint branches train on positive RoIs only
            pos_proposals, pos_matched_idxs = [], []
            for img_id in range(len(proposals)):
                pos = torch.where(labels[img_id] > 0)[0]
                pos_proposals.append(proposals[img_id][pos])
                pos_matched_idxs.append(matched_idxs[img_id][pos])

        if self.has_mask():
            mask_proposals = pos_proposals if self.training else [r["boxes"] for r in result]

            mask_features = self.mask_roi_pool(features, mask_proposals, image_shapes)
            mask_features = self.mask_head(mask_features)
            mask_logits = full_precision(self.mask_predictor(mask_features))  # fp32 probabilities

            if self.training:
                gt_masks = [t["masks"] for t in targets]
                gt_labels = [t["labels"] for t in targets]
                losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, pos_matched_idxs,
                                                    self.mask_loss)
            else:
                probs = maskrcnn_inference(mask_logits, [r["labels"] for r in result], self.mask_loss)
                for mask_prob, r in zip(probs, result):
                    r["masks"] = mask_prob

        if self.has_keypoint():
            keypoint_proposals = pos_proposals if self.training else [r["boxes"] for r in result]
            keypoint_features = self.keypoint_roi_pool(features, keypoint_proposals, image_shapes)
            keypoint_logits = full_precision(self.keypoint_predictor(self.keypoint_head(keypoint_features)))
            if self.training:
                gt_keypoints = [t["keypoints"] for t in targets]
                losses["loss_keypoint"] = keypointrcnn_loss(keypoint_logits, keypoint_proposals, gt_keypoints,
                                                            pos_matched_idxs)
            else:
                keypoints, keypoint_scores = keypointrcnn_inference(keypoint_logits, keypoint_proposals)
                for k, s, r in zip(keypoints, keypoint_scores, result):
                    r["keypoints"] = k
                    r["keypoints_scores"] = s
        return result, losses
