"""Our Mask R-CNN against torchvision's: same weights, same images, same run.

Both models get the same seeded random weights (torchvision's state_dict loaded into ours
with strict=True) and the score threshold lowered to 0 so each image yields the full 100
detections: the mask paste then costs what it costs on real weights. Before timing, the
outputs are compared (boxes, labels, scores, masks > 0.5).

    python bench/model.py                          # CPU
    python bench/model.py --device cuda --batch 8  # GPU: fp32 both, and ours bf16 + channels_last
    python bench/model.py --architectures          # every registered architecture: params, Predictor images/s
    python bench/model.py --architectures maskrcnn_resnet50_c4 maskrcnn_resnet50_c5   # some of them

``--architectures`` times the Predictor (what the batch job runs: channels-last, fp32 on CPU)
on every architecture of ``mrcnn.list_models()`` with seeded random weights (residual branches
zero-initialised, so deep bodies stay finite), score threshold 0
(100 detections an image, the worst case of real weights), at the architectures' COCO input
size (short side 800), and prints images/s with the ratio to ``maskrcnn_resnet50_fpn`` measured
in the same run: the README's table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
import mrcnn  # noqa: E402

SIZES = [(480, 640), (640, 427), (427, 640), (512, 512), (375, 500), (640, 480), (333, 500), (500, 375)]


def build(arch: str, device: str):
    torch.manual_seed(0)
    kw = dict(weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0)
    tv = getattr(torchvision.models.detection, f"maskrcnn_{arch}")(**kw)
    ours = getattr(mrcnn, f"maskrcnn_{arch}")(num_classes=91, box_score_thresh=0.0)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv.eval().to(device), ours.eval().to(device)


def images(n: int, device: str):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        base = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
        out.append((base + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1).to(device))
    return out


def compare(tv_out, ours_out) -> str:
    n = boxes = masks = 0
    worst_box = worst_score = 0.0
    worst_iou = 1.0
    for a, b in zip(tv_out, ours_out):
        if len(a["boxes"]) != len(b["boxes"]) or not torch.equal(a["labels"], b["labels"]):
            return f"MISMATCH: detections differ ({len(a['boxes'])} vs {len(b['boxes'])})"
        n += len(a["boxes"])
        worst_box = max(worst_box, (a["boxes"] - b["boxes"]).abs().max().item() if len(a["boxes"]) else 0.0)
        worst_score = max(worst_score, (a["scores"] - b["scores"]).abs().max().item() if len(a["boxes"]) else 0.0)
        ma, mb = a["masks"][:, 0] > 0.5, b["masks"][:, 0] > 0.5
        inter = (ma & mb).flatten(1).sum(1).float()
        union = (ma | mb).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        worst_iou = min(worst_iou, iou.min().item() if len(iou) else 1.0)
        boxes += len(a["boxes"])
        masks += len(iou)
    return (f"{n} detections compared: max |box diff| {worst_box:.2e} px, max |score diff| {worst_score:.2e}, "
            f"min mask IoU {worst_iou:.4f}")


def timed(fn, device: str, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def zero_init_residual(model) -> None:
    """torchvision's zero_init_residual on a built model: without it the random activations of a
    deep ResNet (101 layers) overflow and it detects nothing, which would time no mask work."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (Bottleneck, BasicBlock)):
                (m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight.zero_()


def architectures(device: str, batch: int, repeat: int, only=None) -> None:
    """Parameters and Predictor images/s of every registered architecture, or of ``only`` (with
    maskrcnn_resnet50_fpn first, the reference of the ratios; see the module doc)."""
    arrays = [(img.permute(1, 2, 0) * 255).round().byte().cpu().numpy() for img in images(batch, "cpu")]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} CPU threads, device {device}; "
          f"batch of {batch} images {[a.shape[:2] for a in arrays]}, score threshold 0, fp32")
    rows, reference = [], None
    others = [n for n in (only or mrcnn.list_models()) if n != "maskrcnn_resnet50_fpn"]
    for name in ["maskrcnn_resnet50_fpn"] + others:
        torch.manual_seed(0)
        model = mrcnn.get_model(name, box_score_thresh=0.0)
        zero_init_residual(model)
        params = sum(p.numel() for p in model.parameters())
        predictor = mrcnn.Predictor(model, device=device)
        detections = []
        t = timed(lambda: detections.append(sum(len(r["boxes"]) for r in predictor(arrays))), device, repeat)
        reference = reference or t
        rows.append((name, params, batch / t, reference / t, detections[-1] / batch))
        print(f"  {name}: {batch / t:.3f} images/s", flush=True)
        del model, predictor
    print("\n| architecture | parameters | images/s | vs maskrcnn_resnet50_fpn | detections/image |\n|---|---|---|---|---|")
    for name, params, ips, ratio, dets in rows:
        print(f"| `{name}` | {params / 1e6:.1f}M | {ips:.3f} | {ratio:.2f}x | {dets:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet50_fpn", choices=["resnet50_fpn", "resnet50_fpn_v2"])
    p.add_argument("--architectures", nargs="*", default=None, choices=mrcnn.list_models(), metavar="NAME",
                   help="every registered architecture, or the ones named (see above)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dev = args.device
    if args.architectures is not None:
        return architectures(dev, args.batch, args.repeat, args.architectures)
    tv, ours = build(args.arch, dev)
    imgs = images(args.batch, dev)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads" + (f", GPU {torch.cuda.get_device_name()}" if dev == "cuda" else ""))
    print(f"{args.arch}, batch of {args.batch} images, sizes {[tuple(i.shape[1:]) for i in imgs]}")

    with torch.inference_mode():
        print("outputs, fp32:", compare(tv(imgs), ours(imgs)))
        rows = []
        t_tv = timed(lambda: tv(imgs), dev, args.repeat)
        t_ours = timed(lambda: ours(imgs), dev, args.repeat)
        rows.append(("torchvision fp32", t_tv, None))
        rows.append(("ours fp32 (float masks, as torchvision)", t_ours, None))
        ours.mask_output = "binary"
        rows.append(("ours fp32, binary masks", timed(lambda: ours(imgs), dev, args.repeat), None))
        ours.mask_output = "probs"
        if dev == "cpu":
            # What the Predictor runs: channels-last convolutions (oneDNN NHWC), RoIAlign
            # without transposes. Not bit-identical: float rounding differs from NCHW.
            ref = ours(imgs)
            ours.to(memory_format=torch.channels_last)
            print("outputs, channels_last vs NCHW (ranks of near-equal scores may swap):", compare(ref, ours(imgs)))
            rows.append(("ours fp32 channels_last (the Predictor's default)", timed(lambda: ours(imgs), dev, args.repeat), None))
            ours.to(memory_format=torch.contiguous_format)
        if dev == "cuda":
            rows[0] = rows[0][:2] + (peak_memory(lambda: tv(imgs)),)
            rows[1] = rows[1][:2] + (peak_memory(lambda: ours(imgs)),)
            fast = ours.to(memory_format=torch.channels_last)
            fast.mask_output = "binary"

            def bf16():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return fast(imgs)
            rows.append(("ours bf16 + channels_last, binary masks", timed(bf16, dev, args.repeat), peak_memory(bf16)))

    print("\n| model | ms / batch | images/s | vs torchvision | peak MiB |\n|---|---|---|---|---|")
    for name, t, mem in rows:
        print(f"| {name} | {t * 1e3:.0f} | {args.batch / t:.2f} | {t_tv / t:.2f}x | {'' if mem is None else f'{mem:.0f}'} |")


if __name__ == "__main__":
    main()
