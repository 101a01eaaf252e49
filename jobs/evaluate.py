"""COCO box and mask AP of the batch job's predictions against a COCO ground-truth file.

    python -m jobs.evaluate --gt s3://bucket/shapes/val/annotations.json --pred s3://bucket/out/ --out metrics.json
    python -m jobs.evaluate --gt .../val/annotations.json --pred model.pt      # runs the model first

``--pred`` is the Parquet output of the batch job (a file or a folder, read with pyarrow.dataset
through fsspec; names starting with ``_`` or ``.`` are skipped) or, when it ends in .pt/.pth/.ckpt,
a checkpoint to run over the ground-truth images first (``evaluate_checkpoint``). A model is
always evaluated by :func:`evaluate_predictor`: an ``mrcnn.Predictor`` over the GT images read
through the batch job's decoder and turned into the batch job's rows, so a checkpoint scores
here what ``jobs.infer`` would write; ``jobs.train`` evaluates its held-out split with it too.

How predictions meet the ground truth:

- Rows match GT images by name: the row's ``image_uri`` ends with the GT ``file_name``
  (``.../images/000017.png`` matches ``images/000017.png``); failing that, its basename equals
  the basename of exactly one GT ``file_name``. Rows of images outside the GT are counted
  (``unmatched_rows``) and ignored.
- Rows with ``status`` 'error' carry no predictions: they are counted and skipped. When an
  image has several 'ok' rows (re-runs), the latest wins: the greatest ``processed_at``, then
  ``run_id``, as everywhere (``jobs.infer.schema.latest_rows``).
- Categories are matched by name: each instance's ``label_name`` must be a GT category name;
  its COCO id comes from the GT file, so the model's own label numbering does not matter.
- Every GT image is evaluated; images without an 'ok' row count as having no detections
  (``missing_images``). ``--only-predicted`` restricts evaluation to images that have one.

Metrics are pycocotools COCOeval's twelve numbers for ``bbox`` and ``segm`` (the box results
carry no masks and the mask results no boxes, so each area range uses the right area, as
detectron2 does), written as JSON with the names AP, AP50, AP75, APs, APm, APl, AR1, AR10,
AR100, ARs, ARm, ARl, plus the counts above. ``segm`` is left out when no prediction has a
mask (a keypoint model).

Keypoints: when the predictions carry keypoints and the GT categories name theirs (COCO's
``keypoints`` list), ``keypoints`` holds COCOeval's ten numbers for ``iouType="keypoints"``
(AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl; OKS instead of IoU). Each prediction's
keypoints are put in the GT's order by name (the output files name theirs in their
``mrcnn.keypoint_names`` metadata), all marked visible, with the box score as the score, as
torchvision's reference does. The OKS sigmas are the GT category's ``keypoint_sigmas`` when it
has them (``jobs.synthetic`` writes them), else COCO's for its 17 person keypoints.
"""

import argparse
import contextlib
import copy
import io
import json
import posixpath

import numpy as np

from jobs.storage import resolve, write_atomic

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_STAT_NAMES = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
# COCO's per-keypoint OKS sigmas of its 17 person keypoints (pycocotools' default)
COCO_KEYPOINT_SIGMAS = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]
PRED_COLUMNS = ["image_uri", "width", "height", "status", "instances"]
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl")  # .pkl: a Detectron2 model zoo file


