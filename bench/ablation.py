"""The paper's ablations (Mask R-CNN, Table 2b-2e) rerun on synthetic shapes, on this machine's CPUs.

    python bench/ablation.py --workdir /tmp/ablation                      # every row; resumes when rerun
    python bench/ablation.py --workdir /tmp/ablation --rows roi_pool roi_align --max-iters 200   # a quick look

Every row trains a small model from scratch with ``bench/train_synthetic.py``'s recipe on one
shared dataset (``jobs.synthetic``, seed 0, 2000 images of 128-160 px, 10% held out) and differs
from its baseline in one switch only (``jobs.train --roi-pooler/--mask-loss/--mask-head``). Rows of
tables 2b, 2c and 2e train ``maskrcnn_resnet18_fpn_small`` (FPN levels from res2-res4, as the shipped
model); the stride-32 rows of 2d train ``maskrcnn_resnet18_c5`` (RPN and RoIs on res5 alone, the C5
variant of the C4 model, with the small model's conv heads). The held-out mask AP, AP50 and AP75
and box AP, AP50 and AP75 come from pycocotools. The table prints next to the paper's own numbers (arXiv:1703.06870v3, Table 2:
ResNet-50-C4 for 2b and 2c, ResNet-50-C5 for 2d, ResNet-50-FPN for 2e), so what is compared is the
direction of each comparison, not the values: these are small synthetic shapes and ResNet-18
models, not COCO and ResNet-50.

Schedule: ``--max-iters`` per row (default 3000, two images a step: about 35-45 minutes a row on the
2-core AMD VM, an hour on the Intel one, so the eight rows take two working sessions; rows are
independent runs, each resumes from its last checkpoint when the command is run again, so the
table can be filled over several sessions). Rows already trained are only evaluated again.
Prints the table and one JSON line; ``--markdown FILE`` writes the table too.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FPN = ["--returned-layers", "1", "2", "3"]  # the small FPN model, as shipped
# stride 32: anchors 16-256 all on the one res5 map; the images upsampled 2x (256-320 px), so the
# median object (26 px, about 55 px upsampled) covers about 2 cells, as COCO's does at the paper's 800 px
C5 = ["--arch", "resnet18_c5", "--min-size", "256", "288", "320", "--max-size", "480"]

# name: (flags, paper table, the paper's mask AP / AP50 / AP75 for that row, and box AP / AP50 / AP75
# where the table gives them)
ROWS = {
    "roi_align_legacy": (FPN, "2c", None, None),  # torchvision's default (aligned=False): our baseline
    "roi_align": (FPN + ["--roi-pooler", "roi_align"], "2c", (30.3, 51.2, 31.5), None),  # RoIAlign, avg, R50-C4
    "roi_warp": (FPN + ["--roi-pooler", "roi_warp"], "2c", (27.1, 48.9, 27.1), None),  # RoIWarp, avg
    "roi_pool": (FPN + ["--roi-pooler", "roi_pool"], "2c", (26.9, 48.8, 26.4), None),  # RoIPool, max
    "softmax": (FPN + ["--mask-loss", "softmax"], "2b", (24.8, 44.1, 25.1), None),  # vs sigmoid 30.3/51.2/31.5
    "mlp": (FPN + ["--mask-head", "mlp"], "2e", (31.5, 53.7, 32.8), None),  # fc 1024-1024-80x28x28 vs FCN 33.6/55.2/35.3
    "c5_roi_pool": (C5 + ["--roi-pooler", "roi_pool"], "2d", (23.6, 46.5, 21.6), (28.2, 52.7, 26.9)),  # R50-C5
    "c5_roi_align": (C5 + ["--roi-pooler", "roi_align"], "2d", (30.9, 51.8, 32.1), (34.0, 55.3, 36.4)),
}
PAPER_REFERENCE = {"2b": ("sigmoid", (30.3, 51.2, 31.5)), "2e": ("FCN", (33.6, 55.2, 35.3))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    p.add_argument("--max-iters", type=int, default=3000)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)

    import train_synthetic

    data = os.path.join(args.workdir, "data")
    results = {}
    for name in args.rows:
        flags, _, _, _ = ROWS[name]
        steps = [str(int(args.max_iters * f)) for f in (16 / 26, 22 / 26)]
        results[name] = train_synthetic.main([
            "--workdir", os.path.join(args.workdir, name), "--data", data, "--images", str(args.images),
            "--max-iters", str(args.max_iters), "--warmup-iters", str(max(1, args.max_iters // 12)),
            "--lr-steps", *steps, "--checkpoint-every",
            str(max(1, args.max_iters // 3)), *flags])
    lines = ["| row | table | mask AP | AP50 | AP75 | box AP | AP50 | AP75 | paper mask AP / AP50 / AP75 | paper box AP / AP50 / AP75 |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def paper(values):
        return "/".join(f"{v:.1f}" for v in values) if values else ""

    for name, r in results.items():
        _, table, mask_ref, box_ref = ROWS[name]
        ours = " | ".join(f"{100 * r[k]:.1f}" for k in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "box_AP75"))
        ref = paper(mask_ref) if mask_ref or name != "roi_align_legacy" else "(torchvision default)"
        lines.append(f"| {name} | {table} | {ours} | {ref} | {paper(box_ref)} |")
    for table, (label, ref) in PAPER_REFERENCE.items():
        lines.append(f"| (paper's {label}, table {table}) | {table} | | | | | | | {paper(ref)} | |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    print(json.dumps({name: {k: r[k] for k in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "box_AP75")}
                      for name, r in results.items()} | {"max_iters": args.max_iters}))


if __name__ == "__main__":
    main()
