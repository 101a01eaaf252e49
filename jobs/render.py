"""Draw the batch job's results onto their images: PNG overlays read back from the output.

``python -m jobs.render --results OUT --out DIR [--limit N] [--run-id ID] [--min-score F]``

For the latest committed row of each image (or the rows of one run with ``--run-id``),
the source image is re-read from ``image_uri`` and decoded with ``jobs.infer.execute.decode``
(so EXIF orientation matches the stored width/height), then every instance scoring at
least ``min_score`` is drawn: a semi-transparent fill and a contour for its mask, its box,
and a tag with class name and score; a keypoint model's instances get their keypoints (those
scoring > 0, COCO's visibility rule) joined by the skeleton the output files name
(``mrcnn.keypoint_skeleton``; COCO's for its person keypoints). Colours are a fixed function
of the label index; tags are sized to the image and kept inside it.

Rows are read with pyarrow.dataset from the committed files only (``run_id=*/part-*``;
staging and run records are never read), on any fsspec filesystem; ``s3://`` honours
``AWS_ENDPOINT_URL`` through ``jobs.storage``. Error rows are not rendered; images
that cannot be rendered now (source gone, changed size, bad mask) are reported as
failures with a one-line reason instead of stopping the others.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from jobs.infer import schema
from jobs.infer.output import Output
from jobs.infer.execute.decode import DecodeError, decode_image
from jobs.storage import ReadError, join, read_object, resolve

FILL_ALPHA = 0.45  # weight of the label colour in a mask's fill
DEFAULT_MIN_SCORE = 0.5  # what users threshold at (same as the report's class counts)


# ------------------------------------------------------------------ reading rows

def read_latest(results_uri: str, *, run_id: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Committed rows, one per image (its latest), sorted by image_uri.

    Latest as everywhere (``schema.latest_rows``): highest ``processed_at``, then ``run_id``.
    With ``run_id`` only that run's rows are read (at most one per image).
    """
    output = Output(results_uri)
    fs, files = output.fs, output.committed_files()
    if not files:
        raise FileNotFoundError(f"no committed results (run_id=*/part-*.parquet) under {results_uri}")
    import pyarrow.dataset as pads

    # the output schema: files written before a column existed read it as nulls
    dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=schema.SCHEMA)
    flt = pc.field("run_id") == run_id if run_id is not None else None
    table = dataset.to_table(columns=list(columns) if columns else None, filter=flt)
    if run_id is not None and table.num_rows == 0:
        raise ValueError(f"run {run_id!r} has no committed rows under {results_uri}")
    # the keypoint names and skeleton of the newest file (run ids sort by time): one footer read
    return schema.latest_rows(table).replace_schema_metadata(schema.keypoint_metadata(fs, max(files)))


def keypoint_skeleton(table: pa.Table) -> list[list[int]] | None:
    """The skeleton a table from :func:`read_latest` declares, else COCO's when its keypoints are COCO's."""
    import json

    from mrcnn.coco_categories import default_keypoint_skeleton

    kv = table.schema.metadata or {}
    if schema.KEYPOINT_SKELETON_KEY in kv:
        return json.loads(kv[schema.KEYPOINT_SKELETON_KEY])
    return default_keypoint_skeleton(json.loads(kv[schema.KEYPOINT_NAMES_KEY]) if schema.KEYPOINT_NAMES_KEY in kv else None)


# ------------------------------------------------------------------ drawing

def label_color(label: int) -> tuple[int, int, int]:
    """A fixed RGB colour for a class index: hues spaced by the golden ratio, so
    neighbouring labels differ strongly and the colour never depends on the data."""
    hue = (0.11 + int(label) * 0.6180339887498949) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def decode_mask(counts: str, height: int, width: int) -> np.ndarray:
    """A stored mask_rle as an H x W bool array; ValueError if it is not height x width."""
    total, _ = schema.rle_counts_stats(counts)  # pycocotools does not check the length
    if total != height * width:
        raise ValueError(f"mask has {total} pixels, image is {height}x{width}")
    return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)