def coco_from_dict(doc):
    """A pycocotools COCO object of an annotation document (its index built without printing)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_gt(gt_json_uri, storage_options=None):
    """The ground-truth COCO object of a local or fsspec annotation file."""
    fs, path = resolve(gt_json_uri, storage_options)
    with fs.open(path, "rb") as f:
        doc = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ValueError(f"{gt_json_uri} is not a COCO detection file: no '{key}'")
    return coco_from_dict(doc)


class _ImageMatcher:
    """Finds the GT image of an image URI by file_name suffix, then by unique basename."""

    def __init__(self, images):
        self.by_base = {}
        for img in images:
            name = img["file_name"].replace("\\", "/")
            name = name[2:] if name.startswith("./") else name
            self.by_base.setdefault(posixpath.basename(name), []).append((name, img))

    def __call__(self, uri):
        uri = uri.replace("\\", "/")
        candidates = self.by_base.get(posixpath.basename(uri), [])
        for name, img in candidates:
            if uri == name or uri.endswith("/" + name):
                return img
        return candidates[0][1] if len(candidates) == 1 else None


def _category_ids(gt, rows_instances):
    names = {}
    for c in gt.dataset["categories"]:
        if c["name"] in names:
            raise ValueError(f"GT category name {c['name']!r} is used by two categories: cannot match predictions by name")
        names[c["name"]] = c["id"]
    used = {inst.get("label_name") for insts in rows_instances for inst in insts}
    unknown = sorted(map(str, used - set(names)))
    if unknown:
        raise ValueError(f"prediction label_name(s) {unknown} are not GT categories {sorted(names)}: "
                         "the model's class names must match the GT category names")
    return names


def gt_keypoint_spec(gt):
    """(keypoint names, OKS sigmas) of the GT's keypoint categories; (None, None) without keypoints.
    All keypoint categories must name the same keypoints."""
    specs = {(tuple(c["keypoints"]), tuple(c.get("keypoint_sigmas") or ())) for c in gt.dataset["categories"]
             if c.get("keypoints")}
    if not specs:
        return None, None
    if len(specs) > 1:
        raise ValueError("GT categories name different keypoints: cannot evaluate them together")
    names, sigmas = specs.pop()
    if not sigmas:
        if len(names) != len(COCO_KEYPOINT_SIGMAS):
            raise ValueError(f"GT names {len(names)} keypoints and gives no keypoint_sigmas; COCO's sigmas are "
                             f"for its {len(COCO_KEYPOINT_SIGMAS)} person keypoints")
        sigmas = [v / 10.0 for v in COCO_KEYPOINT_SIGMAS]
    if len(sigmas) != len(names):
        raise ValueError(f"GT keypoint_sigmas has {len(sigmas)} values for {len(names)} keypoints")
    return list(names), [float(v) for v in sigmas]


def _keypoint_order(gt_names, pred_names):
    """Index into the predictions' keypoints of each GT keypoint (by name; in order when the
    predictions do not name theirs)."""
    if pred_names is None:
        return list(range(len(gt_names)))
    missing = [n for n in gt_names if n not in pred_names]
    if missing:
        raise ValueError(f"GT keypoint(s) {missing} are not among the predictions' keypoints {list(pred_names)}")
    return [list(pred_names).index(n) for n in gt_names]


def _summarize(gt, results, iou_type, img_ids, sigmas=None):
    from pycocotools.cocoeval import COCOeval

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if results:
            dt = gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list: an empty result set scores 0
            dt = coco_from_dict({"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []})
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = img_ids
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas)
        ev.evaluate()
        ev.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        ev.summarize()
    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
    return {name: float(v) for name, v in zip(names, ev.stats)}, table.getvalue()


def evaluate_predictions(gt_json_uri, pred_rows, *, only_predicted=False, storage_options=None, keypoint_names=None):
    """COCO bbox, segm (and keypoint) metrics of prediction rows (dicts in the batch job's schema).

    gt_json_uri may also be a pycocotools COCO object. ``keypoint_names``: the order of the
    rows' keypoints (default: the GT's). Returns {"bbox": {AP..ARl}, "segm": {...},
    ["keypoints": {...},] "counts": {...}, "tables": {"bbox": text, ...}}.
    """
    gt = gt_json_uri if hasattr(gt_json_uri, "dataset") else load_gt(gt_json_uri, storage_options)
    match = _ImageMatcher(gt.dataset["images"])
    counts = dict(rows=0, error_rows=0, unmatched_rows=0, duplicate_rows=0)
    latest = {}  # GT image id -> row
    for row in pred_rows:
        counts["rows"] += 1
        if row.get("status") != "ok":
            counts["error_rows"] += 1
            continue
        img = match(row["image_uri"])
        if img is None:
            counts["unmatched_rows"] += 1
            continue
        if (row.get("width"), row.get("height")) != (img["width"], img["height"]):
            raise ValueError(f"{row['image_uri']}: prediction row is {row.get('width')}x{row.get('height')} but GT image "
                             f"{img['file_name']} is {img['width']}x{img['height']}")
        prev = latest.get(img["id"])
        if prev is not None:
            counts["duplicate_rows"] += 1
            if _later(row, prev):  # the latest run wins
                latest[img["id"]] = row
        else:
            latest[img["id"]] = row

    names = _category_ids(gt, [r.get("instances") or [] for r in latest.values()])
    gt_kp_names, sigmas = gt_keypoint_spec(gt)
    order = _keypoint_order(gt_kp_names, keypoint_names) if gt_kp_names else None
    boxes, segms, keypoints, no_mask = [], [], [], 0
    keypoint_model = keypoint_names is not None or any(
        inst.get("keypoints") for r in latest.values() for inst in r.get("instances") or [])
    for img_id, row in latest.items():
        h, w = row["height"], row["width"]
        for inst in row.get("instances") or []:
            cat, score = names[inst["label_name"]], float(inst["score"])
            x0, y0, x1, y1 = (float(v) for v in inst["bbox"])
            boxes.append({"image_id": img_id, "category_id": cat, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            if inst.get("mask_rle"):
                segms.append({"image_id": img_id, "category_id": cat, "score": score,
                              "segmentation": {"size": [h, w], "counts": inst["mask_rle"]}})
            else:
                no_mask += 1
            if order is not None and inst.get("keypoints"):
                kps = inst["keypoints"]
                if max(order) >= len(kps):
                    raise ValueError(f"{row['image_uri']}: an instance has {len(kps)} keypoints, the GT names {len(order)}")
                flat = [v for k in order for v in (float(kps[k]["x"]), float(kps[k]["y"]), 1.0)]
                keypoints.append({"image_id": img_id, "category_id": cat, "score": score, "keypoints": flat})

    gt_ids = sorted(gt.getImgIds())
    img_ids = sorted(latest) if only_predicted else gt_ids
    counts.update(gt_images=len(gt_ids), evaluated_images=len(img_ids), predicted_images=len(latest),
                  missing_images=len(set(gt_ids) - set(latest)), detections=len(boxes), detections_without_mask=no_mask)
    counts["detections_with_keypoints"] = len(keypoints)
    result = {"counts": counts, "tables": {}}
    kinds = [("bbox", boxes, None)]
    if segms or not keypoint_model:  # a keypoint model's rows have no masks to score
        kinds.append(("segm", segms, None))
    if keypoint_model and gt_kp_names:
        kinds.append(("keypoints", keypoints, sigmas))
    for iou_type, results, kind_sigmas in kinds:
        result[iou_type], result["tables"][iou_type] = _summarize(gt, results, iou_type, img_ids, kind_sigmas)
    return result


def _later(row, prev):
    """Is ``row`` later than ``prev`` by ``schema.LATEST_FIRST`` (processed_at, then run_id)? Rows
    with a value beat rows without one."""
    from jobs.infer.schema import LATEST_FIRST

    for column, _ in LATEST_FIRST:
        a, b = row.get(column), prev.get(column)
        if a != b:
            return a is not None and (b is None or a > b)
    return False


def read_prediction_rows(pred_uri, storage_options=None):
    """Rows of the batch job's Parquet output (a file or a folder) as dicts (see also
    :func:`read_keypoint_names`)."""
    import pyarrow.dataset as pads

    fs, path = resolve(pred_uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"no predictions at {pred_uri}")
    dataset = pads.dataset(path.rstrip("/"), filesystem=fs, format="parquet")
    missing = [c for c in PRED_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{pred_uri} lacks column(s) {missing}: not the batch job's output schema")
    columns = PRED_COLUMNS + [c for c in ("processed_at", "run_id") if c in dataset.schema.names]
    return dataset.to_table(columns=columns).to_pylist()


def read_keypoint_names(pred_uri, storage_options=None):
    """The keypoint names the output files at pred_uri declare (``mrcnn.keypoint_names``);
    None when they declare none. Files that declare different names are refused."""
    import pyarrow.dataset as pads

    from jobs.infer.schema import KEYPOINT_NAMES_KEY, keypoint_metadata

    fs, path = resolve(pred_uri, storage_options)
    found = set()
    for f in pads.dataset(path.rstrip("/"), filesystem=fs, format="parquet").files:
        value = keypoint_metadata(fs, f).get(KEYPOINT_NAMES_KEY)
        if value is not None:
            found.add(tuple(json.loads(value)))
    if len(found) > 1:
        raise ValueError(f"{pred_uri}: files name different keypoints {sorted(found)}")
    return list(found.pop()) if found else None


def evaluate_parquet(gt, pred_uri, *, only_predicted=False, storage_options=None):
    """evaluate_predictions over the batch job's Parquet output at pred_uri."""
    return evaluate_predictions(gt, read_prediction_rows(pred_uri, storage_options),
                                only_predicted=only_predicted, storage_options=storage_options,
                                keypoint_names=read_keypoint_names(pred_uri, storage_options))


