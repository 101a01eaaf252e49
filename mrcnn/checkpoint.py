"""Loading and saving Mask R-CNN weights without unpickling code.

Two file kinds are read, from local paths or fsspec URIs (``s3://...``), besides Detectron2's
(:mod:`mrcnn.detectron2`, which ``load_model`` and ``read_metadata`` hand them to):

- a torchvision-style Mask R-CNN or Keypoint R-CNN ``state_dict`` of any registered architecture
  (``mrcnn.registry``), including the published COCO files, whose older key names are remapped on
  load by the modules themselves
  (``_load_from_state_dict`` of the FPN, RPN head and mask head, as torchvision does);
- our own checkpoint: ``{"format": FORMAT, "format_version": 1, "metadata": {...}, "state_dict": {...}}``
  written by :func:`save_checkpoint`; the metadata records the architecture, classes, thresholds and
  the builder keyword arguments so :func:`load_model` rebuilds the same model.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only.
"""
import os
from typing import Any, Optional

import fsspec
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from . import detectron2
from .coco_categories import default_keypoint_names, default_keypoint_skeleton
from .registry import build_model, detect_architecture, list_models, settings_from_keys
from .weights_file import load_state_dict_file

FORMAT = "mrcnn-batch/maskrcnn"
FORMAT_VERSION = 1

# Keys the published v1 COCO file (and other files from torchvision < 0.13) uses for modules that
# torchvision later renamed; their presence marks such a file.
_LEGACY_KEY_MARKERS = ("rpn.head.conv.weight", "roi_heads.mask_head.mask_fcn1.weight", "backbone.fpn.inner_blocks.0.weight")
# torchvision's published COCO files that need FrozenBatchNorm eps 0.0 after loading (its
# overwrite_eps): Mask R-CNN's v1 and Keypoint R-CNN's COCO_V1. Its keypoint COCO_LEGACY file keeps
# the default eps (1e-5), though its key names are as old as the others'.
_EPS0_COCO_FILES = ("maskrcnn_resnet50_fpn_coco-bf2d0c1e", "keypointrcnn_resnet50_fpn_coco-fc266e95")
_DEFAULT_EPS_COCO_FILES = ("keypointrcnn_resnet50_fpn_coco-9f466800",)




def _no_config(path: str, config) -> None:
    if config is not None:
        raise ValueError(f"{path}: a model config is for Detectron2 checkpoints; this file is not one")


def _is_our_format(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _num_classes(state_dict: dict) -> int:
    try:
        return int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])
    except KeyError:
        raise ValueError("not a Mask R-CNN state_dict (no roi_heads.box_predictor.cls_score.weight)") from None


def _has_legacy_keys(state_dict: dict) -> bool:
    return any(k in state_dict for k in _LEGACY_KEY_MARKERS)


def _torchvision_file_eps(state_dict: dict, path: str) -> Optional[float]:
    """The FrozenBatchNorm eps a plain torchvision file needs (None: the default). Files with the
    pre-0.13 key names are taken for the published COCO files of their kind, which need 0.0, except
    the keypoint COCO_LEGACY file, told by its name."""
    name = os.path.basename(path)
    if any(f in name for f in _DEFAULT_EPS_COCO_FILES):
        return None
    if _has_legacy_keys(state_dict) or any(f in name for f in _EPS0_COCO_FILES):
        return 0.0
    return None


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """torchvision's ``overwrite_eps``: eps is not in the state_dict, so it is set after loading."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps


def _frozen_bn_eps(model: nn.Module) -> Optional[float]:
    eps = {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    if len(eps) > 1:
        raise ValueError(f"FrozenBatchNorm2d layers have different eps values {sorted(eps)}; cannot record one")
    return eps.pop() if eps else None


def _unwrap(obj: Any, path: str) -> tuple[dict, dict]:
    """(state_dict, metadata) of either file kind; metadata is {} for a plain torchvision state_dict."""
    if _is_our_format(obj):
        if obj.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported {FORMAT} format_version {obj.get('format_version')!r}")
        return obj["state_dict"], dict(obj["metadata"])
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(
        f"{path}: neither a Mask R-CNN state_dict nor a {FORMAT} checkpoint "
        f"(top-level keys: {sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__})"
    )


def _apply_state_dict(model: nn.Module, state_dict: dict, path: str, *, legacy_eps_rule: bool) -> None:
    # load_state_dict remaps legacy keys in place through the module hooks: work on a shallow copy
    sd = type(state_dict)(state_dict)
    if hasattr(state_dict, "_metadata"):
        sd._metadata = state_dict._metadata
    eps = _torchvision_file_eps(sd, path) if legacy_eps_rule else None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit this architecture: {e}") from None
    if eps is not None:
        set_frozen_bn_eps(model, eps)


def load_weights_into(model: nn.Module, path) -> dict:
    """Load a checkpoint file of either kind into ``model`` (strict); returns the file's metadata."""
    path = os.fspath(path)
    state_dict, metadata = _unwrap(load_state_dict_file(path), path)
    _check_architecture(model, state_dict, metadata, path)
    _apply_state_dict(model, state_dict, path, legacy_eps_rule=not metadata)
    if metadata.get("frozen_bn_eps") is not None:
        set_frozen_bn_eps(model, float(metadata["frozen_bn_eps"]))
    return metadata


