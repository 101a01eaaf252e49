"""The recipe of the Detectron2 fixtures (tests/data/detectron2): seeded Mask R-CNN weights with
Detectron2's key names, the configs they run with, and the images.

Used both by the tests (to rebuild the checkpoint files, which are too large to commit) and,
beside the project, by the script that ran Detectron2's own DefaultPredictor on them and wrote
``tests/data/detectron2/<arch>.json`` (see tests/data/detectron2/README.md). Needs torch,
numpy and Pillow only.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "detectron2")
PHOTO = os.path.join(HERE, "grace_hopper.jpg")  # public domain (US Navy), as shipped with matplotlib

# architecture -> (our registry name, the config file under tests/data/detectron2, seed)
ARCHS = {
    "R50-FPN": ("maskrcnn_resnet50_fpn", "mask_rcnn_R_50_FPN.yaml", 1),
    "R101-FPN": ("maskrcnn_resnet101_fpn", "mask_rcnn_R_101_FPN.yaml", 2),
    "X101-FPN": ("maskrcnn_resnext101_32x8d_fpn", "mask_rcnn_X_101_32x8d_FPN.yaml", 3),
    "R50-C4": ("maskrcnn_resnet50_c4", "mask_rcnn_R_50_C4.yaml", 4),
}
NUM_CLASSES = 80  # COCO's, as Detectron2 counts them (no background)


def images() -> dict[str, np.ndarray]:
    """H x W x 3 uint8 RGB test images: the photo (portrait), a landscape crop of it, and a small
    one that the model upscales."""
    from PIL import Image

    photo = Image.open(PHOTO).convert("RGB")
    crop = photo.crop((0, 60, 512, 380)).resize((451, 282), Image.BICUBIC)
    small = photo.resize((150, 176), Image.BICUBIC)
    return {"portrait": np.asarray(photo), "landscape": np.asarray(crop), "small": np.asarray(small)}


def _d2_key(ours: str, kind: str) -> str:
    """Detectron2's name of one of our keys (the inverse of mrcnn.detectron2.convert's renames)."""
    body = "backbone.bottom_up." if kind == "fpn" else "backbone."

    def stage(m):  # layer k is Detectron2's res(k+1)
        return str(int(m.group(1)) + 1)

    rules = [
        (r"backbone\.body\.conv1\.weight", lambda m: body + "stem.conv1.weight"),
        (r"backbone\.body\.bn1\.(\w+)", lambda m: f"{body}stem.conv1.norm.{m.group(1)}"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight",
         lambda m: f"{body}res{stage(m)}.{m.group(2)}.conv{m.group(3)}.weight"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
         lambda m: f"{body}res{stage(m)}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight",
         lambda m: f"{body}res{stage(m)}.{m.group(2)}.shortcut.weight"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
         lambda m: f"{body}res{stage(m)}.{m.group(2)}.shortcut.norm.{m.group(3)}"),
        (r"roi_heads\.box_head\.res5\.(\d+)\.conv(\d)\.weight", lambda m: f"roi_heads.res5.{m.group(1)}.conv{m.group(2)}.weight"),
        (r"roi_heads\.box_head\.res5\.(\d+)\.bn(\d)\.(\w+)",
         lambda m: f"roi_heads.res5.{m.group(1)}.conv{m.group(2)}.norm.{m.group(3)}"),
        (r"roi_heads\.box_head\.res5\.(\d+)\.downsample\.0\.weight", lambda m: f"roi_heads.res5.{m.group(1)}.shortcut.weight"),
        (r"roi_heads\.box_head\.res5\.(\d+)\.downsample\.1\.(\w+)",
         lambda m: f"roi_heads.res5.{m.group(1)}.shortcut.norm.{m.group(2)}"),
        (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)", lambda m: f"backbone.fpn_lateral{int(m.group(1)) + 2}.{m.group(2)}"),
        (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)", lambda m: f"backbone.fpn_output{int(m.group(1)) + 2}.{m.group(2)}"),
        (r"rpn\.head\.conv\.0\.0\.(\w+)", lambda m: f"proposal_generator.rpn_head.conv.{m.group(1)}"),
        (r"rpn\.head\.cls_logits\.(\w+)", lambda m: f"proposal_generator.rpn_head.objectness_logits.{m.group(1)}"),
        (r"rpn\.head\.bbox_pred\.(\w+)", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m.group(1)}"),
        (r"roi_heads\.box_head\.fc6\.(\w+)", lambda m: f"roi_heads.box_head.fc1.{m.group(1)}"),
        (r"roi_heads\.box_head\.fc7\.(\w+)", lambda m: f"roi_heads.box_head.fc2.{m.group(1)}"),
        (r"roi_heads\.box_predictor\.(\w+)\.(\w+)", lambda m: f"roi_heads.box_predictor.{m.group(1)}.{m.group(2)}"),
        (r"roi_heads\.mask_head\.(\d)\.0\.(\w+)", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"),
        (r"roi_heads\.mask_predictor\.conv5_mask\.(\w+)", lambda m: f"roi_heads.mask_head.deconv.{m.group(1)}"),
        (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(\w+)", lambda m: f"roi_heads.mask_head.predictor.{m.group(1)}"),
    ]
    for pattern, name in rules:
        if m := re.fullmatch(pattern, ours):
            return name(m)
    raise KeyError(ours)


def detectron2_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Seeded Mask R-CNN weights of ``arch`` under Detectron2's names and class layout (80 classes,
    background last). Scaled so that a photo gives proposals everywhere and a few dozen detections
    with masks of every size: He-normal convolutions, a stem scaled for 0..255 inputs, small last
    norms in the residual branches, box deltas near zero, spread class logits."""
    import mrcnn

    name, _, seed = ARCHS[arch]
    kind = "c4" if name.endswith("_c4") else "fpn"
    model = mrcnn.get_model(name, num_classes=NUM_CLASSES + 1, weights_backbone=None,
                            trainable_backbone_layers=None)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") or key.startswith("roi_heads.mask_head.res5."):
            continue  # not weights / C4's res5 is listed under the box head too
        shape = tuple(value.shape)
        if key.endswith((".running_mean",)):
            t = torch.randn(shape, generator=g) * 0.1
        elif key.endswith(".running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif value.dim() == 1 and (".bn" in key or "downsample.1" in key or key.endswith("body.bn1.weight") or key.endswith("body.bn1.bias")):
            last = re.search(r"\.bn3\.|downsample", key) is not None
            if key.endswith("weight"):
                t = (torch.rand(shape, generator=g) * 0.5 + 0.5) * (0.2 if last else 1.0)
            else:
                t = torch.randn(shape, generator=g) * 0.1
        elif key.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.01
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            if "conv5_mask" in key:  # ConvTranspose2d: (in, out, kh, kw)
                fan_in = shape[0]
            std = math.sqrt(2.0 / fan_in)
            if key == "backbone.body.conv1.weight" and arch != "X101-FPN":
                std /= 64.0  # 0..255 inputs less the mean (X101's config divides by the std)
            elif key.startswith("rpn.head.bbox_pred") or key.startswith("roi_heads.box_predictor.bbox_pred"):
                std *= 0.02
            elif key.startswith("roi_heads.box_predictor.cls_score"):
                std *= 1.0
            t = torch.randn(shape, generator=g) * std
            if key == "roi_heads.box_predictor.cls_score.weight":
                # RoI features share a large positive part: centred rows let every class win somewhere
                t = (t - t.mean(dim=1, keepdim=True)) * (3.0 if kind == "fpn" else 20.0)
        out[key] = t
    # torchvision's class layout (background first) to Detectron2's (background last, no
    # background rows of box deltas and mask logits)
    p = "roi_heads.box_predictor."
    for kind_ in ("weight", "bias"):
        cls = out[p + "cls_score." + kind_]
        out[p + "cls_score." + kind_] = torch.cat([cls[1:], cls[:1]])
        out[p + "bbox_pred." + kind_] = out[p + "bbox_pred." + kind_][4:]
        k = "roi_heads.mask_predictor.mask_fcn_logits." + kind_
        out[k] = out[k][1:]
    return {_d2_key(k, kind): v.contiguous() for k, v in out.items()}


def write_pth(state_dict: dict, path: str) -> None:
    """As Detectron2's DetectionCheckpointer.save writes it (model and iteration)."""
    torch.save({"model": state_dict, "iteration": 89999}, path)


def write_pkl(state_dict: dict, path: str, numpy_core: str = "numpy._core") -> None:
    """As the model zoo's .pkl files are (protocol 2 pickle of numpy arrays); ``numpy_core``
    "numpy.core" writes the names numpy 1.x pickles carry."""
    import pickle

    data = pickle.dumps({"model": {k: v.numpy() for k, v in state_dict.items()}, "__author__": "mrcnn-batch tests"},
                        protocol=2)
    if numpy_core != "numpy._core":
        data = data.replace(b"cnumpy._core.multiarray\n", b"c" + numpy_core.encode() + b".multiarray\n")
    with open(path, "wb") as f:
        f.write(data)


def write_checkpoint(state_dict: dict, folder: str, layout: str) -> str:
    """``layout``: "pth", "pkl" (numpy 2's names) or "pkl-numpy1" (numpy 1.x's); returns the path."""
    path = os.path.join(folder, f"model_final.{'pth' if layout == 'pth' else 'pkl'}")
    if layout == "pth":
        write_pth(state_dict, path)
    else:
        write_pkl(state_dict, path, numpy_core="numpy.core" if layout == "pkl-numpy1" else "numpy._core")
    return path


def config_path(arch: str) -> str:
    return os.path.join(HERE, ARCHS[arch][1])


def reference(arch: str) -> dict:
    """Detectron2's detections for ``arch`` (written by make_fixtures.py)."""
    with open(os.path.join(HERE, f"{arch}.json")) as f:
        return json.load(f)


def _mask_iou(counts_a: str, counts_b: str, size) -> float:
    from pycocotools import mask as mask_util

    ra = {"size": list(size), "counts": counts_a.encode()}
    rb = {"size": list(size), "counts": counts_b.encode()}
    area_a, area_b = mask_util.area([ra, rb])
    if area_a == 0 and area_b == 0:
        return 1.0  # both empty: the same mask
    return float(mask_util.iou([ra], [rb], [0])[0][0])


def assert_rows_equal_detectron2(rows_by_image: dict, arch: str, *, box_tol=0.05, score_tol=1e-3) -> int:
    """Every detection equal to Detectron2's: COCO label and name, box to ``box_tol`` px, score to
    ``score_tol``; masks (RLE dicts or ``counts`` strings) mean IoU >= 0.99. ``rows_by_image``: the
    Predictor's results (or the job's rows in that shape) by image name, for some or all of the
    images. Returns how many detections were compared."""
    from mrcnn import COCO_CATEGORY_NAMES
    from mrcnn.detectron2 import coco_label_ids

    ids = coco_label_ids()
    compared = 0
    assert rows_by_image and set(rows_by_image) <= set(reference(arch)["images"])
    for name, out in rows_by_image.items():
        r = reference(arch)["images"][name]
        assert len(out["labels"]) == len(r["classes"]), \
            f"{arch} {name}: {len(out['labels'])} detections, Detectron2 {len(r['classes'])}"
        assert [int(v) for v in out["labels"]] == [ids[c] for c in r["classes"]], f"{arch} {name}: labels differ"
        assert list(out["label_names"]) == [COCO_CATEGORY_NAMES[ids[c]] for c in r["classes"]]
        np.testing.assert_allclose(np.asarray(out["boxes"], dtype=np.float32).reshape(-1, 4),
                                   np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4), atol=box_tol, rtol=0)
        np.testing.assert_allclose(np.asarray(out["scores"]), np.asarray(r["scores"]), atol=score_tol, rtol=0)
        counts = [m["counts"] if isinstance(m, dict) else m for m in out["masks"]]
        ious = [_mask_iou(a, b, r["size"]) for a, b in zip(counts, r["masks"])]
        assert np.mean(ious) >= 0.99, f"{arch} {name}: mask IoU mean {np.mean(ious):.4f}"
        compared += len(r["classes"])
    return compared
