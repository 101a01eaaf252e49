"""What each Ray Train worker runs (:func:`train_loop`): the config's model, the lr schedule, this
rank's batches, resuming, DDP steps, metrics and held-out evaluation on rank 0, checkpoints."""

import contextlib
import json
import math
import os
import tempfile
import time

import torch

from jobs.coco_data import CocoDetection, RandomHorizontalFlip, collate_fn, shard_indices
from jobs.storage import join, resolve, storage_options
from jobs.train.checkpoint import (MetricsLog, load_train_state, read_checkpoint_meta, save_train_checkpoint,
                                   write_final)
from jobs.train.config import ARCHS, TrainConfig
from mrcnn.checkpoint import read_metadata
from mrcnn.models import get_model


def lr_factor(step, warmup_iters, warmup_factor, milestones, gamma):
    """Linear warm-up times step decay: the factor of the base lr at iteration ``step``."""
    alpha = step / warmup_iters if step < warmup_iters else 1.0
    return (warmup_factor * (1 - alpha) + alpha) * gamma ** sum(step >= m for m in milestones)


def build_model(cfg: TrainConfig, num_classes, num_keypoints=None):
    """The model of ``cfg`` with ``num_classes`` outputs (and ``num_keypoints``, a keypoint
    architecture's), initialised as the recipe says."""
    arch = ARCHS[cfg.arch]
    kwargs = dict(min_size=tuple(cfg.min_size), max_size=cfg.max_size,
                  trainable_backbone_layers=cfg.trainable_backbone_layers)
    # given only when set: the model's defaults stay the one place for them
    renamed = {"anchor_sizes": "rpn_anchor_sizes", "mask_head": "mask_head_type"}
    for name in ("box_batch_size_per_image", "anchor_sizes", "returned_layers", "roi_pooler", "mask_loss", "mask_head"):
        if getattr(cfg, name):
            kwargs[renamed.get(name, name)] = getattr(cfg, name)
    if not cfg.weights:
        if cfg.keypoints:
            kwargs["num_keypoints"] = num_keypoints
        return get_model(arch, num_classes=num_classes, weights_backbone=cfg.weights_backbone, **kwargs)
    meta = read_metadata(cfg.weights)
    file_classes = int(meta["num_classes"])
    if cfg.keypoints:
        kwargs["num_keypoints"] = len(meta.get("keypoint_names") or []) or meta["builder_kwargs"]["num_keypoints"]
    model = get_model(arch, weights=cfg.weights, num_classes=file_classes, **kwargs)
    if cfg.keypoints:
        model.reset_predictors(num_classes, num_keypoints)  # fine-tuning on other classes or keypoints
    elif file_classes != num_classes:
        model.reset_predictors(num_classes)
    return model


def model_layout(device: torch.device) -> torch.memory_format:
    """The model's memory format for training: channels-last on CUDA, where tensor-core
    convolutions want it and RoIAlign then reads the FPN maps as they are instead of transposing
    the whole pyramid at every call (mrcnn/ops/csrc/roi_align_cuda.cu); NCHW on CPU, as before."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def evaluate_model(model, gt_uri, class_names, *, device="cpu", max_images=None):
    """COCO metrics of ``model`` (any mode; restored after) on a COCO annotation file, through
    ``jobs.evaluate.evaluate_predictor``: the Predictor, the batch job's decoder and rows,
    categories matched by name (``class_names[label]``)."""
    from jobs.evaluate import evaluate_predictor
    from mrcnn.predictor import Predictor

    was_training = model.training
    try:  # NCHW kept: the Predictor would otherwise convert the model being trained in place
        predictor = Predictor(model, device=device, class_names=class_names, channels_last=False)
        return evaluate_predictor(predictor, gt_uri, max_images=max_images, storage_options=storage_options(gt_uri))
    finally:
        model.train(was_training)


def flat_eval_metrics(result):
    return {f"{t}_{k}": round(v, 5) for t in ("bbox", "segm", "keypoints") if t in result for k, v in result[t].items()}


def _batches(dataset, rank, world, cfg: TrainConfig, start_step):
    """(step, images, targets) from start_step + 1 on, epoch after epoch, this rank's shard only."""
    bs = cfg.batch_size
    per_rank = len(shard_indices(len(dataset), rank, world, pad=True))
    steps_per_epoch = per_rank // bs
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images over {world} workers give {per_rank} per worker, "
                         f"fewer than --batch-size {bs}")
    step = start_step
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        indices = shard_indices(len(dataset), rank, world, seed=cfg.seed, epoch=epoch, pad=True)
        indices = indices[offset * bs: steps_per_epoch * bs]  # resume mid-epoch where the checkpoint was
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=bs, shuffle=False, drop_last=True,
            collate_fn=collate_fn, num_workers=cfg.loader_workers, persistent_workers=False)
        for images, targets in loader:
            step += 1
            yield step, epoch, images, targets
        epoch, offset = epoch + 1, 0


