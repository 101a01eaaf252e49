"""Training speed of our Mask R-CNN against torchvision's: same weights, same batches, same recipe.

Both models start from the same seeded random weights (torchvision's state_dict loaded into ours
with strict=True; no checkpoint can be downloaded here) and train on the same synthetic batches
(textured images with random rectangles and ellipses as instances) with the recipe of
``jobs.train``: SGD (momentum 0.9, weight decay 1e-4, lr 0.02 x batch / 16) and, on CUDA, AMP
(fp16 autocast + GradScaler). The two models alternate in rounds so drifting clocks hit both.
Before timing, the first step's losses of the two models are printed side by side (same weights,
same data, same RNG seed: they should agree closely).

    python bench/train_speed.py --device cuda --batch 4 --size 800x1066   # a GPU: images/s per GPU
    python bench/train_speed.py --batch 2 --size 320x320 --steps 3        # CPU smoke run

Prints images/s for each model, the ratio ours / torchvision (above 1: ours is faster) and, on
CUDA, the peak memory of each; on CUDA ours also runs channels-last, as ``jobs.train`` runs it
there (``jobs.train.loop.model_layout``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
import mrcnn  # noqa: E402

NUM_CLASSES = 4


def build(arch: str, device: str, min_size: int, max_size: int):
    torch.manual_seed(0)
    kw = dict(num_classes=NUM_CLASSES, min_size=min_size, max_size=max_size)
    tv = getattr(torchvision.models.detection, f"maskrcnn_{arch}")(weights=None, weights_backbone=None, **kw)
    ours = getattr(mrcnn, f"maskrcnn_{arch}")(**kw)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv.train().to(device), ours.train().to(device)


def batches(n_batches: int, batch: int, h: int, w: int, device: str, seed: int = 1):
    """Textured images with 2-6 random rectangles / ellipses each: (images, targets) lists."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for _ in range(n_batches):
        images, targets = [], []
        for _ in range(batch):
            img = (torch.rand(3, 1, 1, generator=g) * 0.5 + 0.2 + 0.1 * torch.rand(3, h, w, generator=g))
            n = int(torch.randint(2, 7, (1,), generator=g))
            masks, boxes = [], []
            for _ in range(n):
                bw, bh = (torch.rand(2, generator=g) * 0.3 + 0.05) * torch.tensor([w, h])
                x0 = float(torch.rand(1, generator=g)) * (w - bw)
                y0 = float(torch.rand(1, generator=g)) * (h - bh)
                x1, y1 = x0 + float(bw), y0 + float(bh)
                if torch.rand(1, generator=g) < 0.5:
                    m = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
                else:
                    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, float(bw) / 2, float(bh) / 2
                    m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
                ys, xs = m.nonzero(as_tuple=True)
                if len(ys) == 0:
                    continue
                img[:, m] = torch.rand(3, 1, generator=g)
                masks.append(m.to(torch.uint8))
                boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            images.append(img.clamp(0, 1).to(device))
            targets.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                "labels": torch.randint(1, NUM_CLASSES, (len(boxes),), generator=g).to(device),
                "masks": torch.stack(masks).to(device),
            })
        out.append((images, targets))
    return out


class Trainer:
    """One model with the jobs.train recipe: SGD, and AMP + GradScaler on CUDA."""

    def __init__(self, model, device: str, batch: int):
        self.model, self.device = model, device
        self.amp = device == "cuda"
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.02 * batch / 16, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def step(self, images, targets) -> dict:
        with torch.autocast(self.device, enabled=self.amp):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return {k: float(v.detach()) for k, v in losses.items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet50_fpn", choices=["resnet50_fpn", "resnet50_fpn_v2"])
    p.add_argument("--batch", type=int, default=4, help="images per step (one GPU)")
    p.add_argument("--size", default="800x1066", help="HxW of the synthetic images")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round and model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    dev = a.device
    tv, ours = build(a.arch, dev, min(h, w), max(h, w))
    data = batches(min(a.steps, 8), a.batch, h, w, dev)
    trainers = {"torchvision": Trainer(tv, dev, a.batch), "ours": Trainer(ours, dev, a.batch)}
    if dev == "cuda":  # jobs.train's layout on CUDA: RoIAlign reads the pyramid without a transpose
        trainers["ours, channels-last"] = Trainer(copy.deepcopy(ours).to(memory_format=torch.channels_last), dev, a.batch)
    print(f"{a.arch}, batch {a.batch} of {h}x{w}, {dev}"
          + (f" ({torch.cuda.get_device_name()}, AMP fp16)" if dev == "cuda" else f", {torch.get_num_threads()} threads, fp32")
          + f"; torch {torch.__version__}, torchvision {torchvision.__version__}")

    first = {}
    for name, t in trainers.items():
        torch.manual_seed(123)
        first[name] = t.step(*data[0])
    for k in first["torchvision"]:
        print(f"  first-step {k:18s} torchvision {first['torchvision'][k]:.6f}  ours {first['ours'][k]:.6f}")

    for t in trainers.values():
        for i in range(a.warmup):
            t.step(*data[(i + 1) % len(data)])
    rates = {name: [] for name in trainers}
    peak = {}
    for _ in range(a.rounds):
        for name, t in trainers.items():
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(dev)
            t0 = time.perf_counter()
            for i in range(a.steps):
                t.step(*data[i % len(data)])
            sync(dev)
            rates[name].append(a.steps * a.batch / (time.perf_counter() - t0))
            if dev == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
    for name in trainers:
        mem = f", peak {peak[name] / 2**30:.2f} GiB" if name in peak else ""
        print(f"{name:20s} {statistics.median(rates[name]):8.2f} images/s (median of {a.rounds} rounds{mem})")
    for name in trainers:
        if name != "torchvision":
            ratio = statistics.median(rates[name]) / statistics.median(rates["torchvision"])
            print(f"{name} / torchvision: {ratio:.3f}x training images/s")


if __name__ == "__main__":
    main()