def predict_gt_images(predictor, gt_coco, images_root, *, batch_size=4, storage_options=None):
    """Batch-job rows of ``predictor`` (an ``mrcnn.Predictor``) over the images of a COCO object.

    Images are read from ``images_root`` joined with each ``file_name``, decoded by the batch
    job's decoder (``jobs.infer.execute.decode``: large JPEGs DCT-downscaled to the model's input, as
    ``jobs.infer``'s default ``--decode sized``) and turned into rows by the batch job's row builder
    (``jobs.infer.schema.ok_row``), so what is scored here is what ``jobs.infer`` would write.
    An image that fails to decode becomes an error row.
    """
    from jobs.infer import schema
    from jobs.infer.execute.decode import DecodeError, decode_for_model

    fs, root = resolve(images_root, storage_options)
    images = gt_coco.dataset["images"]
    ids = dict(source_etag=None, source_size=None, model_name="", checkpoint_sha256="", run_id="")
    model_input = predictor.input_size
    rows = []
    for start in range(0, len(images), batch_size):
        decoded = []
        for img in images[start:start + batch_size]:
            uri = fs.unstrip_protocol(posixpath.join(root, img["file_name"]))
            try:
                decoded.append((uri, *decode_for_model(fs.cat_file(uri), model_input)))
            except DecodeError as e:
                rows.append(schema.error_row(reason=e.reason, kind=e.kind, image_uri=uri, **ids))
        results = predictor([arr for _, arr, _ in decoded], output_sizes=[(h, w) for _, _, (w, h) in decoded])
        for (uri, _, (w, h)), res in zip(decoded, results):
            rows.append(schema.ok_row(res, image_uri=uri, width=w, height=h, **ids))
    return rows