def _check_architecture(model: nn.Module, state_dict: dict, metadata: dict, path: str) -> None:
    expected = getattr(model, "architecture", None)
    found = metadata.get("architecture") or detect_architecture(state_dict)
    if expected is not None and found != expected:
        raise ValueError(f"{path}: holds a {found} checkpoint, but the model is {expected}")


def save_checkpoint(model: nn.Module, path, *, class_names, keypoint_names=None, keypoint_skeleton=None,
                    extra_meta: Optional[dict] = None) -> None:
    """Write ``model``'s weights and settings to ``path`` (local or fsspec URI) in our format.

    ``class_names``: one name per class index, index 0 being the background. ``keypoint_names``
    (a keypoint model's): one name per keypoint; default COCO's person keypoints when the model has
    17. ``keypoint_skeleton``: the pairs of keypoint indices (0-based) a drawing joins; default
    COCO's for its person keypoints. ``extra_meta``: any further plain values (str, numbers, bools, None, lists, dicts) to keep
    with the weights.
    """
    path = os.fspath(path)
    architecture = getattr(model, "architecture", None)
    if architecture not in list_models():
        raise ValueError(
            f"save_checkpoint needs a model made by one of the builders {list_models()}; "
            f"this one has architecture={architecture!r}"
        )
    if getattr(model, "custom_modules", None):
        raise ValueError(
            f"save_checkpoint cannot record the modules this model was given ({', '.join(model.custom_modules)}); "
            f"build it from plain settings (e.g. rpn_anchor_sizes rather than rpn_anchor_generator)"
        )
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but the model has {num_classes} classes")
    keypoint_names = _keypoint_names(model, keypoint_names)
    keypoint_skeleton = _keypoint_skeleton(keypoint_names, keypoint_skeleton)
    config = dict(model.builder_kwargs)
    metadata = {
        "architecture": architecture,
        "num_classes": num_classes,
        "class_names": class_names,
        **({"keypoint_names": keypoint_names} if keypoint_names is not None else {}),
        **({"keypoint_skeleton": keypoint_skeleton} if keypoint_skeleton is not None else {}),
        "score_thresh": config["box_score_thresh"],
        "min_size": config["min_size"],
        "max_size": config["max_size"],
        "frozen_bn_eps": _frozen_bn_eps(model),
        "builder_kwargs": config,
        "extra": dict(extra_meta or {}),
        "torch_version": str(torch.__version__),  # TorchVersion pickles as a class weights_only refuses
    }
    _check_plain(metadata, "metadata")
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": metadata, "state_dict": state_dict}
    with fsspec.open(path, "wb") as f:
        torch.save(payload, f)


def _keypoint_names(model: nn.Module, names) -> Optional[list[str]]:
    """The keypoint names to record: None for a model without keypoints."""
    predictor = getattr(model.roi_heads, "keypoint_predictor", None)
    if predictor is None:
        if names is not None:
            raise ValueError("keypoint_names given, but this model has no keypoint head")
        return None
    count = int(predictor.out_channels)
    if names is None:
        names = default_keypoint_names(count)
        if names is None:
            raise ValueError(f"this model predicts {count} keypoints: give their keypoint_names")
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"keypoint_names has {len(names)} entries but the model predicts {count} keypoints")
    return names


def _keypoint_skeleton(names: Optional[list[str]], skeleton) -> Optional[list[list[int]]]:
    if names is None:
        if skeleton is not None:
            raise ValueError("keypoint_skeleton given, but this model has no keypoint head")
        return None
    if skeleton is None:
        return default_keypoint_skeleton(names)
    pairs = [[int(a), int(b)] for a, b in skeleton]
    bad = [p for p in pairs if not all(0 <= i < len(names) for i in p)]
    if bad:
        raise ValueError(f"keypoint_skeleton pairs {bad} are not indices of the {len(names)} keypoints")
    return pairs


