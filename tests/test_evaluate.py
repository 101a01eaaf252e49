"""COCO evaluation of batch-job Parquet output: perfect predictions score 1, damaged ones less."""

import datetime as dt
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from jobs import evaluate, synthetic
from jobs.infer import schema

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
META = dict(source_etag=None, source_size=None, model_name="test", checkpoint_sha256="0" * 64, run_id="r1")


def _erode(m):
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def _rows_from_gt(gt, *, prefix="s3://bucket/run/", keep=lambda k: True, mask_fn=None, processed_at=T0):
    """Prediction rows (batch-job schema) that repeat the GT: score 1, labels numbered unlike COCO ids."""
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    rows, k = [], 0
    for img in gt.dataset["images"]:
        boxes, labels, names_, masks, areas = [], [], [], [], []
        for a in gt.loadAnns(gt.getAnnIds(imgIds=img["id"], iscrowd=False)):
            k += 1
            if not keep(k):
                continue
            m = gt.annToMask(a)
            if mask_fn is not None:
                m = mask_fn(m)
            x, y, w, h = a["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(100 - a["category_id"])  # the model's own numbering: must not matter
            names_.append(names[a["category_id"]])
            masks.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
            areas.append(int(m.sum()))
        result = dict(boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=labels, scores=[1.0] * len(labels),
                      label_names=names_, masks=masks, areas=areas)
        rows.append(schema.ok_row(result, image_uri=prefix + img["file_name"], width=img["width"],
                                  height=img["height"], processed_at=processed_at, **META))
    return rows


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthetic.generate(str(root), 10, seed=11, size="64/96", val_fraction=0.5, crowd_prob=0.6,
                       min_objects=3, max_objects=6)
    return root / "val" / "annotations.json"


def _n_instances(gt):
    return len(gt.getAnnIds(iscrowd=False))


def _write(rows, path):
    path.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2  # two files, as a multi-task job writes them
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(schema.rows_to_table(part), path / f"part-{i}.parquet", **schema.PARQUET_WRITE_OPTIONS)
    return path


def test_ground_truth_scores_one(gt_path, tmp_path):
    gt = evaluate.load_gt(str(gt_path))
    assert any(a["iscrowd"] for a in gt.dataset["annotations"])  # crowd regions are in the GT
    rows = _rows_from_gt(gt)
    # Noise the evaluation must see through: an older bad run of image 0, an error row,
    # and a row of an image that is not in the GT.
    stale = _rows_from_gt(gt, keep=lambda k: False, processed_at=T0 - dt.timedelta(days=1))[0]
    rows += [stale,
             schema.error_row(image_uri="s3://bucket/run/" + gt.dataset["images"][1]["file_name"], reason="decode failed", kind="decode",
                              processed_at=T0 + dt.timedelta(hours=1), **META),
             schema.error_row(image_uri="s3://bucket/run/images/broken.png", reason="truncated", kind="decode", **META),
             dict(rows[0], image_uri="s3://bucket/run/images/999999.png")]
    out = _write(rows, tmp_path / "pred")
    (out / "_staging").mkdir()
    (out / "_staging" / "junk.parquet").write_bytes(b"not parquet")  # skipped like Spark does

    result = evaluate.evaluate_parquet(str(gt_path), str(out))
    c = result["counts"]
    assert c["gt_images"] == c["evaluated_images"] == c["predicted_images"] == 5
    assert (c["rows"], c["error_rows"], c["duplicate_rows"], c["unmatched_rows"], c["missing_images"]) == (9, 2, 1, 1, 0)
    assert c["detections"] == _n_instances(gt) >= 15
    for iou_type in ("bbox", "segm"):
        stats = result[iou_type]
        assert list(stats) == evaluate.STAT_NAMES
        assert stats["AP"] == stats["AP50"] == stats["AP75"] == stats["AR100"] == 1.0, (iou_type, stats)
        # -1 marks an area range with no GT; AR1 is below 1 as images hold several objects.
        assert stats["APs"] == stats["AR10"] == 1.0, (iou_type, stats)
        assert all(v in (1.0, -1.0) for k, v in stats.items() if k != "AR1"), (iou_type, stats)


def test_damaged_predictions_score_lower(gt_path):
    gt = evaluate.load_gt(str(gt_path))
    n = _n_instances(gt)
    dropped = evaluate.evaluate_predictions(gt, _rows_from_gt(gt, keep=lambda k: k % 3 != 0))
    assert dropped["counts"]["detections"] == n - n // 3
    for iou_type in ("bbox", "segm"):
        # Recall is capped at 2/3: AP can be no higher.
        assert 0.4 < dropped[iou_type]["AP"] < 0.75 and dropped[iou_type]["AR100"] < 0.75

    eroded = evaluate.evaluate_predictions(gt, _rows_from_gt(gt, mask_fn=lambda m: _erode(_erode(m.astype(bool)))))
    assert eroded["bbox"]["AP"] == 1.0  # boxes untouched
    assert eroded["segm"]["AP"] < 0.6 and eroded["segm"]["AP75"] < eroded["segm"]["AP50"]

    shifted = evaluate.evaluate_predictions(gt, _rows_from_gt(gt, mask_fn=lambda m: np.roll(m, 6, axis=1)))
    assert shifted["segm"]["AP"] < 0.6 and shifted["bbox"]["AP"] == 1.0


def test_categories_match_by_name(gt_path, tmp_path):
    doc = json.loads(gt_path.read_text())
    remap = {1: 30, 2: 10, 3: 20}  # same names, other ids and order
    for c in doc["categories"]:
        c["id"] = remap[c["id"]]
    for a in doc["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    rows = _rows_from_gt(evaluate.load_gt(str(gt_path)))
    result = evaluate.evaluate_predictions(str(tmp_path / "gt.json"), rows)
    assert result["bbox"]["AP"] == result["segm"]["AP"] == 1.0

    rows[0]["instances"][0]["label_name"] = "hexagon"
    with pytest.raises(ValueError, match=r"\['hexagon'\].*circle"):
        evaluate.evaluate_predictions(str(gt_path), rows)


def test_missing_images_and_only_predicted(gt_path):
    gt = evaluate.load_gt(str(gt_path))
    rows = _rows_from_gt(gt)[1:]
    full = evaluate.evaluate_predictions(gt, rows)
    assert full["counts"]["missing_images"] == 1 and full["counts"]["evaluated_images"] == 5
    assert full["bbox"]["AR100"] < 1.0
    only = evaluate.evaluate_predictions(gt, rows, only_predicted=True)
    assert only["counts"]["evaluated_images"] == 4 and only["bbox"]["AP"] == 1.0
    none = evaluate.evaluate_predictions(gt, [])
    assert none["bbox"]["AP"] == 0.0 and none["counts"]["missing_images"] == 5


def test_size_mismatch_and_bad_files(gt_path, tmp_path):
    gt = evaluate.load_gt(str(gt_path))
    rows = _rows_from_gt(gt)
    rows[0]["width"] += 1
    with pytest.raises(ValueError, match="GT image"):
        evaluate.evaluate_predictions(gt, rows)
    pq.write_table(schema.rows_to_table(rows).drop_columns(["instances"]), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="instances"):
        evaluate.evaluate_parquet(str(gt_path), str(tmp_path / "x.parquet"))
    with pytest.raises(FileNotFoundError):
        evaluate.evaluate_parquet(str(gt_path), str(tmp_path / "nothing"))


def test_cli_prints_table_and_writes_json(gt_path, tmp_path, capsys):
    out = _write(_rows_from_gt(evaluate.load_gt(str(gt_path))), tmp_path / "pred")
    evaluate.main(["--gt", str(gt_path), "--pred", str(out), "--out", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert printed.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000") == 2
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics["bbox"]) == list(metrics["segm"]) == evaluate.STAT_NAMES
    assert metrics["segm"]["AP"] == 1.0 and metrics["counts"]["error_rows"] == 0


@pytest.mark.slow  # starts an S3 server (about 1 s here)
def test_reads_gt_and_predictions_from_s3(s3_bucket, gt_path):
    import s3fs

    gt = evaluate.load_gt(str(gt_path))
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{s3_bucket}/gt/annotations.json", gt_path.read_bytes())
    with fs.open(f"{s3_bucket}/pred/run_id=r1/part-0.parquet", "wb") as f:
        pq.write_table(schema.rows_to_table(_rows_from_gt(gt)), f, **schema.PARQUET_WRITE_OPTIONS)
    result = evaluate.evaluate_parquet(f"s3://{s3_bucket}/gt/annotations.json", f"s3://{s3_bucket}/pred/")
    assert result["counts"]["predicted_images"] == 5
    assert result["bbox"]["AP"] == result["segm"]["AP"] == 1.0


def test_checkpoint_path_runs_the_predictor_api(gt_path, monkeypatch):
    # The plumbing of evaluate_checkpoint (decode, Predictor call, batch-job rows, evaluation) against
    # an autospec of the real Predictor: a call the real class does not have fails here.
    from unittest import mock

    from mrcnn.predictor import Predictor

    gt = evaluate.load_gt(str(gt_path))
    expected = _rows_from_gt(gt)
    seen = []

    def predict(images, output_sizes=None):
        out = []
        assert len(output_sizes) == len(images)
        for arr, size in zip(images, output_sizes):
            row = expected[len(seen)]
            assert arr.shape == (row["height"], row["width"], 3) and arr.dtype == np.uint8
            assert size == (row["height"], row["width"])  # small images: decoded at full size
            seen.append(arr)
            insts = row["instances"]
            out.append({"boxes": np.array([i["bbox"] for i in insts], np.float32).reshape(-1, 4),
                        "labels": np.array([i["label"] for i in insts], np.int64),
                        "scores": np.array([i["score"] for i in insts], np.float32),
                        "label_names": [i["label_name"] for i in insts],
                        "areas": np.array([i["area"] for i in insts], np.int64),
                        "masks": [{"size": [row["height"], row["width"]], "counts": i["mask_rle"].encode()}
                                  for i in insts]})
        return out

    predictor = mock.create_autospec(Predictor, instance=True, side_effect=predict)
    predictor.input_size = (800, 1333)
    from_checkpoint = mock.create_autospec(Predictor.from_checkpoint, return_value=predictor)
    monkeypatch.setattr(Predictor, "from_checkpoint", from_checkpoint)
    result = evaluate.evaluate_checkpoint(str(gt_path), "model.pt", batch_size=2)
    from_checkpoint.assert_called_once_with("model.pt", device="cpu")
    assert predictor.call_count == 3  # 5 images in batches of 2
    assert len(seen) == 5 and result["counts"]["predicted_images"] == 5
    assert result["counts"]["detections"] == sum(len(r["instances"]) for r in expected) > 0
    assert result["bbox"]["AP"] == result["segm"]["AP"] == 1.0


def test_rows_of_the_same_time_go_to_the_later_run(gt_path):
    """Latest as everywhere (schema.latest_rows): greatest processed_at, then run_id."""
    gt = evaluate.load_gt(str(gt_path))
    good, empty = _rows_from_gt(gt), _rows_from_gt(gt, keep=lambda k: False)
    for later, earlier in ((good, empty), (empty, good)):
        rows = [dict(r, run_id="20261201T000000Z-bbbbbb") for r in later]
        rows += [dict(r, run_id="20261201T000000Z-aaaaaa") for r in earlier]
        for order in (rows, rows[::-1]):  # whichever comes first
            result = evaluate.evaluate_predictions(gt, order)
            assert result["counts"]["duplicate_rows"] == 5
            assert result["segm"]["AP"] == (1.0 if later is good else 0.0)
