"""Host time per image from the model's output to the finished row values: paste + COCO RLE + row.

    python bench/postprocess.py            # one thread, the issue's sizes and detection counts
    python bench/postprocess.py --repeat 5 --threads 2

"Before" is the first ``paste_masks_to_rle`` (kept here as the reference): every mask pasted
into a full-size K x W x H uint8 buffer, then ``pycocotools.mask.encode``, then ``rle_area``.
"Tiles" is the box-tile path (thresholded tiles in torch ops, transitions, strings in numpy): what
GPU tensors take, here run on the CPU. "After" is ``mrcnn.paste.paste_masks_to_rle`` on CPU
tensors: the C++ kernel, which counts runs while it computes each box's pixels and returns the
areas with the strings. All end in ``jobs.infer.schema.ok_row`` as the Predictor and the batch job
do. Inputs: random 28 x 28 mask probabilities, boxes up to a quarter of the image side. Every
case checks that the RLE strings are byte-identical; times are the median of ``--repeat`` runs.
Prints a table and one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jobs.infer import schema  # noqa: E402
from mrcnn import paste as paste_mod  # noqa: E402
from mrcnn.paste import paste_masks_to_rle, rle_area  # noqa: E402

SIZES = [(480, 640), (1080, 1920), (3024, 4032)]
COUNTS = [10, 100]


def dense_paste_to_rle(masks, boxes, image_size, threshold=0.5, chunk_bytes=64 * 2**20):
    """The previous implementation: full-size uint8 masks in chunks, encoded by pycocotools."""
    from pycocotools import mask as mask_util

    masks, boxes, (H, W) = paste_mod._prepare(masks, boxes, image_size)
    N = masks.shape[0]
    geo = paste_mod._Geometry(boxes, masks.shape[-1], (H, W))
    padded = F.pad(masks, (paste_mod._PADDING,) * 4)
    fused = paste_mod._fused_for(masks.device)
    step = max(1, chunk_bytes // (H * W))
    rles = []
    for c0 in range(0, N, step):
        sel = slice(c0, min(c0 + step, N))
        buf = torch.zeros((sel.stop - sel.start, W, H), dtype=torch.uint8, device=masks.device)

        def write(det, yy, xx, val):
            buf[det[:, None, None], xx[:, None, :], yy[:, :, None]] = (val > threshold).to(torch.uint8)

        paste_mod._paste_tiles(padded[sel], geo.subset(sel), (H, W), write, paste_mod.DEFAULT_TILE_BUDGET_BYTES, fused)
        for rle in mask_util.encode(buf.cpu().numpy().transpose(2, 1, 0)):
            rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return rles, rle_area(rles)


def tiles_paste_to_rle(masks, boxes, image_size):
    m, b, size = paste_mod._prepare(masks, boxes, image_size)
    rles = paste_mod._paste_rle_tiles(m, b, size, 0.5, paste_mod.DEFAULT_TILE_BUDGET_BYTES)
    return rles, rle_area(rles)


def kernel_paste_to_rle(masks, boxes, image_size):
    return paste_masks_to_rle(masks, boxes, image_size, return_areas=True)


def case(H, W, n, seed):
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
    size = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * 0.25 + 2
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    return torch.rand(n, 1, 28, 28, generator=g), boxes


def row_values(encode, masks, boxes, H, W):
    rles, areas = encode(masks, boxes, (H, W))
    n = len(rles)
    result = {"boxes": boxes.cpu().numpy(), "labels": np.ones(n, np.int64), "scores": np.full(n, 0.9, np.float32),
              "label_names": ["x"] * n, "areas": areas, "masks": rles}
    schema.ok_row(result, image_uri="s3://b/k.jpg", source_etag=None, source_size=None, width=W, height=H,
                  model_name="m", checkpoint_sha256="0" * 64, run_id="r")
    return rles


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()  # ends with host values (strings): nothing is left running on a GPU
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the model's outputs live (cuda: the GPU actor's case)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), median of {args.repeat}")
    print(f"{'image':>10} {'dets':>5} {'before ms':>10} {'tiles ms':>9} {'after ms':>9} {'speed-up':>9}  identical")
    for H, W in SIZES:
        for n in COUNTS:
            masks, boxes = (t.to(args.device) for t in case(H, W, n, seed=H + n))
            t_old, old = timed(lambda: row_values(dense_paste_to_rle, masks, boxes, H, W), args.repeat)
            t_tiles, tiles = timed(lambda: row_values(tiles_paste_to_rle, masks, boxes, H, W), args.repeat)
            t_new, new = timed(lambda: row_values(kernel_paste_to_rle, masks, boxes, H, W), args.repeat)
            same = len(old) == len(tiles) == len(new) == n and all(
                a["counts"] == b["counts"] == c["counts"] for a, b, c in zip(old, tiles, new))
            rows.append({"image": f"{W}x{H}", "detections": n, "before_ms": round(t_old * 1e3, 2),
                         "tiles_ms": round(t_tiles * 1e3, 2), "after_ms": round(t_new * 1e3, 2),
                         "speedup": round(t_old / t_new, 1), "identical": same})
            print(f"{W}x{H:>5} {n:>5} {t_old * 1e3:>10.1f} {t_tiles * 1e3:>9.1f} {t_new * 1e3:>9.2f} "
                  f"{t_old / t_new:>8.1f}x  {same}")
    print(json.dumps({"device": args.device, "threads": args.threads, "repeat": args.repeat, "rows": rows}))
    if not all(r["identical"] for r in rows):
        sys.exit("RLE differs between the two implementations")


if __name__ == "__main__":
    main()
