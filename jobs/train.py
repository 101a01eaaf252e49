"""Train Mask R-CNN on a COCO-format dataset with Ray Train (DDP over workers).

    python -m jobs.train --data s3://bucket/shapes --output s3://bucket/runs/shapes --num-workers 2
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.train --data s3://bucket/shapes --output s3://bucket/runs/shapes --num-workers 8 --use-gpu

Data: ``DATA/annotations.json`` + images (local or any fsspec URI), read by ``jobs.coco_data``; each
worker reads its own shard (``shard_indices(..., pad=True)``, reshuffled every epoch). When
``DATA/val/annotations.json`` exists, rank 0 evaluates on it (COCO bbox/segm AP) every
``--eval-every`` steps and at the end; evaluation runs the model in-process, image by image, so on
CPU keep the val split small or set ``--eval-every 0`` (evaluate at the end only).

Recipe (torchvision's references/detection): SGD momentum 0.9, weight decay 1e-4, linear warm-up
from ``--warmup-factor``, step decay by ``--lr-gamma`` at ``--lr-steps`` (iterations), horizontal
flips, multi-scale training through the model's ``min_size`` tuple (``--min-size 480 512 ... 800``;
evaluation uses the last one), AMP on GPU. ``--lr`` defaults to the linear scaling rule
0.02 * global batch / 16. Initialisation: ``--weights`` (a torchvision Mask R-CNN state_dict, e.g.
the COCO file, or our checkpoint; the box and mask predictors are replaced when the class count
differs), ``--weights-backbone`` (ImageNet ResNet state_dict), or nothing (from scratch; all
backbone layers then train, as in torchvision). Small objects: ``--anchor-sizes 16 32 64 128 256``
(recorded in the checkpoint, so inference uses the same anchors); ``--box-batch-size-per-image``
sets the RoIs sampled per image for the heads (512 as in the reference; fewer is faster).

Output, all under ``--output`` (local or s3://; ``AWS_ENDPOINT_URL`` is honoured):

- ``train/checkpoint_*``: Ray Train checkpoints every ``--checkpoint-every`` steps and at the end
  (``model.pt`` in mrcnn.checkpoint's format, ``train_state.pt`` with optimizer, scheduler, scaler
  state and the step, ``meta.json``). ``RunConfig(storage_path=OUTPUT, name="train")`` is derived
  from ``--output`` only, so re-submitting the same command resumes from the latest checkpoint;
  ``FailureConfig(max_failures=...)`` restarts the worker group from it when a worker dies.
- ``metrics.jsonl``: one JSON line per logged step (rank 0): losses averaged over the interval
  and the workers, lr, images/s, and ``bbox_AP``, ``segm_AP50``, ... at evaluation steps. A resumed
  run drops the lines after its checkpoint's step before logging again, so no step repeats;
  ``start_step`` says which checkpoint step the attempt that logged a line started from.
- ``run.json``: the flags that decide the model (``MODEL_FLAGS``); re-submitting with other values
  fails with a message naming them instead of resuming checkpoints of another model.
- ``model_final.pt``: the final model (mrcnn.checkpoint format, ``class_names`` included), what the
  batch job's ``--weights`` takes; then ``final.json`` ({"step", "model"}) marks the run finished.
  A re-submitted finished run (same ``--max-iters``) sees it and exits without starting Ray.
"""

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from typing import Optional

import torch

from jobs import storage
from jobs.storage import join, resolve, storage_options

from mrcnn.registry import get_architecture, list_models

# --arch: the registered architectures, Mask R-CNN ones also by their short names (resnet50_fpn)
# which run configs record
ARCHS = {name.removeprefix("maskrcnn_"): name for name in list_models()}
RUN_NAME = "train"
# Flags that decide the model a run trains: a resumed run must keep them, since its checkpoints
# hold that model (``--max-iters`` and the optimiser flags may change: continuing is fine).
MODEL_FLAGS = ("arch", "weights", "weights_backbone", "trainable_backbone_layers", "min_size", "max_size",
               "anchor_sizes", "box_batch_size_per_image", "returned_layers", "roi_pooler", "mask_loss", "mask_head")


