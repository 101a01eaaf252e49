"""RoIAlign and RoIPool benchmark: our operators against torchvision's, measured in the same run.

FPN-typical shapes: 2 images (800x1088 padded), 256 channels, levels 200x272, 100x136,
50x68 and 25x34; the box branch pools 1000 RoIs per image at 7x7 (sampling ratio 2),
the mask branch 100 RoIs per image at 14x14. Box sizes are log-uniform from 16 to
600 px so every level receives RoIs. RoIPool (the paper's ablation row) pools the box
branch's RoIs from the stride-16 map (a C4 model's: 50x68 here) at 7x7.

Prints a table of times and ratios (torchvision time / ours: >1 means we are faster).
    python bench/roi_align.py                 # CPU, and CUDA when available
    python bench/roi_align.py --device cuda --markdown out.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import OrderedDict

import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign as TvMultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops import roi_pool as tv_roi_pool

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from mrcnn.ops import MultiScaleRoIAlign, roi_align, roi_pool  # noqa: E402

IMAGE = (800, 1088)
LEVELS = [(200, 272), (100, 136), (50, 68), (25, 34)]
CHANNELS = 256


def make_inputs(device, dtype, rois_per_image, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    feats = OrderedDict()
    for i, (h, w) in enumerate(LEVELS):
        f = torch.randn(2, CHANNELS, h, w, generator=g).to(device=device, dtype=dtype)
        feats[str(i)] = f.contiguous(memory_format=torch.channels_last) if channels_last else f
    boxes = []
    for _ in range(2):
        size = torch.exp(torch.empty(rois_per_image, 2).uniform_(2.77, 6.4, generator=g))  # 16..600 px
        xy = torch.rand(rois_per_image, 2, generator=g) * torch.tensor([IMAGE[1], IMAGE[0]])
        b = torch.cat([xy, xy + size], dim=1)
        b[:, 0::2] = b[:, 0::2].clamp(0, IMAGE[1])
        b[:, 1::2] = b[:, 1::2].clamp(0, IMAGE[0])
        boxes.append(b.to(device=device, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype))
    return feats, boxes


def timeit(fn, device, repeat):
    fn()  # warm-up (also sets up MultiScaleRoIAlign's scales)
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(device, dtype, channels_last, backward):
    """(name, ours, torchvision) closures for one configuration."""
    out = []
    for branch, per_image, size in (("box 7x7", 1000, 7), ("mask 14x14", 100, 14)):
        feats, boxes = make_inputs(device, dtype, per_image, channels_last=channels_last)
        level0 = feats["0"]
        tv_boxes = [b.to(dtype) for b in boxes]  # torchvision needs boxes of the input's dtype
        names = list(feats)
        ours_ms = MultiScaleRoIAlign(names, size, 2)
        tv_ms = TvMultiScaleRoIAlign(names, size, 2)
        shapes = [IMAGE, IMAGE]

        def run(fn, inputs):
            if not backward:
                with torch.no_grad():
                    return fn()
            for t in inputs:
                t.grad = None
            y = fn()
            y.backward(torch.ones_like(y))

        # Closures bind their inputs as defaults: the loop variables change before they run.
        if branch.startswith("box"):
            out.append((f"single-level {branch}",
                        lambda x=level0, b=boxes, s=size: run(lambda: roi_align(x, b, s, 0.25, 2), [x]),
                        lambda x=level0, b=tv_boxes, s=size: run(lambda: tv_roi_align(x, b, s, 0.25, 2), [x])))
            if not channels_last:  # RoIPool reads NCHW (both implementations make it contiguous)
                c4 = feats["2"]
                out.append((f"roi_pool stride 16 {branch}",
                            lambda x=c4, b=tv_boxes, s=size: run(lambda: roi_pool(x, b, s, 1 / 16), [x]),
                            lambda x=c4, b=tv_boxes, s=size: run(lambda: tv_roi_pool(x, b, s, 1 / 16), [x])))
        fl = list(feats.values())
        out.append((f"multi-level {branch}",
                    lambda ours_ms=ours_ms, feats=feats, boxes=boxes, fl=fl: run(lambda: ours_ms(feats, boxes, shapes), fl),
                    lambda tv_ms=tv_ms, feats=feats, tv_boxes=tv_boxes, fl=fl: run(lambda: tv_ms(feats, tv_boxes, shapes), fl)))
        if backward:
            for f in fl:
                f.requires_grad_(True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--repeat", type=int, default=0, help="timed repetitions (default: 5 on CPU, 50 on CUDA)")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]

    configs = []
    for device in devices:
        if device == "cpu":
            configs += [(device, torch.float32, False, False), (device, torch.float32, False, True),
                        (device, torch.float32, True, False)]
        else:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                configs += [(device, dtype, False, False), (device, dtype, False, True),
                            (device, dtype, True, False), (device, dtype, True, True)]

    machine = (torch.cuda.get_device_name() if "cuda" in devices else "") or platform.processor()
    header = [f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"{torch.get_num_threads()} CPU threads, {platform.machine()}"
              + (f", GPU: {torch.cuda.get_device_name()}" if "cuda" in devices else ""),
              "",
              "| device | dtype | layout | pass | case | torchvision ms | ours ms | speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = []
    for device, dtype, cl, backward in configs:
        if device == "cpu" and dtype in (torch.float16, torch.bfloat16):
            continue
        repeat = args.repeat or (5 if device == "cpu" else 50)
        for name, ours, tv in cases(device, dtype, cl, backward):
            try:
                t_tv = timeit(tv, device, max(2, repeat // 2) if device == "cpu" else repeat)
            except RuntimeError as e:  # torchvision lacks some dtype/device combinations
                t_tv = float("nan")
                print(f"  torchvision failed on {name}: {str(e).splitlines()[0]}", file=sys.stderr)
            t_ours = timeit(ours, device, repeat)
            row = (f"| {device} | {str(dtype).replace('torch.', '')} | {'NHWC' if cl else 'NCHW'} | "
                   f"{'fwd+bwd' if backward else 'fwd'} | {name} | {t_tv * 1e3:.2f} | {t_ours * 1e3:.2f} | "
                   f"{t_tv / t_ours:.2f}x |")
            print(row, flush=True)
            rows.append(row)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
