"""Synthetic shapes dataset in COCO format, for training and evaluating without downloads.

    python -m jobs.synthetic --out s3://bucket/shapes --images 200 --seed 0 --val-fraction 0.2
    python -m jobs.synthetic --kind figures --out figures/ --images 200   # keypoints: stick figures

Layout written under ``--out`` (a local folder or any fsspec URI; ``s3://`` honours
``AWS_ENDPOINT_URL``)::

    OUT/annotations.json         train split (all images when --val-fraction is 0)
    OUT/images/000001.png
    OUT/val/annotations.json     val split, only with --val-fraction > 0
    OUT/val/images/000161.png

Each ``annotations.json`` names its images relative to its own folder (``images/000001.png``),
so ``OUT`` and ``OUT/val`` are both complete dataset roots: train with ``--data OUT`` and
evaluate against ``--gt OUT/val/annotations.json``. Image ids, annotation ids and file names
are unique across the two splits. ``annotations.json`` is written after the images, so its
presence marks a complete root.

What the annotations mean:

- Categories: circle (1), square (2, rotated by a random angle), triangle (3).
- Objects are flat-coloured and painted in order over a textured background (noise, gradient
  or stripes). Every mask is the object's VISIBLE part: pixels covered by a later object
  belong to that object only, so the masks of one image never overlap. Each object keeps at
  least ``min_visible`` of its own area visible (placements that would hide more are retried).
- Masks are exact: each shape's mask is computed first and the image is painted from it.
  A square or triangle that nothing covers is annotated by its polygon (rasterised with
  pycocotools, so ``annToMask`` gives back exactly the painted pixels); circles and every
  partly covered object are annotated by compressed RLE of the visible mask.
- Crowd regions: with probability ``crowd_prob`` an image gets a cluster of small shapes of
  one category, annotated as ONE ``iscrowd=1`` region (uncompressed RLE, as COCO writes
  crowds) covering their visible pixels. COCO evaluation ignores detections matched to it;
  training readers drop it from targets (see ``jobs.coco_data``).
- ``area`` is the visible pixel count and ``bbox`` ([x, y, w, h]) the visible mask's box.

``--kind figures`` writes a person-keypoint-like data set instead: stick figures (category
``figure``) with 7 keypoints each, COCO keypoint style (``keypoints`` [x, y, v] * 7 with v = 2,
``num_keypoints``; the category lists the keypoint names, its ``skeleton`` and the OKS
``keypoint_sigmas``, 0.05 for every keypoint: they are exact points). The keypoints are the
head's centre, the neck, the hip, the hands and the feet; "left" is the one nearer the image's
left edge, so a horizontal flip swaps left and right as it does for COCO's people. Figures do
not overlap one another; a few unannotated shapes are painted behind them as distractors; the
mask is the figure's painted pixels.

Output is deterministic: the same arguments give the same bytes (each image draws from its
own generator seeded by ``(seed, image index)``, and no timestamps are written).
"""

import argparse
import io
import json
import math
import posixpath

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.storage import resolve

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
FIGURE_KEYPOINTS = ["head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot"]
FIGURE_SKELETON = [(0, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6)]  # 0-based pairs of FIGURE_KEYPOINTS
FIGURE_CATEGORIES = [{
    "id": 1, "name": "figure", "supercategory": "figure", "keypoints": FIGURE_KEYPOINTS,
    "skeleton": [[a + 1, b + 1] for a, b in FIGURE_SKELETON],  # COCO's skeleton is 1-based
    "keypoint_sigmas": [0.05] * len(FIGURE_KEYPOINTS),
}]
KINDS = {"shapes": CATEGORIES, "figures": FIGURE_CATEGORIES}
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES + FIGURE_CATEGORIES}


