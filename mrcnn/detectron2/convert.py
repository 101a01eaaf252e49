"""Detectron2's Mask R-CNN weights in this package's (torchvision's) layout.

Renames each Detectron2 key to the module that computes the same thing here, and moves the
class dimension to torchvision's order: Detectron2's box classifier puts the background last
and has no background row of box deltas or mask logits; here the background is class 0. With
``label_ids`` (a COCO model: its 80 contiguous classes are COCO category ids 1..90), class ``i``
becomes label ``label_ids[i]`` and the labels no class takes get a logit of -1e4 (probability 0),
so the model writes the labels a torchvision COCO model writes.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

# Buffers Detectron2 keeps out of its state_dict today but older files may hold; not weights.
_NOT_WEIGHTS = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$")
_NORM = ("weight", "bias", "running_mean", "running_var")
ABSENT_LOGIT = -1e4  # a label no class of the model takes: softmax gives it exactly 0


class Found(NamedTuple):
    """What a Detectron2 Mask R-CNN state_dict is: our architecture name, "fpn" or "c4", and its
    ResNet's depth and groups (what its config must say)."""

    name: str
    kind: str
    depth: int
    groups: int


def architecture_of(d2: dict[str, Tensor], path: str) -> Found:
    """Which architecture a Detectron2 Mask R-CNN state_dict is (refused unless supported)."""
    if any(k.startswith("backbone.bottom_up.") for k in d2):
        kind, body = "fpn", "backbone.bottom_up."
    elif "roi_heads.res5.0.conv1.weight" in d2:
        kind, body = "c4", "backbone."
    else:
        raise ValueError(f"{path}: not a Detectron2 Mask R-CNN with a ResNet-FPN or ResNet-C4 backbone "
                         f"(no backbone.bottom_up.* or roi_heads.res5.* weights)")
    if "roi_heads.mask_head.predictor.weight" not in d2:
        raise ValueError(f"{path}: has no mask head (roi_heads.mask_head.predictor): this job runs Mask R-CNN models")
    blocks = {int(m.group(1)) for k in d2 if (m := re.match(re.escape(body) + r"res4\.(\d+)\.", k))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    conv2 = d2.get(body + "res2.0.conv2.weight")
    if depth is None or conv2 is None:
        raise ValueError(f"{path}: a ResNet with {len(blocks)} res4 blocks; ResNet-50 (6) and -101 (23) are supported")
    groups = conv2.shape[0] // conv2.shape[1]
    name = {("fpn", 50, 1): "maskrcnn_resnet50_fpn", ("fpn", 101, 1): "maskrcnn_resnet101_fpn",
            ("fpn", 101, 32): "maskrcnn_resnext101_32x8d_fpn", ("c4", 50, 1): "maskrcnn_resnet50_c4"}.get((kind, depth, groups))
    if name is None:
        raise ValueError(f"{path}: a {kind.upper()} ResNe{'X' if groups > 1 else 't'}-{depth} with {groups} groups; "
                         "supported: R50, R101 and X101-32x8d FPN, and R50-C4")
    if groups > 1 and conv2.shape[1] != 8:
        raise ValueError(f"{path}: ResNeXt-101 with {conv2.shape[1]} channels a group; supported: 32x8d")
    return Found(name, kind, depth, groups)


def _resnet_key(rest: str) -> Optional[str]:
    """Our key (under the ResNet) of a Detectron2 ResNet key ``rest`` (after its prefix)."""
    if m := re.fullmatch(r"stem\.conv1\.weight", rest):
        return "conv1.weight"
    if m := re.fullmatch(r"stem\.conv1\.norm\.(\w+)", rest):
        return f"bn1.{m.group(1)}"
    if m := re.fullmatch(r"res(\d)\.(\d+)\.conv(\d)\.weight", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.conv{m.group(3)}.weight"
    if m := re.fullmatch(r"res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.bn{m.group(3)}.{m.group(4)}"
    if m := re.fullmatch(r"res(\d)\.(\d+)\.shortcut\.weight", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.0.weight"
    if m := re.fullmatch(r"res(\d)\.(\d+)\.shortcut\.norm\.(\w+)", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.{m.group(3)}"
    return None


def _our_keys(key: str, kind: str) -> list[str]:
    """Our keys for Detectron2 key ``key`` ([] when it has none; C4's res5 is listed twice here)."""
    if kind == "fpn" and key.startswith("backbone.bottom_up."):
        ours = _resnet_key(key[len("backbone.bottom_up."):])
        return [f"backbone.body.{ours}"] if ours else []
    if m := re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", key):
        blocks = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
        return [f"backbone.fpn.{blocks}.{int(m.group(2)) - 2}.0.{m.group(3)}"] if kind == "fpn" else []
    if kind == "c4" and key.startswith("backbone."):
        ours = _resnet_key(key[len("backbone."):])
        return [f"backbone.body.{ours}"] if ours and not ours.startswith("layer4") else []
    if kind == "c4" and key.startswith("roi_heads.res5."):
        ours = _resnet_key(key[len("roi_heads."):])
        if ours is None or not ours.startswith("layer4."):
            return []
        rest = ours[len("layer4."):]
        return [f"roi_heads.box_head.res5.{rest}", f"roi_heads.mask_head.res5.{rest}"]
    renames = {
        r"proposal_generator\.rpn_head\.conv\.(weight|bias)": "rpn.head.conv.0.0.{}",
        r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)": "rpn.head.cls_logits.{}",
        r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)": "rpn.head.bbox_pred.{}",
        r"roi_heads\.box_head\.fc1\.(weight|bias)": "roi_heads.box_head.fc6.{}",
        r"roi_heads\.box_head\.fc2\.(weight|bias)": "roi_heads.box_head.fc7.{}",
        r"roi_heads\.box_predictor\.cls_score\.(weight|bias)": "roi_heads.box_predictor.cls_score.{}",
        r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)": "roi_heads.box_predictor.bbox_pred.{}",
        r"roi_heads\.mask_head\.deconv\.(weight|bias)": "roi_heads.mask_predictor.conv5_mask.{}",
        r"roi_heads\.mask_head\.predictor\.(weight|bias)": "roi_heads.mask_predictor.mask_fcn_logits.{}",
    }
    for pattern, ours in renames.items():
        if m := re.fullmatch(pattern, key):
            return [ours.format(m.group(1))]
    if m := re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)", key):
        return [f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"]
    return []


def to_torchvision_layout(d2: dict[str, Tensor], path: str,
                          label_ids: Optional[Sequence[int]] = None) -> tuple[str, dict[str, Tensor], int]:
    """(architecture, our state_dict, number of labels with the background) of a Detectron2
    Mask R-CNN state_dict; every weight is used or the file is refused, naming the keys left over."""
    if d2 and all(k.startswith("module.") for k in d2):  # saved from a DistributedDataParallel wrapper
        d2 = {k[len("module."):]: v for k, v in d2.items()}
    d2 = {k: v for k, v in d2.items() if not _NOT_WEIGHTS.match(k)}
    found = architecture_of(d2, path)
    # Detectron2's FrozenBatchNorm of files without running statistics (Caffe2-converted): mean 0, var 1
    for key in [k for k in d2 if k.endswith(".norm.weight")]:
        base = key[: -len("weight")]
        d2.setdefault(base + "running_mean", torch.zeros_like(d2[key]))
        d2.setdefault(base + "running_var", torch.ones_like(d2[key]))
    ours: dict[str, Tensor] = {}
    unused = []
    for key, value in d2.items():
        targets = _our_keys(key, found.kind)
        if not targets:
            unused.append(key)
        for target in targets:
            ours[target] = value.float() if value.is_floating_point() else value
    if unused:
        raise ValueError(f"{path}: {len(unused)} Detectron2 weights this Mask R-CNN has no place for, e.g. "
                         f"{sorted(unused)[:5]}")
    num_labels = _classes_to_torchvision(ours, path, label_ids)
    return found.name, ours, num_labels


def _classes_to_torchvision(sd: dict[str, Tensor], path: str, label_ids: Optional[Sequence[int]]) -> int:
    """Reorders the class dimension in place: background first, a zero background row of box
    deltas and mask logits, class-agnostic ones repeated per class; with ``label_ids``, class i
    at label ``label_ids[i]``. Returns the number of labels (background included)."""
    prefix = "roi_heads.box_predictor."
    cls_w, cls_b = sd[prefix + "cls_score.weight"], sd[prefix + "cls_score.bias"]
    k = cls_w.shape[0] - 1  # foreground classes
    if label_ids is not None and len(label_ids) != k:
        raise ValueError(f"{path}: {k} classes, but the label map has {len(label_ids)} entries")
    labels = list(range(1, k + 1)) if label_ids is None else [int(v) for v in label_ids]
    n = max(labels) + 1
    index = torch.tensor(labels)

    def per_label(rows: Tensor, width: int, fill: float = 0.0) -> Tensor:
        """(k * width, ...) class rows to (n * width, ...) label rows, ``fill`` elsewhere."""
        out = rows.new_full((n, width) + tuple(rows.shape[1:]), fill)
        out[index] = rows.reshape((k, width) + tuple(rows.shape[1:]))
        return out.reshape((n * width,) + tuple(rows.shape[1:]))

    w, b = per_label(cls_w[:k], 1), per_label(cls_b[:k], 1, ABSENT_LOGIT)
    w[0], b[0] = cls_w[k], cls_b[k]
    sd[prefix + "cls_score.weight"], sd[prefix + "cls_score.bias"] = w, b
    for key, width in ((prefix + "bbox_pred", 4), ("roi_heads.mask_predictor.mask_fcn_logits", 1)):
        weight, bias = sd[key + ".weight"], sd[key + ".bias"]
        if weight.shape[0] == width:  # class-agnostic: the same rows for every class
            weight, bias = weight.repeat((k,) + (1,) * (weight.dim() - 1)), bias.repeat(k)
        if weight.shape[0] != k * width:
            raise ValueError(f"{path}: {key} has {weight.shape[0]} outputs for {k} classes")
        sd[key + ".weight"], sd[key + ".bias"] = per_label(weight, width), per_label(bias, width)
    return n