def _check_plain(value: Any, where: str) -> None:
    # only what weights_only loading accepts back, so save never writes an unloadable file
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value (str, number, bool, None, list, dict)")


def read_metadata(path, config=None) -> dict:
    """Metadata of a checkpoint; for a plain torchvision state_dict, what can be inferred from its keys;
    for a Detectron2 checkpoint, what it and its ``config`` (a Detectron2 YAML) say."""
    path = os.fspath(path)
    obj = detectron2.read_weights(path)
    if detectron2.is_detectron2_checkpoint(obj) or detectron2.is_pickle_file(path):
        return detectron2.read_metadata(path, config, obj=obj)
    _no_config(path, config)
    state_dict, metadata = _unwrap(obj, path)
    if metadata:
        return {"format": FORMAT, **metadata}
    return _torchvision_metadata(state_dict, path)


def _torchvision_metadata(state_dict: dict, path: str) -> dict:
    try:
        architecture = detect_architecture(state_dict)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    legacy = _has_legacy_keys(state_dict)
    keypoints = settings_from_keys(architecture, state_dict).get("num_keypoints")
    keypoint_names = default_keypoint_names(keypoints) if keypoints is not None else None
    return {
        "format": "torchvision",
        "architecture": architecture,
        "num_classes": _num_classes(state_dict),
        "class_names": None,
        # torchvision's keypoint files are COCO's person keypoints
        **({"keypoint_names": keypoint_names, "keypoint_skeleton": default_keypoint_skeleton(keypoint_names)}
           if keypoint_names is not None else {}),
        "frozen_bn_eps": _torchvision_file_eps(state_dict, path),
        "legacy_keys": legacy,
    }


def load_model(path, config=None, **overrides) -> nn.Module:
    """Build the model a checkpoint describes and load its weights (strict).

    Accepts our format, plain torchvision state_dicts and Detectron2's checkpoints (``.pth``
    from its DetectionCheckpointer, the model zoo's ``.pkl``; :mod:`mrcnn.detectron2`), the latter
    with ``config``, the Detectron2 YAML the model was trained with (default: Detectron2's
    defaults). ``overrides`` are builder keyword arguments (e.g. ``box_score_thresh=0.5``,
    ``min_size=640``) that replace the recorded ones. The result has ``model.class_names``
    (None if the file does not say), a keypoint model's ``model.keypoint_names``, and
    ``model.checkpoint_metadata``.
    """
    path = os.fspath(path)
    obj = detectron2.read_weights(path)
    if detectron2.is_detectron2_checkpoint(obj) or detectron2.is_pickle_file(path):
        return detectron2.load_detectron2_model(path, config, obj=obj, **overrides)
    _no_config(path, config)
    state_dict, metadata = _unwrap(obj, path)
    if metadata:
        architecture = metadata.get("architecture")
        kwargs = dict(metadata.get("builder_kwargs", {}))
    else:
        architecture = _torchvision_metadata(state_dict, path)["architecture"]
        kwargs = settings_from_keys(architecture, state_dict)
    if architecture not in list_models():
        raise ValueError(f"{path}: unknown architecture {architecture!r}; expected one of {list_models()}")
    num_classes = _num_classes(state_dict)
    if overrides.get("num_classes") not in (None, num_classes):
        raise ValueError(f"{path}: has {num_classes} classes; num_classes={overrides['num_classes']} cannot be loaded")
    overrides.pop("num_classes", None)
    kwargs.update(overrides)

    model = build_model(architecture, num_classes=num_classes, pretrained=True, **kwargs)
    _apply_state_dict(model, state_dict, path, legacy_eps_rule=not metadata)
    if metadata.get("frozen_bn_eps") is not None:
        set_frozen_bn_eps(model, float(metadata["frozen_bn_eps"]))
    model.class_names = metadata.get("class_names")
    if hasattr(model, "num_keypoints"):
        # a plain torchvision file says nothing: its 17 keypoints are COCO's person keypoints
        model.keypoint_names = metadata.get("keypoint_names") or default_keypoint_names(model.num_keypoints)
        model.keypoint_skeleton = metadata.get("keypoint_skeleton") or default_keypoint_skeleton(model.keypoint_names)
    model.checkpoint_metadata = {"format": FORMAT, **metadata} if metadata else _torchvision_metadata(state_dict, path)
    return model