# ---------------------------------------------------------------------------- masks
def _circle_mask(h, w, cx, cy, r):
    # A pixel belongs to the circle when its centre does.
    ys, xs = np.ogrid[:h, :w]
    return ((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= r * r).astype(np.uint8)


def _polygon_mask(h, w, poly):
    # Rasterise with pycocotools so that the written polygon decodes to these exact pixels.
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return mask_utils.decode(rle)


def _regular_polygon(cx, cy, r, n, angle, jitter, rng):
    pts = []
    for k in range(n):
        a = angle + 2 * math.pi * k / n + (rng.uniform(-jitter, jitter) if jitter else 0.0)
        rk = r * (rng.uniform(0.8, 1.0) if jitter else 1.0)
        # Two decimals: the JSON then holds exactly the coordinates that were rasterised.
        pts += [round(cx + rk * math.cos(a), 2), round(cy + rk * math.sin(a), 2)]
    return pts


def _shape(rng, h, w, kind, cx, cy, r):
    """Full (unoccluded) mask of one shape and its polygon (None for circles)."""
    if kind == "circle":
        return _circle_mask(h, w, cx, cy, r), None
    if kind == "square":
        poly = _regular_polygon(cx, cy, r, 4, rng.uniform(0, math.pi / 2), 0.0, rng)
    else:
        poly = _regular_polygon(cx, cy, r, 3, rng.uniform(0, 2 * math.pi), 0.3, rng)
    return _polygon_mask(h, w, poly), poly


def _compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask):
    # COCO's crowd format: run lengths over the column-major flattening, starting with zeros.
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# ---------------------------------------------------------------------- backgrounds
def _background(rng, h, w):
    ys, xs = np.mgrid[:h, :w].astype(np.float32)
    kind = rng.integers(3)
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    if kind == 0:  # noise around one colour
        img = c0 + rng.normal(0, rng.uniform(10, 35), (h, w, 3)).astype(np.float32)
    else:
        a = rng.uniform(0, math.pi)
        t = xs * math.cos(a) + ys * math.sin(a)
        if kind == 1:  # linear gradient between two colours
            t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        else:  # stripes of two colours
            t = (np.floor(t / rng.uniform(4, 16)) % 2).astype(np.float32)
        img = c0 + t[..., None] * (c1 - c0)
        img += rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- one image
def render_image(rng, h, w, *, min_objects=2, max_objects=6, overlap=0.5, crowd_prob=0.15,
                 min_visible=0.4, min_area=40, max_tries=20):
    """Draw one image. Returns (image HxWx3 uint8, list of objects in painting order).

    Each object is a dict: category (name), iscrowd, colour(s), mask (visible, uint8 HxW),
    polygon (when the object is a polygon shape that nothing covers, else None).
    """
    image = _background(rng, h, w)
    side = min(h, w)
    objects = []  # each: category, iscrowd, colours, full mask, polygon

    def visible_ok(new_full):
        # Would painting new_full leave every earlier object enough of itself?
        later = new_full.astype(bool)
        for obj in reversed(objects):
            vis = obj["_vis"] & ~later
            n = int(vis.sum())
            if n < min_area or n < min_visible * obj["_full_area"]:
                return False
            later = later | obj["_full"]
        return True

    def add(obj, full):
        full = full.astype(bool)
        for o in objects:
            o["_vis"] &= ~full
        obj.update(_full=full, _vis=full.copy(), _full_area=int(full.sum()))
        objects.append(obj)

    if rng.uniform() < crowd_prob:
        # A cluster of small shapes of one category, annotated as a single crowd region.
        kind = ["circle", "square", "triangle"][rng.integers(3)]
        r_small = max(3.0, 0.025 * side)
        spread = 0.12 * side
        ccx, ccy = rng.uniform(spread + r_small, w - spread - r_small), rng.uniform(spread + r_small, h - spread - r_small)
        full = np.zeros((h, w), bool)
        colours = []
        for _ in range(int(rng.integers(4, 9))):
            m, _ = _shape(rng, h, w, kind, ccx + rng.uniform(-spread, spread), ccy + rng.uniform(-spread, spread),
                          r_small * rng.uniform(0.8, 1.3))
            colour = rng.integers(0, 256, 3).astype(np.uint8)
            image[m.astype(bool)] = colour
            colours.append(colour)
            full |= m.astype(bool)
        add({"category": kind, "iscrowd": 1, "colours": colours, "polygon": None}, full)

    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        kind = ["circle", "square", "triangle"][rng.integers(3)]
        for _try in range(max_tries):
            r = rng.uniform(0.06, 0.2) * side
            plain = [o for o in objects if not o["iscrowd"]]
            if plain and rng.uniform() < overlap:
                # Put it across the edge of an existing object, so overlaps are common.
                o = plain[rng.integers(len(plain))]
                a = rng.uniform(0, 2 * math.pi)
                d = (o["_r"] + r) * rng.uniform(0.5, 0.9)
                cx, cy = o["_cx"] + d * math.cos(a), o["_cy"] + d * math.sin(a)
            else:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            if not (r <= cx <= w - r and r <= cy <= h - r):
                continue  # keep whole shapes inside the image
            full, poly = _shape(rng, h, w, kind, cx, cy, r)
            if full.sum() >= min_area and visible_ok(full):
                colour = rng.integers(0, 256, 3).astype(np.uint8)
                image[full.astype(bool)] = colour
                add({"category": kind, "iscrowd": 0, "colours": [colour], "polygon": poly,
                     "_cx": cx, "_cy": cy, "_r": r}, full)
                break

    out = []
    for o in objects:
        covered = int(o["_vis"].sum()) < o["_full_area"]
        out.append({"category": o["category"], "iscrowd": o["iscrowd"], "colours": o["colours"],
                    "mask": o["_vis"].astype(np.uint8), "polygon": None if covered else o["polygon"]})
    return image, out


