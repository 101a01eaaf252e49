"""bf16 against fp32 on one device: are the detections the same, and how much faster is it?

    python3 bench/bf16.py --device cuda                      # accuracy, then images/s (median of --repeat 3)
    python3 bench/bf16.py --device cuda --check --no-speed --zero-init-residual --logit-scale 100
                                                             # accuracy only, a stable probe; exit 1 below the thresholds
    python3 bench/bf16.py --weights models/shapes_r18_fpn3.pt --device cuda --check   # a trained model, its own images
    python3 bench/bf16.py --device cpu --no-speed --allow-emulated --min-size 320 --images 2   # a quick CPU trial

Model: without ``--weights``, a seeded 91-class ``mrcnn.maskrcnn_resnet50_fpn`` holding the weights
of torchvision's seeded ``maskrcnn_resnet50_fpn`` (``bench/model.py``'s ``build``: torchvision's
state_dict loaded into ours, strict), class-logit weights times 20 (``--logit-scale``) and a score
threshold of 0.05 so that seeded weights detect something; images: ``--images`` seeded smooth-noise
photos (the recipe of ``bench/pipeline.py``'s ``make_inputs``) at ``--size`` (default 1333x800, COCO's
test size), which the model resizes to a shorter side of 800 (``--min-size``). That default probe is
ill-conditioned: the random ResNet's activations grow block after block, so the scores tie at 1.0 and
most boxes are slivers at the box-regression clamp, and its detections move under float rounding alone
(see the floor below). ``--zero-init-residual`` (``bench/model.py``'s ``zero_init_residual``) keeps the
activations small; with ``--logit-scale 100`` the scores spread (about 0.6 to 0.9) and the boxes are
tens to hundreds of pixels: a probe whose floor is exact. With ``--weights FILE``: that checkpoint
(its own score threshold) on synthetic shapes images (``jobs.synthetic.render_image``, which needs
pycocotools) at the model's input size.

Accuracy: the ``mrcnn.Predictor`` with ``precision="bf16"`` (autocast) against ``precision="fp32"``,
both channels-last (so the only difference is the precision), masks as ``mask_format="bool"``.
bf16 detections are matched to fp32's of the same label, greedily by box IoU (highest first, at
least ``--match-iou``); reported: fp32's count, the matched count, box IoU mean/min and mask IoU
mean/median over the matched pairs, and the largest score difference. ``--check`` exits 1 unless
at least ``--min-matched`` of fp32's detections are matched and the mean mask IoU is at least
``--min-mask-iou``. The floor: fp32 NCHW against fp32 channels-last, what float rounding alone
changes (a model whose detections move under it cannot tell bf16's effect apart).

Speed (skip with ``--no-speed``): images/s of the Predictor with our model in fp32 NCHW
(``channels_last=False``), fp32 channels-last and bf16 channels-last, and with torchvision's own
``maskrcnn_resnet50_fpn`` in fp32 holding the same state_dict (the reference of the ratios), all
measured in this run: a warm-up call each, then ``--repeat`` rounds that time every configuration
once in turn; the median. Each timed call is the Predictor's whole call (the forward, the mask
paste, the copies to the host) over all the images in batches of ``--batch``.

bf16 on a CPU needs native bf16 instructions (oneDNN with ``avx512_bf16`` or ``amx_bf16``): without
them bf16 is emulated, its numerics still bf16's but its time meaningless, and the script refuses
(exit 2) unless ``--allow-emulated``, which runs the accuracy part and leaves bf16 out of the speed
table. Prints the machine, a markdown table (``--markdown FILE`` writes it too) and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHECK_MATCHED = 0.90  # --check: matched bf16 detections / fp32 detections, at least
CHECK_MASK_IOU = 0.95  # --check: mean mask IoU over the matched pairs, at least
SCORE_THRESH = 0.05
LOGIT_SCALE = 20.0


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (h, w)."""
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def bench_model():
    """bench/model.py as a module (its build() makes the torchvision reference and our model)."""
    spec = importlib.util.spec_from_file_location("bench_model", os.path.join(ROOT, "bench", "model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def machine(device: str) -> str:
    import torchvision

    where = f"GPU {torch.cuda.get_device_name()}" if device == "cuda" else f"CPU {cpu_model()}"
    return (f"{where}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, Python {platform.python_version()}")


def bf16_refusal(device: str) -> str | None:
    """Why bf16 cannot be timed on this device (None: it can). Prints what was checked."""
    if device != "cpu":
        return None
    mkldnn = torch.backends.mkldnn.is_available()
    flags = cpu_bf16_flags()
    print(f"CPU bf16: oneDNN (mkldnn) {'available' if mkldnn else 'NOT available'}; "
          f"native bf16 flags in /proc/cpuinfo: {', '.join(flags) if flags else 'none (no avx512_bf16, no amx_bf16)'}")
    if mkldnn and flags:
        return None
    missing = "oneDNN is not available in this torch" if not mkldnn else "this CPU has neither avx512_bf16 nor amx_bf16"
    return f"bf16 on this CPU would be emulated ({missing})"


# ------------------------------------------------------------------------------ models, images
def seeded_models(logit_scale: float = LOGIT_SCALE, zero_init_residual: bool = False):
    """(ours, torchvision's, description): the same seeded weights, class logits scaled so they detect."""
    bm = bench_model()
    tv, ours = bm.build("resnet50_fpn", "cpu")
    for m in (tv, ours):
        if zero_init_residual:
            bm.zero_init_residual(m)
        with torch.no_grad():
            m.roi_heads.box_predictor.cls_score.weight.mul_(logit_scale)
    what = (f"seeded 91-class maskrcnn_resnet50_fpn (bench/model.py's weights"
            f"{', residual branches zero-initialised' if zero_init_residual else ''}, class logits x{logit_scale:g})")
    return ours, tv, what


def checkpoint_models(path: str):
    """(ours, torchvision's or None, description, why there is no torchvision model)."""
    import torchvision

    import mrcnn

    ours = mrcnn.load_model(path)
    meta = mrcnn.read_metadata(path)
    arch = meta.get("architecture")
    tv, why = None, None
    if arch == "maskrcnn_resnet50_fpn":
        try:
            kw = {k: v for k, v in meta.get("builder_kwargs", {}).items()
                  if k in ("min_size", "max_size", "box_score_thresh", "box_detections_per_img")}
            tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, num_classes=meta.get("num_classes"), **kw)
            tv.load_state_dict(ours.state_dict(), strict=True)
            tv.eval()
        except Exception as e:  # noqa: BLE001
            tv, why = None, f"torchvision's maskrcnn_resnet50_fpn does not take this checkpoint ({type(e).__name__}: {e})"
    else:
        why = f"torchvision has no {arch}"
    return ours.eval(), tv, f"{os.path.basename(path)} ({arch}, {meta.get('num_classes')} classes)", why


def smooth_noise(rng, h: int, w: int) -> np.ndarray:
    """A photo-like image: seeded noise at 1/8 size, upsampled bilinearly (as bench/pipeline.py's
    make_inputs writes its JPEGs)."""
    from PIL import Image

    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))  # writable: torch.from_numpy warns otherwise


