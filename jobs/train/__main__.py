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
- ``run.json``: the flags that decide the model (``checkpoint.MODEL_FLAGS``); re-submitting with
  other values fails with a message naming them instead of resuming checkpoints of another model.
- ``model_final.pt``: the final model (mrcnn.checkpoint format, ``class_names`` included), what the
  batch job's ``--weights`` takes; then ``final.json`` ({"step", "model"}) marks the run finished.
  A re-submitted finished run (same ``--max-iters``) sees it and exits without starting Ray.
"""

import argparse
import dataclasses
import os
from urllib.parse import urlparse

from pyarrow import fs as pafs

from jobs.storage import join, storage_options
from jobs.train.checkpoint import OtherRunError, check_same_model, read_json
from jobs.train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    return TrainConfig.add_arguments(argparse.ArgumentParser(prog="python -m jobs.train",
                                                             description=__doc__.split("\n")[0]))


def parse_args(argv=None) -> TrainConfig:
    p = build_parser()
    return TrainConfig.from_arguments(p, p.parse_args(argv))


def storage_for(output: str):
    """(storage_path, pyarrow filesystem or None) for RunConfig; S3 honours AWS_ENDPOINT_URL."""
    if output.startswith("s3://"):
        kwargs = {}
        if endpoint := storage_options(output).get("endpoint_url"):  # the same variables the batch job reads
            u = urlparse(endpoint)
            kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
        if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            kwargs["region"] = region
        return output[len("s3://"):], pafs.S3FileSystem(**kwargs)
    if "://" in output and not output.startswith("file://"):
        return output, None  # let Ray resolve other schemes (gs://, ...)
    return os.path.abspath(output.removeprefix("file://")), None


def run(cfg: TrainConfig) -> dict:
    """Train (or resume, or notice the run is done); returns {"step", "model", "skipped"}."""
    done = read_json(join(cfg.output, "final.json"))
    if done is not None and done["step"] >= cfg.max_iters:
        check_same_model(cfg)
        print(f"[train] already finished at step {done['step']}: final model {done['model']}", flush=True)
        return {**done, "skipped": True}

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.coco_data import CocoDetection
    from jobs.train.loop import train_loop

    # fail here, with the dataset's own error, rather than inside every worker
    dataset = CocoDetection(cfg.data)
    if cfg.keypoints and not dataset.keypoint_names:
        raise ValueError(f"--arch {cfg.arch} learns keypoints, but no category of {cfg.data} names any "
                         "(COCO's 'keypoints' list, as person_keypoints files and jobs.synthetic --kind figures have)")
    check_same_model(cfg)
    started = not ray.is_initialized()
    if started:
        ray.init()  # joins RAY_ADDRESS (ray job submit) or starts a local instance
    try:
        storage_path, storage_fs = storage_for(cfg.output)
        TorchTrainer(
            train_loop,
            train_loop_config=dataclasses.asdict(cfg),  # Ray Train hands the workers a dict
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={
                "CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            # derived from --output only: the same command resumes from the latest checkpoint
            run_config=RunConfig(name="train", storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        ).fit()
    finally:
        if started:
            ray.shutdown()
    done = read_json(join(cfg.output, "final.json"))
    if done is None:
        raise RuntimeError(f"training ended without writing {join(cfg.output, 'final.json')}")
    return {**done, "skipped": False}


def main(argv=None):
    try:
        result = run(parse_args(argv))
    except OtherRunError as e:
        raise SystemExit(f"jobs.train: error: {e}") from None
    print(f"[train] done: step {result['step']}, final model {result['model']}", flush=True)


if __name__ == "__main__":
    main()