# ------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root holding annotations.json (local or fsspec URI)")
    p.add_argument("--output", required=True, help="run folder: checkpoints, metrics.jsonl, model_final.pt")
    p.add_argument("--num-workers", type=int, default=1, help="DDP workers (Ray Train)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, AMP")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (torch threads on CPU)")
    p.add_argument("--max-iters", type=int, default=1000, help="training iterations (optimizer steps)")
    p.add_argument("--batch-size", type=int, default=2, help="images per worker per step")
    p.add_argument("--lr", type=float, default=None, help="base lr (default 0.02 * num_workers * batch_size / 16)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=None, help="default min(1000, max_iters // 10)")
    p.add_argument("--warmup-factor", type=float, default=1e-3)
    p.add_argument("--lr-steps", type=int, nargs="*", default=None,
                   help="iterations where lr is multiplied by --lr-gamma (default 16/26 and 22/26 of max-iters)")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (off by default)")
    p.add_argument("--weights", default=None, help="initial full-model weights (torchvision state_dict or our checkpoint)")
    p.add_argument("--weights-backbone", default=None, help="ImageNet ResNet state_dict for the backbone")
    p.add_argument("--arch", choices=sorted(ARCHS) + sorted(set(ARCHS.values()) - set(ARCHS)), default="resnet50_fpn",
                   metavar="ARCH", help=f"architecture (mrcnn.list_models(); short names: {', '.join(sorted(ARCHS))})")
    p.add_argument("--min-size", type=int, nargs="+", default=[800], help="one or more sizes (multi-scale training)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--roi-pooler", choices=("roi_align_legacy", "roi_align", "roi_warp", "roi_pool"), default=None,
                   help="the box and mask heads' pooler (default roi_align_legacy, torchvision's); the paper's "
                        "ablation, Table 2c")
    p.add_argument("--mask-loss", choices=("sigmoid", "softmax"), default=None,
                   help="per-class sigmoid (default, the paper's) or a softmax over classes (Table 2b)")
    p.add_argument("--mask-head", choices=("fcn", "mlp"), default=None,
                   help="convolutional mask head (default) or fc layers (Table 2e)")
    p.add_argument("--returned-layers", type=int, nargs="+", default=None,
                   help="ResNet stages (1-4) the FPN reads (default 1 2 3 4; 1 2 3 drops layer4: a smaller, "
                        "faster model for small objects)")
    p.add_argument("--anchor-sizes", type=int, nargs="+", default=None,
                   help="RPN anchor size per FPN level, one per returned layer plus one for 'pool' (default "
                        "32 64 128 256 512; smaller for small objects); for C4 models, all sizes on its one map")
    p.add_argument("--box-batch-size-per-image", type=int, default=None,
                   help="RoIs sampled per image for the box and mask heads (default the model's, 512 as in "
                        "the reference; fewer is faster)")
    p.add_argument("--trainable-backbone-layers", type=int, default=None, help="0-5 (default 3 with pretrained weights)")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on DATA/val every N steps (default: --checkpoint-every; 0: at the end only)")
    p.add_argument("--eval-max-images", type=int, default=None, help="evaluate on the first N val images only")
    p.add_argument("--log-every", type=int, default=20, help="metrics line every N steps")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the latest checkpoint")
    p.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept in storage")
    # test hook: rank 1 dies (os._exit) once at this step; the marker file makes it one-shot
    p.add_argument("--fail-once-at", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    for name in ("num_workers", "max_iters", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.loader_workers < 0:
        p.error("--loader-workers must be >= 0")
    if args.eval_every is None:
        args.eval_every = args.checkpoint_every
    args.arch = next(short for short, name in ARCHS.items() if args.arch in (short, name))  # one spelling
    if args.lr is None:
        args.lr = 0.02 * args.num_workers * args.batch_size / 16
    if args.warmup_iters is None:
        args.warmup_iters = min(1000, args.max_iters // 10)
    if args.lr_steps is None:
        args.lr_steps = [int(args.max_iters * 16 / 26), int(args.max_iters * 22 / 26)]
    if sorted(args.lr_steps) != args.lr_steps:
        p.error(f"--lr-steps must be increasing, got {args.lr_steps}")
    if args.trainable_backbone_layers is not None and not 0 <= args.trainable_backbone_layers <= 5:
        p.error(f"--trainable-backbone-layers must be in 0..5, got {args.trainable_backbone_layers}")
    from mrcnn.backbone import normalize_returned_layers, num_fpn_levels

    if args.returned_layers is not None:
        try:
            args.returned_layers = normalize_returned_layers(args.returned_layers)
        except ValueError as e:
            p.error(f"--returned-layers: {e}")
    if get_architecture(ARCHS[args.arch]).features == "fpn":
        levels = num_fpn_levels(args.returned_layers)
        if args.anchor_sizes is not None and len(args.anchor_sizes) != levels:
            p.error(f"--anchor-sizes needs one size per FPN level ({levels}), got {len(args.anchor_sizes)}")
    elif args.returned_layers is not None:
        p.error(f"--returned-layers is for the FPN architectures; {args.arch} has one feature map")
    if get_architecture(ARCHS[args.arch]).outputs == "keypoints" and (args.mask_loss or args.mask_head):
        p.error(f"--mask-loss and --mask-head are for the Mask R-CNN architectures; {args.arch} predicts keypoints")
    if args.box_batch_size_per_image is not None and args.box_batch_size_per_image < 1:
        p.error("--box-batch-size-per-image must be >= 1")
    if args.weights and args.weights_backbone:
        p.error("give --weights or --weights-backbone, not both")
    args.data = args.data.rstrip("/")
    args.output = args.output.rstrip("/")
    return args


# --------------------------------------------------------------------------------- storage
def storage_for(output: str):
    """(storage_path, pyarrow filesystem or None) for RunConfig; S3 honours AWS_ENDPOINT_URL."""
    if output.startswith("s3://"):
        from pyarrow import fs as pafs
        from urllib.parse import urlparse

        kwargs = {}
        endpoint = storage_options(output).get("endpoint_url")  # the same variables the batch job reads
        if endpoint:
            u = urlparse(endpoint)
            kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return output[len("s3://"):], pafs.S3FileSystem(**kwargs)
    if "://" in output and not output.startswith("file://"):
        return output, None  # let Ray resolve other schemes (gs://, ...)
    return os.path.abspath(output.removeprefix("file://")), None


def _exists(uri) -> bool:
    fs, path = resolve(uri)
    return fs.exists(path)


def read_json(uri) -> Optional[dict]:
    """The JSON file at ``uri``, or None when there is none."""
    fs, path = resolve(uri)
    try:
        return storage.read_json(fs, path)
    except FileNotFoundError:
        return None


def write_bytes(uri, data: bytes) -> None:
    """Whole-file write: readers see the old content or all of the new (``storage.write_atomic``)."""
    fs, path = resolve(uri)
    storage.write_atomic(fs, path, data)


class MetricsLog:
    """OUTPUT/metrics.jsonl kept by rank 0, rewritten whole at each log (object stores cannot append).

    Lines logged after ``start_step`` by an earlier attempt are dropped: training redoes those steps.
    """

    def __init__(self, uri, start_step):
        self.uri = uri
        fs, path = resolve(uri)
        self.lines = []
        if fs.exists(path):
            with fs.open(path, "rt") as f:
                self.lines = [json.loads(line) for line in f if line.strip()]
        self.lines = [m for m in self.lines if m["step"] <= start_step]

    def log(self, record):
        self.lines.append(record)
        write_bytes(self.uri, "".join(json.dumps(m) + "\n" for m in self.lines).encode())


# ----------------------------------------------------------------------------------- model
def lr_factor(step, warmup_iters, warmup_factor, milestones, gamma):
    """Linear warm-up times step decay: the factor of the base lr at iteration ``step``."""
    warm = 1.0
    if step < warmup_iters:
        alpha = step / warmup_iters
        warm = warmup_factor * (1 - alpha) + alpha
    return warm * gamma ** sum(step >= m for m in milestones)


def build_model(cfg, num_classes, num_keypoints=None):
    """The model of ``cfg`` with ``num_classes`` outputs (and ``num_keypoints``, a keypoint
    architecture's), initialised as the recipe says."""
    from mrcnn.checkpoint import read_metadata
    from mrcnn.models import get_model

    arch = ARCHS[cfg["arch"]]
    keypoints = get_architecture(arch).outputs == "keypoints"
    kwargs = dict(min_size=tuple(cfg["min_size"]), max_size=cfg["max_size"],
                  trainable_backbone_layers=cfg["trainable_backbone_layers"])
    # given only when set: the model's defaults stay the one place for them (older configs lack the keys)
    if cfg.get("box_batch_size_per_image"):
        kwargs["box_batch_size_per_image"] = cfg["box_batch_size_per_image"]
    if cfg.get("anchor_sizes"):
        kwargs["rpn_anchor_sizes"] = cfg["anchor_sizes"]
    if cfg.get("returned_layers"):
        kwargs["returned_layers"] = cfg["returned_layers"]
    for flag, kwarg in (("roi_pooler", "roi_pooler"), ("mask_loss", "mask_loss"), ("mask_head", "mask_head_type")):
        if cfg.get(flag):
            kwargs[kwarg] = cfg[flag]
    if not cfg["weights"]:
        if keypoints:
            kwargs["num_keypoints"] = num_keypoints
        return get_model(arch, num_classes=num_classes, weights_backbone=cfg["weights_backbone"], **kwargs)
    meta = read_metadata(cfg["weights"])
    file_classes = int(meta["num_classes"])
    if keypoints:
        kwargs["num_keypoints"] = len(meta.get("keypoint_names") or []) or meta["builder_kwargs"]["num_keypoints"]
    model = get_model(arch, weights=cfg["weights"], num_classes=file_classes, **kwargs)
    if keypoints:
        model.reset_predictors(num_classes, num_keypoints)  # fine-tuning on other classes or keypoints
    elif file_classes != num_classes:
        model.reset_predictors(num_classes)
    return model


# ------------------------------------------------------------------------------ evaluation
def model_layout(device: torch.device) -> torch.memory_format:
    """The model's memory format for training: channels-last on CUDA, where tensor-core
    convolutions want it and RoIAlign then reads the FPN maps as they are instead of transposing
    the whole pyramid at every call (mrcnn/ops/csrc/roi_align_cuda.cu); NCHW on CPU, as before."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def evaluate_model(model, gt_uri, class_names, *, device="cpu", max_images=None):
    """COCO bbox/segm metrics of ``model`` (any mode; restored after) on a COCO annotation file.

    Goes through ``jobs.evaluate.evaluate_predictor``: the Predictor, the batch job's decoder
    and rows, categories matched by name (``class_names[label]``).
    """
    from jobs.evaluate import evaluate_predictor
    from mrcnn.predictor import Predictor

    was_training = model.training
    try:
        # NCHW kept: the Predictor would otherwise convert the model being trained in place
        predictor = Predictor(model, device=device, class_names=class_names, channels_last=False)
        return evaluate_predictor(predictor, gt_uri, max_images=max_images, storage_options=storage_options(gt_uri))
    finally:
        model.train(was_training)


def flat_eval_metrics(result):
    return {f"{t}_{k}": round(v, 5) for t in ("bbox", "segm", "keypoints") if t in result for k, v in result[t].items()}


# ------------------------------------------------------------------------------ checkpoints
def _save_model(model, path, class_names, extra_meta):
    from mrcnn.checkpoint import save_checkpoint

    save_checkpoint(model, path, class_names=class_names, keypoint_names=getattr(model, "keypoint_names", None),
                    keypoint_skeleton=getattr(model, "keypoint_skeleton", None), extra_meta=extra_meta)


def save_train_checkpoint(directory, model, optimizer, scheduler, scaler, step, cfg, class_names):
    _save_model(model, os.path.join(directory, "model.pt"), class_names, {"step": step, "train_config": cfg})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step}, os.path.join(directory, "train_state.pt"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"step": step, "class_names": class_names}, f)


def read_checkpoint_meta(directory):
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- training loop
def _batches(dataset, rank, world, cfg, start_step):
    """(step, images, targets) from start_step + 1 on, epoch after epoch, this rank's shard only."""
    from jobs.coco_data import collate_fn, shard_indices

    bs = cfg["batch_size"]
    per_rank = len(shard_indices(len(dataset), rank, world, pad=True))
    steps_per_epoch = per_rank // bs
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images over {world} workers give {per_rank} per worker, "
                         f"fewer than --batch-size {bs}")
    step = start_step
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        indices = shard_indices(len(dataset), rank, world, seed=cfg["seed"], epoch=epoch, pad=True)
        indices = indices[offset * bs: steps_per_epoch * bs]  # resume mid-epoch where the checkpoint was
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=bs, shuffle=False, drop_last=True,
            collate_fn=collate_fn, num_workers=cfg["loader_workers"],
            persistent_workers=False)
        for images, targets in loader:
            step += 1
            yield step, epoch, images, targets
        epoch, offset = epoch + 1, 0


def train_loop(cfg):
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from jobs.coco_data import CocoDetection, RandomHorizontalFlip

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"
    out = cfg["output"]

    # state to resume from: class order comes from the checkpoint so labels keep their meaning
    ckpt = ray.train.get_checkpoint()
    resume_dir, start_step, class_names = None, 0, None
    resume_files = contextlib.ExitStack()
    if ckpt is not None:
        # the checkpoint itself when local, else a download that is deleted once read (below)
        resume_dir = resume_files.enter_context(ckpt.as_directory())
        meta = read_checkpoint_meta(resume_dir)
        start_step, class_names = int(meta["step"]), meta["class_names"]

    dataset = CocoDetection(cfg["data"], class_names=class_names[1:] if class_names else None)
    if cfg["hflip"]:
        dataset.transforms = RandomHorizontalFlip(cfg["hflip"], keypoint_flip=dataset.keypoint_flip)
    class_names = dataset.class_names
    keypoints = get_architecture(ARCHS[cfg["arch"]]).outputs == "keypoints"

    torch.manual_seed(cfg["seed"])  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, dataset.num_classes, dataset.num_keypoints or None)
    if keypoints:  # what the checkpoints record and the held-out evaluation matches by name
        model.keypoint_names, model.keypoint_skeleton = dataset.keypoint_names, dataset.keypoint_skeleton
    torch.manual_seed(cfg["seed"] * 1000 + rank + start_step)  # flips differ per rank and per attempt
    model.to(device, memory_format=model_layout(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg["warmup_iters"], cfg["warmup_factor"], cfg["lr_steps"], cfg["lr_gamma"]))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if resume_dir is not None:
        from mrcnn.checkpoint import load_weights_into

        with resume_files:
            load_weights_into(model, os.path.join(resume_dir, "model.pt"))
            state = torch.load(os.path.join(resume_dir, "train_state.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])

    val_uri = join(cfg["data"], "val", "annotations.json")
    has_val = rank == 0 and _exists(val_uri)  # evaluation runs on rank 0 only
    raw_model = model
    if start_step >= cfg["max_iters"]:
        # a finished run submitted again: nothing to train, only make sure the final files exist
        if rank == 0:
            _write_final(raw_model, out, class_names, start_step, cfg)
        return

    model = ray.train.torch.prepare_model(model)
    log = MetricsLog(join(out, "metrics.jsonl"), start_step) if rank == 0 else None
    if rank == 0:
        print(f"[train] {len(dataset)} images, {dataset.num_classes - 1} classes {class_names[1:]}, "
              f"{world} worker(s), steps {start_step + 1}..{cfg['max_iters']}", flush=True)

    model.train()
    sums, count, t0 = None, 0, time.perf_counter()
    for step, epoch, images, targets in _batches(dataset, rank, world, cfg, start_step):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=use_amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (rank {rank}): {dict((k, v.item()) for k, v in loss_dict.items())}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["clip_grad_norm"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if cfg.get("fail_once_at") == step and rank == min(1, world - 1):
            _fail_once(out, rank, step)

        vals = torch.stack([loss.detach().float()] + [v.detach().float() for v in loss_dict.values()])
        sums = vals if sums is None else sums + vals
        count += 1
        last = step >= cfg["max_iters"]
        do_ckpt = last or step % cfg["checkpoint_every"] == 0
        do_eval = has_val and (last or (cfg["eval_every"] and step % cfg["eval_every"] == 0))
        if last or do_ckpt or step % cfg["log_every"] == 0:
            if world > 1:  # every rank reaches here at the same steps
                torch.distributed.all_reduce(sums)
                sums /= world
            elapsed = time.perf_counter() - t0
            record = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      "loss": round(sums[0].item() / count, 5),
                      **{k: round(v / count, 5) for k, v in zip(loss_dict, sums[1:].tolist())},
                      "images_per_s": round(count * world * cfg["batch_size"] / elapsed, 3),
                      "start_step": start_step, "time": round(time.time(), 3)}
            if do_eval:
                result = evaluate_model(raw_model, val_uri, class_names, device=device,
                                        max_images=cfg["eval_max_images"])
                record.update(flat_eval_metrics(result))
            if rank == 0:
                log.log(record)
                print("[train] " + json.dumps(record), flush=True)
            sums, count, t0 = None, 0, time.perf_counter()
        if do_ckpt:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_train_checkpoint(d, raw_model, optimizer, scheduler, scaler, step, cfg, class_names)
                    checkpoint = Checkpoint.from_directory(d)
                ray.train.report({"step": step}, checkpoint=checkpoint)
        if last:
            break
    if rank == 0:
        _write_final(raw_model, out, class_names, cfg["max_iters"], cfg)


def _fail_once(out, rank, step):
    """Test hook: this worker process dies once (a marker file in OUTPUT makes it one-shot).

    It waits first: Ray Train registers a checkpoint only after its controller (polling every
    2 s) has taken every worker's report, so a worker that dies right after reporting loses it.
    """
    fs, marker = resolve(join(out, "_fail_once_marker"))
    if fs.exists(marker):
        return
    fs.pipe_file(marker, b"failed once\n")
    time.sleep(6)
    print(f"[train] rank {rank}: simulated worker loss after step {step}", flush=True)
    os._exit(1)


def _write_final(model, out, class_names, step, cfg):
    final = join(out, "model_final.pt")
    _save_model(model, final, class_names, {"step": step, "train_config": cfg})
    write_bytes(join(out, "final.json"), json.dumps({"step": step, "model": final}).encode())
    print(f"[train] final model: {final}", flush=True)


# -------------------------------------------------------------------------------- driver
def run(args) -> dict:
    """Train (or resume, or notice the run is done); returns {"step", "model", "skipped"}."""
    done = read_json(join(args.output, "final.json"))
    if done is not None and done["step"] >= args.max_iters:
        check_same_model(args)
        print(f"[train] already finished at step {done['step']}: final model {done['model']}", flush=True)
        return {**done, "skipped": True}

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.coco_data import CocoDetection

    # fail here, with the dataset's own error, rather than inside every worker
    dataset = CocoDetection(args.data)
    if get_architecture(ARCHS[args.arch]).outputs == "keypoints" and not dataset.keypoint_names:
        raise ValueError(f"--arch {args.arch} learns keypoints, but no category of {args.data} names any "
                         "(COCO's 'keypoints' list, as person_keypoints files and jobs.synthetic --kind figures have)")
    check_same_model(args)
    started = not ray.is_initialized()
    if started:
        ray.init()  # joins RAY_ADDRESS (ray job submit) or starts a local instance
    try:
        storage_path, storage_fs = storage_for(args.output)
        cfg = {k: v for k, v in vars(args).items()}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                         resources_per_worker={"CPU": args.cpus_per_worker,
                                                               **({"GPU": 1} if args.use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
            run_config=RunConfig(
                name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=args.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=args.num_to_keep),
            ),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    done = read_json(join(args.output, "final.json"))
    if done is None:
        raise RuntimeError(f"training ended without writing {join(args.output, 'final.json')}")
    return {**done, "skipped": False}


class OtherRunError(ValueError):
    """``--output`` holds a run of another model."""


def check_same_model(args) -> None:
    """Record the model flags of a new run in OUTPUT/run.json; refuse to resume one made with others."""
    uri = join(args.output, "run.json")
    wanted = {k: getattr(args, k) for k in MODEL_FLAGS}
    held = read_json(uri)
    if held is None:
        write_bytes(uri, (json.dumps(wanted, indent=1) + "\n").encode())
        return
    changed = [k for k in MODEL_FLAGS if held.get(k) != wanted[k]]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {held.get(k)} (now {wanted[k]})" for k in changed)
        raise OtherRunError(f"{args.output} holds a run of another model: {was}. Resume it with the same flags, "
                            "or give a new --output")


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except OtherRunError as e:
        raise SystemExit(f"jobs.train: error: {e}") from None
    print(f"[train] done: step {result['step']}, final model {result['model']}", flush=True)


if __name__ == "__main__":
    main()