def train_loop(config: dict):
    """One worker's training; ``config``: a :class:`TrainConfig` as a dict (``train_loop_config``)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig(**config)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"

    # state to resume from: class order comes from the checkpoint so labels keep their meaning; its
    # folder is the checkpoint itself when local, else a download that is deleted once read (below)
    ckpt, resume_files = ray.train.get_checkpoint(), contextlib.ExitStack()
    resume_dir = resume_files.enter_context(ckpt.as_directory()) if ckpt is not None else None
    meta = read_checkpoint_meta(resume_dir) if resume_dir is not None else {"step": 0, "class_names": None}
    start_step, class_names = int(meta["step"]), meta["class_names"]

    dataset = CocoDetection(cfg.data, class_names=class_names[1:] if class_names else None)
    if cfg.hflip:
        dataset.transforms = RandomHorizontalFlip(cfg.hflip, keypoint_flip=dataset.keypoint_flip)
    class_names = dataset.class_names

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, dataset.num_classes, dataset.num_keypoints or None)
    if cfg.keypoints:  # what the checkpoints record and the held-out evaluation matches by name
        model.keypoint_names, model.keypoint_skeleton = dataset.keypoint_names, dataset.keypoint_skeleton
    torch.manual_seed(cfg.seed * 1000 + rank + start_step)  # flips differ per rank and per attempt
    model.to(device, memory_format=model_layout(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg.warmup_iters, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if resume_dir is not None:
        with resume_files:
            load_train_state(resume_dir, model, optimizer, scheduler, scaler, device)

    val_uri = join(cfg.data, "val", "annotations.json")
    fs, val_path = resolve(val_uri)
    has_val = rank == 0 and fs.exists(val_path)  # evaluation runs on rank 0 only
    if start_step >= cfg.max_iters:
        # a finished run submitted again: nothing to train, only make sure the final files exist
        if rank == 0:
            write_final(model, class_names, start_step, cfg)
        return

    ddp_model = ray.train.torch.prepare_model(model)
    log = MetricsLog(join(cfg.output, "metrics.jsonl"), start_step) if rank == 0 else None
    if rank == 0:
        print(f"[train] {len(dataset)} images, {dataset.num_classes - 1} classes {class_names[1:]}, "
              f"{world} worker(s), steps {start_step + 1}..{cfg.max_iters}", flush=True)

    ddp_model.train()
    sums, count, t0 = None, 0, time.perf_counter()
    for step, epoch, images, targets in _batches(dataset, rank, world, cfg, start_step):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=use_amp):
            loss_dict = ddp_model(images, targets)
            loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (rank {rank}): {dict((k, v.item()) for k, v in loss_dict.items())}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if cfg.fail_once_at == step and rank == min(1, world - 1):
            _fail_once(cfg.output, rank, step)

        vals = torch.stack([loss.detach().float()] + [v.detach().float() for v in loss_dict.values()])
        sums = vals if sums is None else sums + vals
        count += 1
        last = step >= cfg.max_iters
        do_ckpt = last or step % cfg.checkpoint_every == 0
        do_eval = has_val and (last or (cfg.eval_every and step % cfg.eval_every == 0))
        if last or do_ckpt or step % cfg.log_every == 0:
            if world > 1:  # every rank reaches here at the same steps
                torch.distributed.all_reduce(sums)
                sums /= world
            elapsed = time.perf_counter() - t0
            record = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      "loss": round(sums[0].item() / count, 5),
                      **{k: round(v / count, 5) for k, v in zip(loss_dict, sums[1:].tolist())},
                      "images_per_s": round(count * world * cfg.batch_size / elapsed, 3),
                      "start_step": start_step, "time": round(time.time(), 3)}
            if do_eval:
                record.update(flat_eval_metrics(evaluate_model(model, val_uri, class_names, device=device,
                                                               max_images=cfg.eval_max_images)))
            if rank == 0:
                log.log(record)
                print("[train] " + json.dumps(record), flush=True)
            sums, count, t0 = None, 0, time.perf_counter()
        if do_ckpt:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_train_checkpoint(d, model, optimizer, scheduler, scaler, step, cfg, class_names)
                    checkpoint = Checkpoint.from_directory(d)
                ray.train.report({"step": step}, checkpoint=checkpoint)
        if last:
            break
    if rank == 0:
        write_final(model, class_names, cfg.max_iters, cfg)


def _fail_once(out, rank, step):
    """Test hook: this worker process dies once (a marker file in OUTPUT makes it one-shot). It waits
    first: Ray Train registers a checkpoint only after its controller (polling every 2 s) has taken
    every worker's report, so a worker that dies right after reporting loses it."""
    fs, marker = resolve(join(out, "_fail_once_marker"))
    if fs.exists(marker):
        return
    fs.pipe_file(marker, b"failed once\n")
    time.sleep(6)
    print(f"[train] rank {rank}: simulated worker loss after step {step}", flush=True)
    os._exit(1)