def _boundary(mask: np.ndarray) -> np.ndarray:
    # Mask pixels with a 4-neighbour outside the mask (image borders count as outside).
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _font(h: int, w: int):
    # about 1/18 of the short side, 8 to 16 px: legible without covering small images
    return ImageFont.load_default(size=int(min(16, max(8, round(min(h, w) / 18)))))


def _draw_keypoints(draw: ImageDraw.ImageDraw, keypoints, skeleton, color, radius: int, line: int) -> None:
    visible = [(k["x"], k["y"]) if k is not None and k["score"] is not None and k["score"] > 0 else None
               for k in keypoints]
    for a, b in skeleton or ():
        if a < len(visible) and b < len(visible) and visible[a] and visible[b]:
            draw.line([visible[a], visible[b]], fill=color, width=line + 1)
    for p in visible:
        if p:
            x, y = p
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))


def render_overlay(
    image: np.ndarray,
    instances: Iterable[Mapping[str, Any]],
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    skeleton: Sequence[Sequence[int]] | None = None,
) -> Image.Image:
    """``image`` (H x W x 3 uint8) with the instances scoring >= ``min_score`` drawn on it;
    instances with ``keypoints`` get them drawn, joined by ``skeleton`` (pairs of indices).

    Pixels outside every drawn mask, box, skeleton and tag (inside each box's top-left
    corner, moved left where it would leave the image) are left exactly as they were.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    chosen = [i for i in instances if i["score"] is not None and i["score"] >= min_score]
    chosen.sort(key=lambda i: i["score"])  # best drawn last, on top
    masks = [decode_mask(i["mask_rle"], h, w) if i.get("mask_rle") is not None else None for i in chosen]

    out = image.astype(np.float32)
    for inst, m in zip(chosen, masks):
        if m is not None:
            color = np.array(label_color(inst["label"]), dtype=np.float32)
            out[m] = out[m] * (1.0 - FILL_ALPHA) + color * FILL_ALPHA
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    for inst, m in zip(chosen, masks):
        if m is not None:
            out[_boundary(m)] = label_color(inst["label"])

    canvas = Image.fromarray(out, "RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(h, w)
    line = max(1, round(min(h, w) / 320))
    for inst in chosen:
        if inst.get("keypoints"):
            _draw_keypoints(draw, inst["keypoints"], skeleton, label_color(inst["label"]),
                            max(2, round(min(h, w) / 100)), line)
    for inst in chosen:
        color = label_color(inst["label"])
        x0, y0, x1, y1 = (float(v) for v in inst["bbox"])
        x0, x1 = (min(max(int(round(v)), 0), w - 1) for v in (x0, x1))
        y0, y1 = (min(max(int(round(v)), 0), h - 1) for v in (y0, y1))
        if x1 < x0 or y1 < y0:
            continue
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
        text = f"{inst['label_name'] or inst['label']} {inst['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 3
        # The tag sits inside the box's top-left corner, so it never hides unmarked pixels
        # of small neighbours above the box; it may run past a box narrower than the text,
        # and moves left (and up) where it would leave the image.
        tx, ty = max(0, min(x0, w - 1 - tw)), max(0, min(y0, h - 1 - th))
        draw.rectangle([tx, ty, min(tx + tw, w - 1), min(ty + th, h - 1)], fill=color)
        draw.text((tx + 2 - left, ty + 1 - top), text, fill=_text_color(color), font=font)
    return canvas


# ------------------------------------------------------------------ rendering rows

@dataclass
class RenderResult:
    paths: list[str] = field(default_factory=list)  # PNGs written, in image_uri order
    uris: list[str] = field(default_factory=list)  # the image each PNG shows
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image_uri, reason)
    error_rows: list[tuple[str, str, str]] = field(default_factory=list)  # (image_uri, error_kind, error) not rendered


def _png_name(index: int, uri: str) -> str:
    base = posixpath.basename(uri.rstrip("/")) or "image"
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.splitext(base)[0])[:60]
    return f"{index:05d}-{base}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}.png"


def render_row(row: Mapping[str, Any], *, min_score: float = DEFAULT_MIN_SCORE,
               skeleton: Sequence[Sequence[int]] | None = None) -> Image.Image:
    """The overlay for one ok row; ReadError, DecodeError or ValueError when it cannot be drawn."""
    image = decode_image(read_object(row["image_uri"]))
    h, w = image.shape[:2]
    if (w, h) != (row["width"], row["height"]):
        raise ValueError(
            f"source is {w}x{h} now but the row says {row['width']}x{row['height']} (changed since the run?)"
        )
    return render_overlay(image, row["instances"] or [], min_score=min_score, skeleton=skeleton)


def render_table(
    table: pa.Table,
    out_dir: str | None,
    *,
    limit: int | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    keep_images: bool = False,
    skeleton: Sequence[Sequence[int]] | None = None,
) -> tuple[RenderResult, list[Image.Image]]:
    """Render the ok rows of ``table`` (in its order) into ``out_dir`` (any fsspec URI).

    ``limit`` caps the PNGs written (images that fail do not count). With ``out_dir``
    None nothing is written; with ``keep_images`` the PIL images are returned too.
    ``skeleton``: the keypoint pairs to join (default: the table's ``mrcnn.keypoint_skeleton``
    metadata, as :func:`read_latest` keeps it).
    """
    if skeleton is None:
        skeleton = keypoint_skeleton(table)
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    result, images = RenderResult(), []
    fs = root = None
    if out_dir is not None:
        fs, root = resolve(out_dir)
        fs.makedirs(root, exist_ok=True)
    for row in table.to_pylist():
        if row["status"] != schema.STATUS_OK:
            result.error_rows.append((row["image_uri"], row["error_kind"] or "", row["error"] or ""))
            continue
        if limit is not None and len(result.uris) >= limit:
            continue  # keep scanning: error rows are still collected
        try:
            im = render_row(row, min_score=min_score, skeleton=skeleton)
        except (ReadError, DecodeError) as e:
            result.failures.append((row["image_uri"], e.reason))
            continue
        except ValueError as e:
            result.failures.append((row["image_uri"], schema.one_line(str(e))))
            continue
        result.uris.append(row["image_uri"])
        if fs is not None:
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=False)
            path = join(root, _png_name(len(result.uris) - 1, row["image_uri"]))
            fs.pipe_file(path, buf.getvalue())
            result.paths.append(join(out_dir, posixpath.basename(path)))
        if keep_images:
            images.append(im)
    return result, images


def render_results(
    results_uri: str,
    out_dir: str,
    *,
    limit: int | None = None,
    run_id: str | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
) -> list[str]:
    """PNG overlays of the latest ok row per image (or of run ``run_id``) under ``out_dir``;
    returns the paths written, in image_uri order."""
    table = read_latest(results_uri, run_id=run_id)
    result, _ = render_table(table, out_dir, limit=limit, min_score=min_score)
    return result.paths


# ------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="output root of jobs.infer (s3://... or local)")
    p.add_argument("--out", required=True, help="folder for the PNGs (s3://... or local)")
    p.add_argument("--limit", type=int, default=None, help="at most this many PNGs")
    p.add_argument("--run-id", default=None, help="only this run's rows (default: latest row per image)")
    p.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE, help="draw instances scoring >= this")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 0:
        p.error("--limit must be >= 0")
    try:
        table = read_latest(a.results, run_id=a.run_id)
        result, _ = render_table(table, a.out, limit=a.limit, min_score=a.min_score)
    except (FileNotFoundError, ValueError, PermissionError) as e:
        print(f"jobs.render: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for path in result.paths:
        print(path)
    for uri, reason in result.failures:
        print(f"not rendered: {uri}: {reason}", file=sys.stderr)
    print(
        f"{len(result.paths)} overlays written, {len(result.failures)} could not be rendered, "
        f"{len(result.error_rows)} error rows skipped",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
