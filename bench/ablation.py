"""The paper's ablations (Mask R-CNN, Table 2c-e) rerun on synthetic shapes, on this machine's CPUs.

    python bench/ablation.py --workdir /tmp/ablation                      # every row; resumes when rerun
    python bench/ablation.py --workdir /tmp/ablation --rows roi_pool roi_align --max-iters 200   # a quick look

Every row trains ``maskrcnn_resnet18_fpn_small`` from scratch with ``bench/train_synthetic.py``'s
recipe on one shared dataset (``jobs.synthetic``, seed 0, 2000 images of 128-160 px, 10% held out)
and differs from the baseline in one switch only (``jobs.train --roi-pooler/--mask-loss/--mask-head``).
The held-out mask AP, AP50 and AP75 (box AP too) come from pycocotools. The table prints next to
the paper's own numbers (arXiv:1703.06870v3, Table 2: ResNet-50-C4 for 2b and 2c, ResNet-50-FPN
for 2e), so what is compared is the direction of each comparison, not the values: these are small
synthetic shapes and a ResNet-18-FPN, not COCO. The stride-32 rows (2d) need the C4/C5 models of
the model-family issue and are not here yet.

Schedule: ``--max-iters`` per row (default 3000, about an hour a row on the 2-core VM; rows are
independent runs, each resumes from its last checkpoint when the command is run again, so the
table can be filled over several sessions). Rows already trained are only evaluated again.
Prints the table and one JSON line; ``--markdown FILE`` writes the table too.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (switch flags, paper table, the paper's mask AP / AP50 / AP75 for that row)
ROWS = {
    "roi_align_legacy": ([], "2c", None),  # torchvision's default (aligned=False): our baseline
    "roi_align": (["--roi-pooler", "roi_align"], "2c", (30.3, 51.2, 31.5)),  # RoIAlign, avg, R50-C4
    "roi_warp": (["--roi-pooler", "roi_warp"], "2c", (27.1, 48.9, 27.1)),  # RoIWarp, avg
    "roi_pool": (["--roi-pooler", "roi_pool"], "2c", (26.9, 48.8, 26.4)),  # RoIPool, max
    "softmax": (["--mask-loss", "softmax"], "2b", (24.8, 44.1, 25.1)),  # softmax vs sigmoid 30.3/51.2/31.5
    "mlp": (["--mask-head", "mlp"], "2e", (31.5, 53.7, 32.8)),  # MLP fc 1024-1024-80x28x28 vs FCN 33.6/55.2/35.3
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
        flags, _, _ = ROWS[name]
        steps = [str(int(args.max_iters * f)) for f in (16 / 26, 22 / 26)]
        results[name] = train_synthetic.main([
            "--workdir", os.path.join(args.workdir, name), "--data", data, "--images", str(args.images),
            "--max-iters", str(args.max_iters), "--warmup-iters", str(max(1, args.max_iters // 12)),
            "--lr-steps", *steps, "--returned-layers", "1", "2", "3", "--checkpoint-every",
            str(max(1, args.max_iters // 3)), *flags])
    lines = ["| row | table | mask AP | AP50 | AP75 | box AP | paper mask AP / AP50 / AP75 |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        _, table, paper = ROWS[name]
        ref = "/".join(f"{v:.1f}" for v in paper) if paper else "(torchvision default)"
        lines.append(f"| {name} | {table} | {100 * r['mask_AP']:.1f} | {100 * r['mask_AP50']:.1f} | "
                     f"{100 * r['mask_AP75']:.1f} | {100 * r['box_AP']:.1f} | {ref} |")
    for table, (label, ref) in PAPER_REFERENCE.items():
        lines.append(f"| (paper's {label}, table {table}) | {table} | | | | | {'/'.join(f'{v:.1f}' for v in ref)} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    print(json.dumps({name: {k: r[k] for k in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "box_AP50")}
                      for name, r in results.items()} | {"max_iters": args.max_iters}))


if __name__ == "__main__":
    main()
