"""Train Mask R-CNN on synthetic shapes on this machine's CPUs and report held-out mask AP
(or Keypoint R-CNN on synthetic stick figures, and keypoint AP).

    python bench/train_synthetic.py --workdir /tmp/bench_train  # the goal configuration: ~81 min on 2 cores
    python bench/train_synthetic.py --workdir /tmp/bench_train_smoke --images 24 --max-iters 20  # smoke run
    python bench/train_synthetic.py --kind figures --workdir /tmp/bench_kp --max-iters 4000  # keypoints

Generates a synthetic COCO shapes dataset (``jobs.synthetic``; a held-out ``val`` split), trains
``maskrcnn_resnet18_fpn_small`` (``--arch``) with ``jobs.train`` (Ray Train, one CPU worker by
default, from scratch: no weights can be downloaded here; held-out AP at every checkpoint in
``run/metrics.jsonl``), then evaluates ``model_final.pt`` on the val split with the same in-process
COCO evaluation the trainer uses. Prints one JSON line: mask/box AP and AP@0.5, wall times, the
configuration. The goal for the full configuration is mask AP@0.5 >= 0.95. With ``--kind figures``
the data are ``jobs.synthetic --kind figures`` (7 keypoints a figure), the default architecture
``keypointrcnn_resnet18_fpn_small``, and the report gives keypoint AP (COCO OKS) and box AP.

Re-running with the same ``--workdir`` reuses the dataset and resumes (or skips) training.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="dataset and run folder (local)")
    p.add_argument("--images", type=int, default=2000, help="synthetic images (train + val)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--size", default="128/160", help="image width/height range, jobs.synthetic syntax")
    p.add_argument("--max-iters", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup-iters", type=int, default=None, help="jobs.train --warmup-iters")
    p.add_argument("--lr-steps", type=int, nargs="*", default=None, help="jobs.train --lr-steps")
    p.add_argument("--min-size", type=int, nargs="+", default=[128, 144, 160])
    p.add_argument("--max-size", type=int, default=240)
    p.add_argument("--kind", choices=("shapes", "figures"), default="shapes",
                   help="synthetic data: shapes (masks) or figures (keypoints)")
    p.add_argument("--arch", default=None,
                   help="jobs.train --arch (default resnet18_fpn_small; keypointrcnn_resnet18_fpn_small for figures)")
    # the shapes are 10-60 px: anchors from 16 px, and fewer sampled RoIs (few objects per image)
    p.add_argument("--anchor-sizes", type=int, nargs="+", default=None,
                   help="one per FPN level (default 16 32 64 128 256, cut to the levels --returned-layers gives)")
    p.add_argument("--returned-layers", type=int, nargs="+", default=None, help="jobs.train --returned-layers")
    p.add_argument("--roi-pooler", default=None, help="jobs.train --roi-pooler (the ablation's switches)")
    p.add_argument("--mask-loss", default=None, help="jobs.train --mask-loss")
    p.add_argument("--mask-head", default=None, help="jobs.train --mask-head")
    p.add_argument("--data", default=None, help="the dataset folder (default WORKDIR/data): several runs may share one")
    p.add_argument("--ship", default=None,
                   help="also write the final model here as fp16 in our checkpoint format, with the recipe and "
                        "held-out AP in its metadata (how models/ is made)")
    p.add_argument("--box-batch-size-per-image", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--clip-grad-norm", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.arch is None:
        args.arch = "keypointrcnn_resnet18_fpn_small" if args.kind == "figures" else "resnet18_fpn_small"
    if args.anchor_sizes is None:
        from mrcnn.backbone import num_fpn_levels

        args.anchor_sizes = [16, 32, 64, 128, 256][: num_fpn_levels(args.returned_layers)]

    import torch

    from jobs.train.__main__ import parse_args, run
    from jobs.train.loop import evaluate_model
    from jobs.synthetic import generate
    from mrcnn.checkpoint import load_model

    data, out = args.data or os.path.join(args.workdir, "data"), os.path.join(args.workdir, "run")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(data, "val", "annotations.json")):
        generate(data, args.images, seed=args.seed, size=args.size, val_fraction=args.val_fraction, kind=args.kind)
    t_data = time.perf_counter() - t0

    train_argv = [
        "--data", data, "--output", out, "--num-workers", str(args.num_workers),
        "--cpus-per-worker", str(args.cpus_per_worker), "--max-iters", str(args.max_iters),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--arch", args.arch,
        "--min-size", *map(str, args.min_size), "--max-size", str(args.max_size),
        # held-out AP at every checkpoint, in metrics.jsonl: the learning curve
        "--checkpoint-every", str(args.checkpoint_every), "--eval-every", str(args.checkpoint_every), "--log-every", "20",
        "--loader-workers", "1", "--seed", str(args.seed), "--clip-grad-norm", str(args.clip_grad_norm),
        "--anchor-sizes", *map(str, args.anchor_sizes), "--box-batch-size-per-image", str(args.box_batch_size_per_image),
    ]
    if args.returned_layers:
        train_argv += ["--returned-layers", *map(str, args.returned_layers)]
    for flag in ("roi_pooler", "mask_loss", "mask_head"):
        if getattr(args, flag):
            train_argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if args.warmup_iters is not None:
        train_argv += ["--warmup-iters", str(args.warmup_iters)]
    if args.lr_steps is not None:
        train_argv += ["--lr-steps", *map(str, args.lr_steps)]
    import ray

    # logical CPUs for the workers plus one for the Train controller; torch threads follow cpus_per_worker
    ray.init(num_cpus=int(args.num_workers * args.cpus_per_worker) + 1, include_dashboard=False)
    t1 = time.perf_counter()
    try:
        result = run(parse_args(train_argv))
    finally:
        ray.shutdown()
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(result["model"])
    metrics = evaluate_model(model, os.path.join(data, "val", "annotations.json"), model.class_names)
    t_eval = time.perf_counter() - t2
    report = {
        **{f"{prefix}_{k}": round(metrics[kind][k], 4) for kind, prefix in (("segm", "mask"), ("keypoints", "keypoint"))
           if kind in metrics for k in ("AP50", "AP", "AP75")},
        "box_AP50": round(metrics["bbox"]["AP50"], 4), "box_AP": round(metrics["bbox"]["AP"], 4),
        "box_AP75": round(metrics["bbox"]["AP75"], 4),
        "val_images": metrics["counts"]["gt_images"], "detections": metrics["counts"]["detections"],
        "train_images": args.images - metrics["counts"]["gt_images"],
        "wall_s": {"data": round(t_data, 1), "train": round(t_train, 1), "eval": round(t_eval, 1),
                   "total": round(time.perf_counter() - t0, 1)},
        "train_skipped": result["skipped"], "config": vars(args),
    }
    if args.ship:
        ship(model, args.ship, report, train_argv, argv if argv is not None else sys.argv[1:])
    print(json.dumps(report))
    return report


def ship(model, path, report, train_argv, argv):
    """The model in fp16 (half the bytes; loads into fp32 parameters) with how it was made."""
    from mrcnn.checkpoint import save_checkpoint

    model = model.half()
    recipe = {
        "command": "python bench/train_synthetic.py " + " ".join(argv),
        "train_command": "python -m jobs.train " + " ".join(train_argv),
        "data": {"generator": "jobs.synthetic.generate", "kind": report["config"]["kind"], "seed": report["config"]["seed"],
                 "images": report["config"]["images"], "val_fraction": report["config"]["val_fraction"],
                 "size": report["config"]["size"]},
        "iterations": report["config"]["max_iters"],
        "held_out": {k: v for k, v in report.items() if k.endswith(("_AP50", "_AP", "_AP75")) or k in ("val_images", "detections")},
        "weights_dtype": "float16",
    }
    save_checkpoint(model, path, class_names=model.class_names, keypoint_names=getattr(model, "keypoint_names", None),
                    keypoint_skeleton=getattr(model, "keypoint_skeleton", None), extra_meta={"recipe": recipe})
    print(f"shipped {path} ({os.path.getsize(path) / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
