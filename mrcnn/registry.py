"""The architectures, each declared once: its builder, its summary and how its checkpoints are recognised.

Model modules declare theirs with :func:`register_model` (torchvision's pattern, as in
``torchvision.models.get_model``); :func:`build_model`, :func:`list_models`, checkpoint detection
(:func:`detect_architecture`), ``mrcnn.load_model`` and ``jobs.train --arch`` all read this table.
A leaf module: it imports no model code, so model modules and the checkpoint format can use it.
"""
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import nn

DEFAULT_NUM_CLASSES = 91  # COCO's category ids with the background, as torchvision's detectors


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    ``build(num_classes=, is_trained=, weights_backbone=, trainable_backbone_layers=, **settings)``
    makes the model (no full-model weights); ``recognise(state_dict)`` says whether a state_dict's
    keys and shapes are this architecture's; ``settings_from_keys(state_dict)`` gives the builder
    settings a plain state_dict implies (e.g. which ResNet stages its FPN reads). ``features``:
    "fpn" (one anchor size per pyramid level; ``returned_layers`` applies) or "single" (one
    feature map, which holds every anchor size). ``num_classes``: the default class count.
    ``outputs``: "masks" (Mask R-CNN) or "keypoints" (Keypoint R-CNN).
    """

    name: str
    build: Callable[..., nn.Module]
    recognise: Callable[[Mapping[str, Any]], bool]
    summary: str
    settings_from_keys: Optional[Callable[[Mapping[str, Any]], dict]] = None
    features: str = "fpn"
    num_classes: int = DEFAULT_NUM_CLASSES  # when the caller gives none (COCO's 91; a person-keypoint model's 2)
    outputs: str = "masks"  # what the second stage predicts besides boxes: "masks" or "keypoints"


_ARCHITECTURES: dict[str, Architecture] = {}


def register_model(name: str, *, recognise, summary: str, settings_from_keys=None, features: str = "fpn",
                   num_classes: int = DEFAULT_NUM_CLASSES, outputs: str = "masks"):
    """Decorator: register ``build`` as architecture ``name`` (each name once)."""
    if features not in ("fpn", "single"):
        raise ValueError(f"features must be 'fpn' or 'single', got {features!r}")
    if outputs not in ("masks", "keypoints"):
        raise ValueError(f"outputs must be 'masks' or 'keypoints', got {outputs!r}")

    def wrap(build):
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = Architecture(name, build, recognise, summary, settings_from_keys, features,
                                             num_classes, outputs)
        return build

    return wrap


def list_models() -> list[str]:
    """The registered architecture names, sorted (``mrcnn.get_model`` builds any of them)."""
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; expected one of {list_models()}") from None


def detect_architecture(state_dict: Mapping[str, Any]) -> str:
    """Which registered architecture made a torchvision-style state_dict (told by its keys and shapes)."""
    found = [a.name for a in _ARCHITECTURES.values() if a.recognise(state_dict)]
    if not found:
        raise ValueError(f"not a Mask R-CNN state_dict of any known architecture ({', '.join(list_models())})")
    if len(found) > 1:  # the recognisers are meant to exclude each other
        raise ValueError(f"state_dict fits several architectures {found}; pass the architecture explicitly")
    return found[0]


def settings_from_keys(name: str, state_dict: Mapping[str, Any]) -> dict:
    arch = get_architecture(name)
    return dict(arch.settings_from_keys(state_dict)) if arch.settings_from_keys else {}


def build_model(
    architecture: str,
    *,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    **settings: Any,
) -> nn.Module:
    """Build a registered architecture without loading full-model weights.

    ``pretrained`` says full weights will be loaded next: like torchvision, the v1 recipe then uses
    FrozenBatchNorm2d in the ResNet (BatchNorm2d when training from scratch) and freezes the bottom
    layers (``trainable_backbone_layers``, default 3; all 5 train without any pretrained weights).
    ``settings`` are the model's keyword arguments; the model records the plain ones it was built
    with in ``model.builder_kwargs`` (what a checkpoint saves). Modules given in ``settings``
    (a custom ``box_head``, ...) are listed in ``model.custom_modules``: a checkpoint cannot
    rebuild them, so ``save_checkpoint`` refuses such a model.
    """
    arch = get_architecture(architecture)
    if pretrained:
        weights_backbone = None  # the full checkpoint overwrites the backbone anyway
    custom = sorted(k for k, v in settings.items() if isinstance(v, nn.Module))
    model = arch.build(
        num_classes=arch.num_classes if num_classes is None else num_classes,
        is_trained=pretrained or weights_backbone is not None,
        weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers,
        **settings,
    )
    model.architecture = arch.name
    model.custom_modules = custom
    return model
