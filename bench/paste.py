"""Benchmark: mrcnn.paste vs torchvision's paste_masks_in_image (CPU).

For 100 detections on a 1333x800 and a 4000x3000 image, each variant runs in its own
subprocess; we report the best wall time of a few runs and the peak RSS increase
(ru_maxrss after the call minus RSS before it), which is what the paste costs in memory.

    .venv/bin/python bench/paste.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SIZES = [(800, 1333), (3000, 4000)]  # (H, W)
N = 100
VARIANTS = ["torchvision", "torchvision>0.5", "ours", "ours>0.5", "ours_rle"]


def make_inputs(H, W, n=N, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # Detections of mixed sizes: 2 % to 60 % of the image side, like a busy scene.
    ctr = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
    frac = 0.02 + 0.58 * torch.rand(n, 2, generator=g) ** 2
    half = frac * torch.tensor([W, H]) / 2
    boxes = torch.cat([ctr - half, ctr + half], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    return masks, boxes


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(variant, H, W, repeats, threads):
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from mrcnn.paste import paste_masks, paste_masks_to_rle

    torch.set_num_threads(threads)
    masks, boxes = make_inputs(H, W)
    fns = {
        "torchvision": lambda: paste_masks_in_image(masks, boxes, (H, W), padding=1),
        "torchvision>0.5": lambda: paste_masks_in_image(masks, boxes, (H, W), padding=1) > 0.5,
        "ours": lambda: paste_masks(masks, boxes, (H, W)),
        "ours>0.5": lambda: paste_masks(masks, boxes, (H, W), threshold=0.5),
        "ours_rle": lambda: paste_masks_to_rle(masks, boxes, (H, W)),
    }
    fn = fns[variant]
    before = rss_bytes()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"time_s": min(times), "peak_delta_mb": (peak - before) / 2**20}))


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        variant, H, W = args._child
        run_one(variant, int(H), int(W), args.repeats, args.threads)
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, torch threads {args.threads}, N={N} masks of 28x28")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for H, W in SIZES:
        results = {}
        for v in VARIANTS:
            need = 2.2 * N * H * W * 4 if v.startswith("torchvision") else 0
            if need > 0.8 * mem_available():
                print(f"{W}x{H} {v}: skipped, needs about {need / 2**30:.1f} GiB")
                continue
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--_child", v, str(H), str(W)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            results[v] = json.loads(out.strip().splitlines()[-1])
            r = results[v]
            print(f"{W}x{H} {v:16s} {r['time_s'] * 1e3:9.1f} ms  peak +{r['peak_delta_mb']:8.1f} MB")
        for ours, ref in (("ours", "torchvision"), ("ours>0.5", "torchvision>0.5"), ("ours_rle", "torchvision>0.5")):
            if ours in results and ref in results:
                a, b = results[ours], results[ref]
                print(f"{W}x{H} {ours} vs {ref}: {b['time_s'] / a['time_s']:.2f}x faster, "
                      f"{b['peak_delta_mb'] / max(a['peak_delta_mb'], 1):.1f}x less peak memory")


if __name__ == "__main__":
    main()