# ------------------------------------------------------------------- stick figures
def _figure(rng, height):
    """Keypoints (7 x 2, FIGURE_KEYPOINTS order, relative to the neck) and drawing sizes of one
    stick figure ``height`` pixels tall."""
    tilt = rng.normal(0, 0.25)
    down = np.array([math.sin(tilt), math.cos(tilt)])
    neck = np.zeros(2)
    hip = neck + 0.35 * height * down
    head = neck - 0.17 * height * down
    hands = [neck + 0.3 * height * np.array([math.cos(a), math.sin(a)]) for a in rng.uniform(-math.pi, math.pi, 2)]
    feet = [hip + 0.38 * height * np.array([math.cos(a), math.sin(a)])
            for a in math.pi / 2 + tilt + rng.uniform(-0.9, 0.9, 2)]
    hands.sort(key=lambda p: p[0])  # left = nearer the image's left edge
    feet.sort(key=lambda p: p[0])
    points = np.stack([head, neck, hip, *hands, *feet])
    return points, max(2.0, 0.06 * height), 0.1 * height


def render_figures(rng, h, w, *, min_objects=1, max_objects=3, distractors=2, max_tries=30):
    """Draw one image of stick figures. Returns (image, objects) as :func:`render_image`, each
    object also holding ``keypoints`` (7 x 3: x, y, visibility 2)."""
    from PIL import ImageDraw

    image = _background(rng, h, w)
    side = min(h, w)
    for _ in range(int(rng.integers(0, distractors + 1))):  # unannotated shapes behind the figures
        r = rng.uniform(0.05, 0.15) * side
        m, _ = _shape(rng, h, w, ["circle", "square", "triangle"][rng.integers(3)], rng.uniform(r, w - r),
                      rng.uniform(r, h - r), r)
        image[m.astype(bool)] = rng.integers(0, 256, 3).astype(np.uint8)
    objects, taken = [], np.zeros((h, w), bool)
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _try in range(max_tries):
            points, width, radius = _figure(rng, rng.uniform(0.4, 0.8) * side)
            lo = points.min(0) - radius - width
            hi = points.max(0) + radius + width
            if np.any(hi - lo >= [w, h]):
                continue
            points = points + rng.uniform(-lo, [w, h] - hi)
            canvas = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(canvas)
            for a, b in FIGURE_SKELETON[1:]:  # the limbs; the head is a disc
                draw.line([tuple(points[a]), tuple(points[b])], fill=1, width=int(round(width)))
            hx, hy = points[0]
            draw.ellipse([hx - radius, hy - radius, hx + radius, hy + radius], fill=1)
            mask = np.asarray(canvas, dtype=np.uint8).copy()
            if (mask.astype(bool) & taken).any():
                continue  # figures do not overlap
            taken |= mask.astype(bool)
            colour = rng.integers(0, 256, 3).astype(np.uint8)
            image[mask.astype(bool)] = colour
            keypoints = np.concatenate([np.round(points, 2), np.full((len(points), 1), 2.0)], axis=1)
            objects.append({"category": "figure", "iscrowd": 0, "colours": [colour], "mask": mask,
                            "polygon": None, "keypoints": keypoints})
            break
    return image, objects


def annotations_for(objects, image_id, first_ann_id):
    """COCO annotation dicts for the objects of one image."""
    anns = []
    for k, o in enumerate(objects):
        rle = mask_utils.encode(np.asfortranarray(o["mask"]))
        if o["iscrowd"]:
            seg = _uncompressed_rle(o["mask"])
        elif o["polygon"] is not None:
            seg = [o["polygon"]]
        else:
            seg = _compressed_rle(o["mask"])
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": _CATEGORY_ID[o["category"]],
            "segmentation": seg,
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": int(o["iscrowd"]),
        })
        if o.get("keypoints") is not None:
            anns[-1]["keypoints"] = [float(v) for v in np.asarray(o["keypoints"]).reshape(-1)]
            anns[-1]["num_keypoints"] = int((np.asarray(o["keypoints"])[:, 2] > 0).sum())
    return anns


# ---------------------------------------------------------------------------- dataset
def parse_size(text):
    """'WxH' -> fixed size; 'MIN/MAX' -> each side drawn from [MIN, MAX]. Returns (lo, hi) per side."""
    try:
        if "x" in text:
            w, h = (int(v) for v in text.lower().split("x"))
            return (w, w), (h, h)
        lo, hi = (int(v) for v in text.split("/"))
        return (lo, hi), (lo, hi)
    except ValueError:
        raise ValueError(f"--size must be WxH (e.g. 320x256) or MIN/MAX (e.g. 256/384), got {text!r}") from None