def make_images(n: int, h: int, w: int, seed: int, shapes: bool) -> list[np.ndarray]:
    if shapes:
        from jobs.synthetic import render_image

        return [render_image(np.random.default_rng([seed, i]), h, w, min_objects=3, max_objects=6)[0] for i in range(n)]
    rng = np.random.default_rng(seed)
    return [smooth_noise(rng, h, w) for _ in range(n)]


# ------------------------------------------------------------------------------ accuracy
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(-1, 4), b.astype(np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(ref: dict, other: dict, min_iou: float) -> list[tuple[int, int, float]]:
    """(i in ref, j in other, box IoU): same label, greedy by box IoU (highest pair first)."""
    iou = box_iou(ref["boxes"], other["boxes"])
    same = ref["labels"][:, None] == other["labels"][None, :]
    cand = [(iou[i, j], i, j) for i, j in zip(*np.nonzero(same & (iou >= min_iou)))]
    cand.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_i, used_j, pairs = set(), set(), []
    for v, i, j in cand:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((int(i), int(j), float(v)))
    return pairs


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare(fp32: list[dict], bf16: list[dict], min_iou: float) -> dict:
    n_ref = n_other = 0
    box_ious, mask_ious, score_diffs, per_image = [], [], [], []
    for r, o in zip(fp32, bf16):
        pairs = match(r, o, min_iou)
        n_ref += len(r["scores"])
        n_other += len(o["scores"])
        per_image.append((len(r["scores"]), len(o["scores"]), len(pairs)))
        for i, j, v in pairs:
            box_ious.append(v)
            mask_ious.append(mask_iou(r["masks"][i], o["masks"][j]))
            score_diffs.append(abs(float(r["scores"][i]) - float(o["scores"][j])))
    m = len(box_ious)
    return {
        "fp32_detections": n_ref, "bf16_detections": n_other, "matched": m,
        "matched_fraction": m / n_ref if n_ref else 0.0,
        "box_iou_mean": float(np.mean(box_ious)) if m else None, "box_iou_min": float(np.min(box_ious)) if m else None,
        "mask_iou_mean": float(np.mean(mask_ious)) if m else None,
        "mask_iou_median": float(np.median(mask_ious)) if m else None,
        "mask_iou_min": float(np.min(mask_ious)) if m else None,
        "score_max_abs_diff": float(np.max(score_diffs)) if m else None,
        "per_image": per_image,
    }


def check_failures(acc: dict, min_matched: float, min_mask_iou: float) -> list[str]:
    if acc["fp32_detections"] == 0:
        return ["fp32 found no detections: nothing to compare"]
    out = []
    if acc["matched_fraction"] < min_matched:
        out.append(f"matched {acc['matched']}/{acc['fp32_detections']} = {acc['matched_fraction']:.3f} < {min_matched}")
    if acc["mask_iou_mean"] is None or acc["mask_iou_mean"] < min_mask_iou:
        out.append(f"mean mask IoU {acc['mask_iou_mean']} < {min_mask_iou}")
    return out


# ------------------------------------------------------------------------------ speed
def run_all(predictor, images: list[np.ndarray], batch: int) -> list[dict]:
    out = []
    for i in range(0, len(images), batch):
        out += predictor(images[i:i + batch])
    return out


def time_configs(configs: dict, images, batch: int, device: str, repeat: int) -> dict:
    """{name: median seconds for all the images}: a warm-up call each, then `repeat` rounds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name, pred in configs.items():
        run_all(pred, images, batch)
        sync()
    times = {name: [] for name in configs}
    for _ in range(repeat):
        for name, pred in configs.items():
            sync()
            t0 = time.perf_counter()
            run_all(pred, images, batch)
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ------------------------------------------------------------------------------ report
def fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def markdown(title: str, accs: dict, speed: list, refused: dict, n_images: int) -> str:
    lines = [f"**{title}**", "",
             "| compared | reference detections | other detections | matched | box IoU mean / min "
             "| mask IoU mean / median | max score diff |",
             "|---|---|---|---|---|---|---|"]
    for name, acc in accs.items():
        lines.append(f"| {name} | {acc['fp32_detections']} | {acc['bf16_detections']} "
                     f"| {acc['matched']} ({100 * acc['matched_fraction']:.1f}%) "
                     f"| {fmt(acc['box_iou_mean'])} / {fmt(acc['box_iou_min'])} "
                     f"| {fmt(acc['mask_iou_mean'])} / {fmt(acc['mask_iou_median'])} "
                     f"| {fmt(acc['score_max_abs_diff'], '.4f')} |")
    if speed or refused:
        lines += ["", "| model | precision | layout | images/s | vs torchvision fp32 |", "|---|---|---|---|---|"]
        ref = next((t for name, _, _, _, t in speed if name.startswith("torchvision")), None)
        for name, model, precision, layout, t in speed:
            ratio = f"{ref / t:.2f}x" if ref else "n/a"
            lines.append(f"| {model} | {precision} | {layout} | {n_images / t:.2f} | {ratio} |")
        for name, why in refused.items():
            lines.append(f"| {name} | | | not timed: {why} | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--size", default=None, help="WxH of the images (default 1333x800; with --weights the model's input size)")
    p.add_argument("--min-size", type=int, default=None,
                   help="the model's resize (shorter side; longer side at most 1333/800 of it): smaller for a quick "
                        "CPU trial (default: the model's own, 800 for the seeded model)")
    p.add_argument("--logit-scale", type=float, default=LOGIT_SCALE,
                   help=f"seeded model: factor on the class-logit weights (default {LOGIT_SCALE:g})")
    p.add_argument("--zero-init-residual", action="store_true",
                   help="seeded model: zero the last BatchNorm of every residual branch (bench/model.py's "
                        "zero_init_residual): activations stay small, boxes are not clamped slivers and scores "
                        "do not saturate (with --logit-scale 100); see the floor")
    p.add_argument("--images", type=int, default=4, help="images compared and timed (default 4)")
    p.add_argument("--batch", type=int, default=None, help="images per Predictor call (default: all of them)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--no-speed", action="store_true", help="accuracy only")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless matched >= --min-matched of fp32's detections and mean mask IoU >= --min-mask-iou")
    p.add_argument("--min-matched", type=float, default=CHECK_MATCHED, help=f"default {CHECK_MATCHED}")
    p.add_argument("--min-mask-iou", type=float, default=CHECK_MASK_IOU, help=f"default {CHECK_MASK_IOU}")
    p.add_argument("--match-iou", type=float, default=0.5, help="least box IoU of a matched pair (default 0.5)")
    p.add_argument("--weights", default=None, help="a checkpoint (e.g. models/shapes_r18_fpn3.pt) instead of seeded weights")
    p.add_argument("--allow-emulated", action="store_true",
                   help="CPU without native bf16: run the accuracy part anyway (bf16 is left out of the speed table)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--seed", type=int, default=0, help="seed of the images (the seeded weights are bench/model.py's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: --device cuda cannot run here")
        return 2
    print(f"machine: {machine(device)}")
    refusal = bf16_refusal(device)
    if refusal and not args.allow_emulated:
        print(f"REFUSED: {refusal}; bf16 is neither compared nor timed (--allow-emulated runs the accuracy part)")
        return 2
    if refusal:
        print(f"note: {refusal}: accuracy only for bf16 (its numerics are bf16's), bf16 left out of the speed table")

    from mrcnn.predictor import Predictor

    tv_why = None
    if args.weights:
        ours, tv, what, tv_why = checkpoint_models(args.weights)
        thresh = None  # the checkpoint's own
    else:
        ours, tv, what = seeded_models(args.logit_scale, args.zero_init_residual)
        thresh = SCORE_THRESH
    if args.min_size:
        for m in (ours, tv):
            if m is not None:
                m.transform.min_size = (args.min_size,)
                m.transform.max_size = round(args.min_size * 1333 / 800)
        what += f", resized to a shorter side of {args.min_size} (--min-size)"

    def predictor(model, precision, channels_last):
        return Predictor(copy.deepcopy(model), device=device, precision=precision, channels_last=channels_last,
                         mask_format="bool", score_thresh=thresh)

    fp32 = predictor(ours, "fp32", True)
    bf16 = predictor(ours, "bf16", True)
    if args.size:
        h, w = parse_size(args.size)
    elif args.weights and fp32.input_size:
        h, w = fp32.input_size[0], fp32.input_size[1]
    else:
        h, w = 800, 1333
    images = make_images(args.images, h, w, args.seed, shapes=bool(args.weights))
    batch = args.batch or len(images)
    title = (f"bf16 vs fp32: {what}, {len(images)} images {w}x{h} in batches of {batch}, "
             f"score threshold {thresh if thresh is not None else fp32.model.roi_heads.score_thresh}, {device}")
    print(title)

    fp32_nchw = predictor(ours, "fp32", False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out32 = run_all(fp32, images, batch)
        out16 = run_all(bf16, images, batch)
        out32_nchw = run_all(fp32_nchw, images, batch)
    acc = compare(out32, out16, args.match_iou)
    floor = compare(out32, out32_nchw, args.match_iou)
    print(f"accuracy ({time.perf_counter() - t0:.1f} s): bf16 channels-last vs fp32 channels-last, "
          f"same label, greedy by box IoU >= {args.match_iou}")
    print(f"  fp32 detections {acc['fp32_detections']}, bf16 detections {acc['bf16_detections']}, "
          f"matched {acc['matched']} ({100 * acc['matched_fraction']:.1f}% of fp32's); per image (fp32, bf16, matched): "
          f"{acc['per_image']}")
    print(f"  box IoU mean {fmt(acc['box_iou_mean'], '.4f')} min {fmt(acc['box_iou_min'], '.4f')}; "
          f"mask IoU mean {fmt(acc['mask_iou_mean'], '.4f')} median {fmt(acc['mask_iou_median'], '.4f')} "
          f"min {fmt(acc['mask_iou_min'], '.4f')}; score max |diff| {fmt(acc['score_max_abs_diff'], '.4f')}")
    print(f"  floor, fp32 NCHW vs fp32 channels-last (float rounding alone): matched {floor['matched']}/"
          f"{floor['fp32_detections']}, box IoU mean {fmt(floor['box_iou_mean'], '.4f')}, "
          f"mask IoU mean {fmt(floor['mask_iou_mean'], '.4f')}")
    boxes = np.concatenate([r["boxes"] for r in out32]).reshape(-1, 4)
    scores = np.concatenate([r["scores"] for r in out32])
    if len(boxes):
        wh = boxes[:, 2:] - boxes[:, :2]
        print(f"  fp32 detections: median box {np.median(wh[:, 0]):.1f} x {np.median(wh[:, 1]):.1f} px (w x h), "
              f"{(wh.min(1) < 4).mean():.0%} narrower than 4 px; scores min {scores.min():.3f} "
              f"median {np.median(scores):.3f} max {scores.max():.3f}")

    speed, refused = [], {}
    if not args.no_speed:
        configs = {}
        layout = {}
        if tv is not None:
            configs["torchvision fp32"] = Predictor(copy.deepcopy(tv), device=device, precision="fp32",
                                                    channels_last=False, mask_format="bool", score_thresh=thresh)
            layout["torchvision fp32"] = ("torchvision maskrcnn_resnet50_fpn", "fp32", "NCHW")
        else:
            refused["torchvision fp32"] = tv_why
        configs["ours fp32 NCHW"] = fp32_nchw
        layout["ours fp32 NCHW"] = ("ours (mrcnn)", "fp32", "NCHW")
        configs["ours fp32 channels-last"] = fp32
        layout["ours fp32 channels-last"] = ("ours (mrcnn)", "fp32", "channels-last")
        if refusal:
            refused["ours bf16 channels-last"] = refusal
        else:
            configs["ours bf16 channels-last"] = bf16
            layout["ours bf16 channels-last"] = ("ours (mrcnn)", "bf16", "channels-last")
        print(f"speed: {len(configs)} configurations, a warm-up call each, then the median of {args.repeat} rounds")
        with torch.inference_mode():
            times = time_configs(configs, images, batch, device, args.repeat)
        ref = times.get("torchvision fp32")
        for name, t in times.items():
            speed.append((name, *layout[name], t))
            print(f"  {name:26s} {len(images) / t:8.2f} images/s" + (f"  {ref / t:.2f}x torchvision fp32" if ref else ""))
        for name, why in refused.items():
            print(f"  {name:26s} not timed: {why}")

    table = markdown(title, {"bf16 vs fp32 (channels-last)": acc, "floor: fp32 NCHW vs fp32 channels-last": floor},
                     speed, refused, len(images))
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    failures = check_failures(acc, args.min_matched, args.min_mask_iou) if args.check else []
    print(json.dumps({"bench": "bf16", "device": device, "machine": machine(device), "images": len(images),
                      "size": f"{w}x{h}", "accuracy": {k: v for k, v in acc.items() if k != "per_image"},
                      "floor": {k: v for k, v in floor.items() if k != "per_image"},
                      "images_per_s": {name: round(len(images) / t, 3) for name, _, _, _, t in speed},
                      "check": None if not args.check else not failures}))
    if check_failures(floor, args.min_matched, args.min_mask_iou):
        print("WARNING: the floor itself is below the check's thresholds: this model's detections move under "
              "float rounding alone (tied scores, boxes at the regression clamp), so the comparison cannot tell "
              "bf16's effect; a well-conditioned probe: --zero-init-residual --logit-scale 100, or --weights "
              "models/shapes_r18_fpn3.pt")
    if args.check:
        print(f"check thresholds: matched >= {args.min_matched:.0%} of fp32's detections, "
              f"mean mask IoU >= {args.min_mask_iou}")
        if failures:
            print("CHECK FAILED: " + "; ".join(failures))
            return 1
        print("CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
