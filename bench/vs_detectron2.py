"""Our Predictor against Detectron2's DefaultPredictor: the same Detectron2 checkpoint, the same
images, the same run, on CPU.

Needs Detectron2 importable (its repository on PYTHONPATH, as tests/data/detectron2/README.md
describes); nothing of it is in this repository. Both load the seeded ResNet-50-FPN weights of
tests/_detectron2_fixture.py (a zoo .pkl) with the COCO R50-FPN config at Detectron2's test size
(800/1333) and a score threshold of 0.05, and run the photo and two images made from it, one at a
time. Before timing, the detections are compared (labels, boxes, scores, masks); then each
predictor runs the images ``--rounds`` times, alternating, and the median per image is printed
with the ratio to Detectron2. Ours is timed as the job runs it (channels-last, the default) and
NCHW (bit-identical to Detectron2 but for the softmax's last bit).

    PYTHONPATH=/path/to/detectron2 python bench/vs_detectron2.py [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = __file__.rsplit("/bench/", 1)[0]
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _detectron2_fixture as fx  # noqa: E402
from mrcnn import Predictor  # noqa: E402
from mrcnn.detectron2 import coco_label_ids  # noqa: E402


def detectron2_predictor(weights: str, config_path: str):
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    cfg.merge_from_file(config_path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = weights
    return DefaultPredictor(cfg)


def compare(d2_out, ours) -> tuple[int, float, float, float]:
    """(detections, max box difference px, max score difference, min mask IoU) of one image."""
    from pycocotools import mask as mask_util

    inst = d2_out["instances"]
    ids = coco_label_ids()
    labels = [ids[c] for c in inst.pred_classes.tolist()]
    if labels != [int(v) for v in ours["labels"]]:
        raise SystemExit(f"labels differ: {labels[:8]} vs {list(ours['labels'][:8])}")
    boxes = np.abs(inst.pred_boxes.tensor.numpy() - ours["boxes"]).max(initial=0.0)
    scores = np.abs(inst.scores.numpy() - ours["scores"]).max(initial=0.0)
    masks = inst.pred_masks.numpy()
    ref = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    ious = [1.0 if a["counts"].decode() == b["counts"] else
            mask_util.iou([a], [{"size": b["size"], "counts": b["counts"].encode()}], [0])[0][0]
            for a, b in zip(ref, ours["masks"])]
    return len(labels), float(boxes), float(scores), float(min(ious, default=1.0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        weights = fx.write_checkpoint(fx.detectron2_state_dict("R50-FPN"), d, "pkl")
        config = os.path.join(d, "coco_r50_fpn.yaml")
        with open(config, "w") as f:  # Detectron2's COCO test size, the fixtures' other keys
            f.write(f"_BASE_: {os.path.join(fx.HERE, 'Base-RCNN-FPN.yaml')}\nMODEL:\n  MASK_ON: True\n")
        d2 = detectron2_predictor(weights, config)
        runs = {"detectron2": lambda rgb: d2(np.ascontiguousarray(rgb[:, :, ::-1]))}
        for name, cl in (("ours channels-last", True), ("ours NCHW", False)):
            pred = Predictor.from_checkpoint(weights, "cpu", config=config, channels_last=cl)
            runs[name] = lambda rgb, pred=pred: pred([rgb])[0]
        images = fx.images()
        print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
              f"R50-FPN at 800/1333, images {[im.shape[:2] for im in images.values()]}")
        for name in ("ours channels-last", "ours NCHW"):
            for rgb in images.values():
                n, box, score, iou = compare(runs["detectron2"](rgb), runs[name](rgb))
                print(f"{name:20s} {n:3d} detections: max box diff {box:.2e} px, score {score:.2e}, min mask IoU {iou:.4f}")
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                for rgb in images.values():
                    t = time.perf_counter()
                    run(rgb)
                    times[name].append(time.perf_counter() - t)
        base = statistics.median(times["detectron2"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:20s} {med * 1000:8.1f} ms/image  {1 / med:6.2f} images/s  x{base / med:.2f} vs Detectron2")


if __name__ == "__main__":
    main()