def _encode(image, fmt):
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate(out_uri, n_images, seed=0, *, size="256/384", val_fraction=0.0, image_format="png",
             overwrite=False, storage_options=None, kind="shapes", **render_kwargs):
    """Write a synthetic COCO dataset under out_uri (layout in the module docstring).

    Returns {"train": {...}, "val": {...}} with each split's annotations URI and counts.
    ``kind``: "shapes" or "figures" (keypoints). render_kwargs go to render_image
    (min_objects, max_objects, overlap, crowd_prob, ...) or render_figures (min_objects,
    max_objects, distractors).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    render = render_figures if kind == "figures" else render_image
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    (wlo, whi), (hlo, hhi) = parse_size(size) if isinstance(size, str) else size
    if min(wlo, hlo) < 32 or whi < wlo or hhi < hlo:
        raise ValueError(f"image sizes must be >= 32 px with MIN <= MAX, got {size!r}")

    fs, root = resolve(out_uri, storage_options)
    root = root.rstrip("/")
    if fs.exists(posixpath.join(root, "annotations.json")) and not overwrite:
        raise FileExistsError(f"{out_uri} already holds annotations.json; pass overwrite=True (--overwrite) to replace it")
    fs.makedirs(root, exist_ok=True)

    n_val = int(round(n_images * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n_images:
        raise ValueError(f"val_fraction {val_fraction} leaves no training images out of {n_images}")
    splits = {"train": ("", {"images": [], "annotations": []}), "val": ("val", {"images": [], "annotations": []})}
    for split, (prefix, _) in splits.items():
        if split == "train" or n_val:
            fs.makedirs(posixpath.join(root, prefix, "images"), exist_ok=True)  # local folders; no-op on S3

    pending, ann_id = {}, 1
    for index in range(n_images):
        split = "val" if index >= n_images - n_val else "train"
        prefix, data = splits[split]
        rng = np.random.default_rng([seed, index])
        w, h = int(rng.integers(wlo, whi + 1)), int(rng.integers(hlo, hhi + 1))
        image, objects = render(rng, h, w, **render_kwargs)
        image_id = index + 1
        file_name = f"images/{image_id:06d}.{image_format}"
        data["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        anns = annotations_for(objects, image_id, ann_id)
        ann_id += len(anns)
        data["annotations"] += anns
        pending[posixpath.join(root, prefix, file_name)] = _encode(image, image_format)
        if len(pending) >= 64:  # fsspec writes a batch concurrently on object stores
            fs.pipe(pending)
            pending = {}
    if pending:
        fs.pipe(pending)

    summary = {}
    for split, (prefix, data) in splits.items():
        if not data["images"]:
            continue
        doc = {
            "info": {"description": f"mrcnn-batch synthetic {kind} ({split})", "seed": seed, "version": "1"},
            "licenses": [],
            "images": data["images"],
            "annotations": data["annotations"],
            "categories": KINDS[kind],
        }
        path = posixpath.join(root, prefix, "annotations.json")
        fs.pipe_file(path, json.dumps(doc, separators=(",", ":")).encode())
        summary[split] = {
            "annotations": fs.unstrip_protocol(path),
            "images": len(data["images"]),
            "instances": sum(1 for a in data["annotations"] if not a["iscrowd"]),
            "crowd_regions": sum(1 for a in data["annotations"] if a["iscrowd"]),
        }
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="dataset root: local folder or fsspec URI (s3://bucket/prefix)")
    p.add_argument("--images", type=int, required=True, help="number of images (train + val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="256/384", help="WxH for a fixed size, or MIN/MAX for random sides (default 256/384)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of images written to OUT/val (default 0)")
    p.add_argument("--format", choices=["png", "jpg"], default="png", help="image encoding (png is lossless: exact colours)")
    p.add_argument("--kind", choices=sorted(KINDS), default="shapes",
                   help="shapes (circles, squares, triangles; masks) or figures (stick figures; keypoints)")
    p.add_argument("--min-objects", type=int, help="default 2 shapes, 1 figure")
    p.add_argument("--max-objects", type=int, help="default 6 shapes, 3 figures")
    p.add_argument("--crowd-prob", type=float, default=0.15, help="shapes: probability that an image holds a crowd region")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    args = p.parse_args(argv)
    figures = args.kind == "figures"
    render_kwargs = {"min_objects": args.min_objects if args.min_objects is not None else (1 if figures else 2),
                     "max_objects": args.max_objects if args.max_objects is not None else (3 if figures else 6)}
    if not figures:
        render_kwargs["crowd_prob"] = args.crowd_prob
    summary = generate(args.out, args.images, args.seed, size=args.size, val_fraction=args.val_fraction,
                       image_format=args.format, overwrite=args.overwrite, kind=args.kind, **render_kwargs)
    for split, s in summary.items():
        print(f"{split}: {s['images']} images, {s['instances']} instances, {s['crowd_regions']} crowd regions -> {s['annotations']}")


if __name__ == "__main__":
    main()
