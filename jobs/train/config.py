"""Every setting of a training run, declared once (``jobs.flags``): the command line is built from
:class:`TrainConfig`'s fields; its derived defaults and checks run however a config is made."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from jobs.flags import Settings, at_least, setting
from mrcnn.backbone import normalize_returned_layers, num_fpn_levels
from mrcnn.registry import get_architecture, list_models

# --arch: the registered architectures, Mask R-CNN ones also by the short names run configs record
ARCHS = {name.removeprefix("maskrcnn_"): name for name in list_models()}


# Field order is the flags' order in --help and the key order of the config the checkpoints record.
@dataclass
class TrainConfig(Settings):
    data: str = setting(help="dataset root holding annotations.json (local or fsspec URI)")
    output: str = setting(help="run folder: checkpoints, metrics.jsonl, model_final.pt")
    num_workers: int = setting(1, "DDP workers (Ray Train)", check=at_least(1))
    use_gpu: bool = setting(False, "one GPU per worker, NCCL, AMP")
    cpus_per_worker: float = setting(1, "CPUs per worker (torch threads on CPU)")
    max_iters: int = setting(1000, "training iterations (optimizer steps)", check=at_least(1))
    batch_size: int = setting(2, "images per worker per step", check=at_least(1))
    lr: Optional[float] = setting(None, "base lr (default 0.02 * num_workers * batch_size / 16)")
    momentum: float = setting(0.9)
    weight_decay: float = setting(1e-4)
    warmup_iters: Optional[int] = setting(None, "default min(1000, max_iters // 10)")
    warmup_factor: float = setting(1e-3)
    lr_steps: Optional[list[int]] = setting(
        None, "iterations where lr is multiplied by --lr-gamma (default 16/26 and 22/26 of max-iters)", nargs="*",
        check=lambda v: None if v is None or sorted(v) == v else f"must be increasing, got {v}")
    lr_gamma: float = setting(0.1)
    clip_grad_norm: Optional[float] = setting(None, "clip the gradient norm (off by default)")
    weights: Optional[str] = setting(None, "initial full-model weights (torchvision state_dict or our checkpoint)")
    weights_backbone: Optional[str] = setting(None, "ImageNet ResNet state_dict for the backbone")
    arch: str = setting("resnet50_fpn", f"architecture (mrcnn.list_models(); short names: {', '.join(sorted(ARCHS))})",
                        choices=sorted(ARCHS) + sorted(set(ARCHS.values()) - set(ARCHS)), metavar="ARCH")
    min_size: list[int] = setting([800], "one or more sizes (multi-scale training)")
    max_size: int = setting(1333)
    roi_pooler: Optional[str] = setting(None, "the box and mask heads' pooler (default roi_align_legacy, "
                                        "torchvision's); the paper's ablation, Table 2c",
                                        choices=("roi_align_legacy", "roi_align", "roi_warp", "roi_pool"))
    mask_loss: Optional[str] = setting(None, "per-class sigmoid (default, the paper's) or a softmax over classes "
                                             "(Table 2b)", choices=("sigmoid", "softmax"))
    mask_head: Optional[str] = setting(None, "convolutional mask head (default) or fc layers (Table 2e)",
                                       choices=("fcn", "mlp"))
    returned_layers: Optional[list[int]] = setting(
        None, "ResNet stages (1-4) the FPN reads (default 1 2 3 4; 1 2 3 drops layer4: a smaller, faster model for "
              "small objects)")
    anchor_sizes: Optional[list[int]] = setting(
        None, "RPN anchor size per FPN level, one per returned layer plus one for 'pool' (default 32 64 128 256 "
              "512; smaller for small objects); for C4 models, all sizes on its one map")
    box_batch_size_per_image: Optional[int] = setting(
        None, "RoIs sampled per image for the box and mask heads (default the model's, 512 as in the reference; "
              "fewer is faster)", check=at_least(1))
    trainable_backbone_layers: Optional[int] = setting(
        None, "0-5 (default 3 with pretrained weights)",
        check=lambda v: None if v is None or 0 <= v <= 5 else f"must be in 0..5, got {v}")
    hflip: float = setting(0.5, "horizontal flip probability")
    checkpoint_every: int = setting(500, check=at_least(1))
    eval_every: Optional[int] = setting(
        None, "evaluate on DATA/val every N steps (default: --checkpoint-every; 0: at the end only)")
    eval_max_images: Optional[int] = setting(None, "evaluate on the first N val images only")
    log_every: int = setting(20, "metrics line every N steps", check=at_least(1))
    loader_workers: int = setting(2, "DataLoader processes per worker", check=at_least(0))
    seed: int = setting(0)
    max_failures: int = setting(3, "worker-group restarts from the latest checkpoint")
    num_to_keep: int = setting(2, "checkpoints kept in storage")
    fail_once_at: Optional[int] = setting(None, argparse.SUPPRESS)  # test hook: rank 1 dies once at this step

    def __post_init__(self):
        super().__post_init__()
        # derived defaults: fixed points, so a config made again from its dict (a worker's) is the same
        self.eval_every = self.checkpoint_every if self.eval_every is None else self.eval_every
        self.lr = 0.02 * self.num_workers * self.batch_size / 16 if self.lr is None else self.lr  # linear scaling
        self.warmup_iters = min(1000, self.max_iters // 10) if self.warmup_iters is None else self.warmup_iters
        self.lr_steps = [int(self.max_iters * 16 / 26), int(self.max_iters * 22 / 26)] if self.lr_steps is None else self.lr_steps
        self.arch = next(short for short, name in ARCHS.items() if self.arch in (short, name))  # one spelling
        if self.returned_layers is not None:
            try:
                self.returned_layers = normalize_returned_layers(self.returned_layers)
            except ValueError as e:
                raise self.error(f"--returned-layers: {e}") from None
        if get_architecture(ARCHS[self.arch]).features == "fpn":
            levels = num_fpn_levels(self.returned_layers)
            if self.anchor_sizes is not None and len(self.anchor_sizes) != levels:
                raise self.error(f"--anchor-sizes needs one size per FPN level ({levels}), got {len(self.anchor_sizes)}")
        elif self.returned_layers is not None:
            raise self.error(f"--returned-layers is for the FPN architectures; {self.arch} has one feature map")
        if self.keypoints and (self.mask_loss or self.mask_head):
            raise self.error(f"--mask-loss and --mask-head are for the Mask R-CNN architectures; {self.arch} predicts keypoints")
        if self.weights and self.weights_backbone:
            raise self.error("give --weights or --weights-backbone, not both")
        self.data, self.output = self.data.rstrip("/"), self.output.rstrip("/")

    @property
    def keypoints(self) -> bool:  # Keypoint R-CNN, else Mask R-CNN
        return get_architecture(ARCHS[self.arch]).outputs == "keypoints"