def evaluate_predictor(predictor, gt, *, images_root=None, batch_size=4, max_images=None, only_predicted=False,
                       storage_options=None):
    """COCO metrics of ``predictor`` over a COCO file's images (:func:`predict_gt_images`).

    The one evaluation path of a model: ``jobs.evaluate --pred model.pt`` and ``jobs.train``'s
    held-out evaluation use it (the demo scores the batch job's Parquet, :func:`evaluate_parquet`). ``max_images``: the first N GT images only.
    """
    gt_coco = load_gt(gt, storage_options)
    if max_images is not None:
        doc = gt_coco.dataset
        keep = {im["id"] for im in doc["images"][:max_images]}
        gt_coco = coco_from_dict({**doc, "images": [im for im in doc["images"] if im["id"] in keep],
                                  "annotations": [a for a in doc["annotations"] if a["image_id"] in keep]})
    if images_root is None:  # the GT file's folder, with its protocol
        fs, gt_path = resolve(gt, storage_options)
        images_root = fs.unstrip_protocol(posixpath.dirname(gt_path))
    rows = predict_gt_images(predictor, gt_coco, images_root, batch_size=batch_size, storage_options=storage_options)
    return evaluate_predictions(gt_coco, rows, only_predicted=only_predicted,
                                keypoint_names=getattr(predictor, "keypoint_names", None))


def evaluate_checkpoint(gt, checkpoint, *, images_root=None, device="cpu", batch_size=4, only_predicted=False,
                        storage_options=None, **predictor_kwargs):
    """:func:`evaluate_predictor` of ``Predictor.from_checkpoint(checkpoint, device=..., **predictor_kwargs)``."""
    from mrcnn.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device=device, **predictor_kwargs)
    return evaluate_predictor(predictor, gt, images_root=images_root, batch_size=batch_size,
                              only_predicted=only_predicted, storage_options=storage_options)


def format_report(result):
    c = result["counts"]
    lines = [
        f"images: {c['gt_images']} in GT, {c['evaluated_images']} evaluated, {c['predicted_images']} with predictions, "
        f"{c['missing_images']} without; rows: {c['rows']} read, {c['error_rows']} status=error, "
        f"{c['duplicate_rows']} duplicates, {c['unmatched_rows']} not in GT; detections: {c['detections']}",
    ]
    for iou_type in ("bbox", "segm", "keypoints"):
        if iou_type in result["tables"]:
            lines += [f"--- {iou_type} ---", result["tables"][iou_type].rstrip()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--gt", required=True, help="COCO annotation JSON (local or fsspec URI)")
    p.add_argument("--pred", required=True, help="batch job Parquet output (file or folder), or a checkpoint (.pt/.pth/.ckpt, or a Detectron2 .pkl)")
    p.add_argument("--out", help="write the metrics as JSON here (local or fsspec URI)")
    p.add_argument("--only-predicted", action="store_true", help="evaluate only the GT images that have an 'ok' prediction row")
    p.add_argument("--images-root", help="with a checkpoint: folder the GT file_names are relative to (default: the GT file's folder)")
    p.add_argument("--device", default="cpu", help="with a checkpoint: torch device")
    p.add_argument("--model-config", help="with a Detectron2 checkpoint (.pth/.pkl): its YAML config "
                                          "(default: Detectron2's defaults)")
    args = p.parse_args(argv)
    if args.pred.rstrip("/").endswith(CHECKPOINT_SUFFIXES):
        result = evaluate_checkpoint(args.gt, args.pred, images_root=args.images_root, device=args.device,
                                     only_predicted=args.only_predicted, config=args.model_config)
    else:
        if args.model_config:
            p.error("--model-config goes with a checkpoint in --pred, not with Parquet rows")
        result = evaluate_parquet(args.gt, args.pred, only_predicted=args.only_predicted)
    print(format_report(result))
    if args.out:
        fs, path = resolve(args.out)
        write_atomic(fs, path, json.dumps({k: v for k, v in result.items() if k != "tables"}, indent=2).encode())
        print(f"metrics written to {args.out}")


if __name__ == "__main__":
    main()
