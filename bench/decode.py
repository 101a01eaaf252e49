"""Decode sized to the model against the full decode: time per photo, and what the model finds.

    python bench/decode.py                 # 12 MP JPEGs, one thread
    python bench/decode.py --images 8 --repeat 5

Time: a 4032 x 3024 JPEG (a synthetic scene with sensor-like noise, quality 92) decoded by
``jobs.infer.execute.decode.decode_image`` (full) and by ``decode_for_model`` for a COCO model's input
(800, 1333) and for the shipped model's (160, 240); median of ``--repeat``. The goal: the sized
decode in <= 0.5x the full decode's time.

Detections: the shipped model (``models/shapes_r18_fpn3.pt``) over ``--images`` such photos,
through the batch job's decode stage and actor (``decode_batch`` + ``PredictorActor``) once with
the sized decode and once with ``model_input=None`` (full). Each full-decode detection above
score 0.5 is matched to the sized decode's detection of highest box IoU; prints the median box
IoU and mask IoU (masks at full resolution) and how many detections each side found.
Prints a table and one JSON line.
"""

import argparse
import io
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from jobs.infer.execute import stages  # noqa: E402
from jobs.infer.execute.decode import decode_for_model, decode_image  # noqa: E402
from jobs.synthetic import render_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")
H, W = 3024, 4032
COCO_INPUT, SHIPPED_INPUT = (800, 1333), (160, 240)


def photo(seed):
    rng = np.random.default_rng([seed, 1])
    image, _ = render_image(rng, H, W, min_objects=3, max_objects=6)
    noisy = image.astype(np.int16) + rng.normal(0, 4, image.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rows(photos, model_input, actor):
    n = len(photos)
    uris = [f"mem://{i}.jpg" for i in range(n)]
    store = dict(zip(uris, photos))
    original = stages.read_object
    stages.read_object = lambda uri, retry=None: store[uri]
    try:
        decoded = stages.decode_batch(stages.plan_batch(uris), model_input=model_input)
    finally:
        stages.read_object = original
    return actor(decoded).to_pylist()


def box_iou(a, b):
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], axis=1), np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def compare(full_rows, sized_rows, score=0.5):
    box_ious, mask_ious, n_full, n_sized = [], [], 0, 0
    for f, s in zip(full_rows, sized_rows):
        fi = [i for i in f["instances"] if i["score"] > score]
        si = [i for i in s["instances"] if i["score"] > score]
        n_full, n_sized = n_full + len(fi), n_sized + len(si)
        if not fi or not si:
            box_ious += [0.0] * len(fi)
            continue
        iou = box_iou(np.array([i["bbox"] for i in fi]), np.array([i["bbox"] for i in si]))
        size = [f["height"], f["width"]]
        for k, j in enumerate(iou.argmax(1)):
            box_ious.append(float(iou[k, j]))
            a = {"size": size, "counts": fi[k]["mask_rle"].encode()}
            b = {"size": size, "counts": si[j]["mask_rle"].encode()}
            mask_ious.append(float(mask_util.iou([b], [a], [0])[0, 0]))
    return box_ious, mask_ious, n_full, n_sized


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = [photo(seed) for seed in range(args.images)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {W}x{H} JPEG {len(photos[0]) / 1e6:.1f} MB, "
          f"median of {args.repeat}")
    t_full, full = timed(lambda: decode_image(photos[0]), args.repeat)
    result = {"image": f"{W}x{H}", "full_ms": round(t_full * 1e3, 1), "sized": []}
    print(f"{'decode':>22} {'pixels':>11} {'ms':>7} {'vs full':>8}")
    print(f"{'full':>22} {full.shape[1]:>5}x{full.shape[0]:<5} {t_full * 1e3:>7.1f} {1.0:>7.2f}x")
    for name, model_input in (("COCO input (800, 1333)", COCO_INPUT), ("shipped (160, 240)", SHIPPED_INPUT)):
        t, (arr, size) = timed(lambda: decode_for_model(photos[0], model_input), args.repeat)
        assert size == (W, H)
        print(f"{name:>22} {arr.shape[1]:>5}x{arr.shape[0]:<5} {t * 1e3:>7.1f} {t / t_full:>7.2f}x")
        result["sized"].append({"model_input": list(model_input), "decoded": [arr.shape[1], arr.shape[0]],
                                "ms": round(t * 1e3, 1), "ratio": round(t / t_full, 3)})

    actor = stages.PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r",
                                       micro_batch=2)
    full_rows = rows(photos, None, actor)
    sized_rows = rows(photos, SHIPPED_INPUT, actor)
    box_ious, mask_ious, n_full, n_sized = compare(full_rows, sized_rows)
    med_box = statistics.median(box_ious) if box_ious else float("nan")
    med_mask = statistics.median(mask_ious) if mask_ious else float("nan")
    print(f"shipped model, {args.images} photos: {n_full} detections (full decode), {n_sized} (sized); "
          f"median box IoU {med_box:.3f}, mask IoU {med_mask:.3f} over {len(box_ious)} matched")
    result.update(images=args.images, detections_full=n_full, detections_sized=n_sized, matched=len(box_ious),
                  median_box_iou=round(med_box, 4), median_mask_iou=round(med_mask, 4))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
