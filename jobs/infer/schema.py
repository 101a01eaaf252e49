"""The output schema of the batch-inference job: the one place that defines it.

One Parquet row per input image. Every writer builds rows with :func:`ok_row` or
:func:`error_row`, turns them into a table with :func:`rows_to_table`, and writes with
:data:`PARQUET_WRITE_OPTIONS`; :func:`validate_table` checks a table against the contract.

Columns (``SCHEMA`` carries the same text as field metadata, key ``description``):

========================  ===================================================================
image_uri (string)        canonical URI of the source image (``s3://b/k``, ``gs://...``,
                          ``file:///abs/path``); never null
source_etag (string)      opaque change token of the source (S3 ETag without quotes; local
                          files ``mtime_ns-size``, see ``plan/sources.py``); null if not known
source_size (int64)       source size in bytes; null if not known (e.g. missing object)
width, height (int32)     size of the decoded image after EXIF orientation; null when the
                          image could not be decoded and the header gave no size
status (string)           ``'ok'`` or ``'error'``; never null
error (string)            one-line reason when status is ``'error'``, else null
error_kind (string)       why an error row failed, one of :data:`ERROR_KINDS`, else null;
                          storage kinds (:data:`RETRYABLE_ERROR_KINDS`) mean the bytes were
                          never seen, so the next run processes the image again
instances (list<struct>)  detections of an ok row ([] when there are none); null for errors:
  label (int32)             model class index
  label_name (string)       class name
  score (float32)           confidence in [0, 1]
  bbox (list<float32>)      [x0, y0, x1, y1] in pixels of the decoded image
  area (int64)              mask area in pixels; null for a model without masks
  mask_rle (string)         COCO compressed RLE ``counts`` of a height x width mask
                            (column-major, as pycocotools writes it); decode with
                            ``{"size": [height, width], "counts": mask_rle}``; null for a
                            model without masks (Keypoint R-CNN)
  keypoints (list<struct>)  a keypoint model's keypoints, one per keypoint type in the
                            order of the file's ``mrcnn.keypoint_names`` metadata (and the
                            run manifest's ``keypoint_names``; COCO's 17 person keypoints
                            for torchvision's model; ``mrcnn.keypoint_skeleton`` holds the
                            0-based index pairs a drawing joins); null for a model without
                            keypoints:
    x, y (float32)            position in pixels of the decoded image
    score (float32)           the keypoint's heatmap logit (COCO's evaluation treats a
                              keypoint as visible when it is > 0)
model_name (string)       name of the model that produced the row
checkpoint_sha256 (str)   SHA-256 (hex) of the checkpoint file; with ``--model-config`` or
                          ``--class-names``, of it and of the settings and names those give
settings (string)         the run's output settings that differ from the checkpoint's own, as
                          canonical JSON (``{"max_instances": 50, "precision": "fp16",
                          "score_thresh": 0.3}``, only the keys given); null = none given
run_id (string)           the run that wrote the row (also the Hive partition ``run_id=``)
processed_at (timestamp)  when the row was produced: timestamp[us, tz=UTC]; never null
========================  ===================================================================

Types are chosen for Spark, DuckDB and Arrow alike: no float16, no unsigned ints, no
nanosecond timestamps, no fixed-size lists or tensor extension types.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# ------------------------------------------------------------------ the plan: what the job reads

@dataclass(frozen=True, slots=True)
class SourceObject:
    """One input: canonical URI, change token and size (None when unknown), under the names of
    the output's columns for them (the plan files and the result rows use the same).

    ``error`` is set when the object could not even be stat'ed (e.g. a list-file entry
    that does not exist), with its error kind in ``error_kind``; the job turns such items
    into error rows (or, for a storage kind, tries to read them anyway).
    """

    image_uri: str
    source_etag: str | None
    source_size: int | None
    error: str | None = None
    error_kind: str | None = None


SHARD_COLUMN = "shard_id"
# an image in the plan and the batches, under its output columns' names (source_size -1: unknown)
PLAN_ITEM_COLUMNS = ("image_uri", "source_etag", "source_size")
# The plan: what the pipeline reads (the output's column names, and the shard)
PLAN_SCHEMA = pa.schema(
    [("image_uri", pa.string()), ("source_etag", pa.string()), ("source_size", pa.int64()), ("error", pa.string()),
     ("error_kind", pa.string()), (SHARD_COLUMN, pa.string())]
)


# ------------------------------------------------------------------ the rows: what the job writes

STATUS_OK = "ok"
STATUS_ERROR = "error"
# error_kind values. The first three are storage failures (the image's bytes were never
# seen): incremental runs plan them again. The others are about the image itself.
ERROR_KINDS = {
    "unavailable": "storage throttled, unreachable or failing (5xx, timeouts, connection errors, "
                   "expired credentials) after the run's retries",
    "access": "access to the object denied",
    "read": "another storage failure",
    "not_found": "the object does not exist (or is not a file)",
    "limit": "over the run's limits (file bytes, pixels, aspect ratio)",
    "decode": "not a usable image (corrupt, truncated, unsupported format or pixel mode)",
    "model": "the model failed on this image",
}
RETRYABLE_ERROR_KINDS = frozenset({"unavailable", "access", "read"})
MAX_ERROR_CHARS = 500  # error strings are one line, capped so a hostile input cannot bloat rows


def _f(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


KEYPOINT_TYPE = pa.struct(
    [
        _f("x", pa.float32(), "x in pixels"),
        _f("y", pa.float32(), "y in pixels"),
        _f("score", pa.float32(), "heatmap logit of the keypoint"),
    ]
)
# file metadata naming the keypoints (JSON list), in files written by a keypoint model
KEYPOINT_NAMES_KEY = b"mrcnn.keypoint_names"
KEYPOINT_SKELETON_KEY = b"mrcnn.keypoint_skeleton"  # and the pairs of keypoint indices drawings join


def keypoint_metadata(fs, path: str) -> dict:
    """The keypoint metadata (KEYPOINT_NAMES_KEY, KEYPOINT_SKELETON_KEY: JSON bytes) of one output
    file, from its footer alone; {} for a file of a model without keypoints."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        kv = pq.read_metadata(f).metadata or {}
    return {k: v for k, v in kv.items() if k in (KEYPOINT_NAMES_KEY, KEYPOINT_SKELETON_KEY)}

INSTANCE_TYPE = pa.struct(
    [
        _f("label", pa.int32(), "model class index"),
        _f("label_name", pa.string(), "class name"),
        _f("score", pa.float32(), "confidence in [0, 1]"),
        _f("bbox", pa.list_(pa.float32()), "[x0, y0, x1, y1] in pixels"),
        _f("area", pa.int64(), "mask area in pixels; null without masks"),
        _f("mask_rle", pa.string(), "COCO compressed RLE counts of a height x width mask; null without masks"),
        _f("keypoints", pa.list_(KEYPOINT_TYPE),
           "keypoints (x, y, score) in the order of the mrcnn.keypoint_names metadata; null without keypoints"),
    ]
)

SCHEMA = pa.schema(
    [
        _f("image_uri", pa.string(), "canonical URI of the source image", nullable=False),
        _f("source_etag", pa.string(), "opaque change token of the source object"),
        _f("source_size", pa.int64(), "source size in bytes"),
        _f("width", pa.int32(), "decoded width after EXIF orientation"),
        _f("height", pa.int32(), "decoded height after EXIF orientation"),
        _f("status", pa.string(), "'ok' or 'error'", nullable=False),
        _f("error", pa.string(), "one-line reason when status is 'error'"),
        _f("error_kind", pa.string(), "why an error row failed: " + ", ".join(ERROR_KINDS)),
        _f("instances", pa.list_(INSTANCE_TYPE), "detections; [] if none, null on error"),
        _f("model_name", pa.string(), "model that produced the row"),
        _f("checkpoint_sha256", pa.string(), "SHA-256 of the checkpoint file (and of the model config and class names given with it)"),
        _f("settings", pa.string(), "output settings given to the run (JSON), null = the checkpoint's own"),
        _f("run_id", pa.string(), "run that wrote the row", nullable=False),
        _f("processed_at", pa.timestamp("us", tz="UTC"), "when the row was produced", nullable=False),
    ]
)

# Passed to pyarrow.parquet.write_table by every writer. Microsecond timestamps because
# Spark cannot read timestamp[ns]; zstd is read by Spark 3+, DuckDB and Arrow.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "coerce_timestamps": "us",
    "allow_truncated_timestamps": False,
    "store_schema": True,
}


def settings_key(*, score_thresh: float | None = None, max_instances: int | None = None,
                 precision: str | None = None, decode: str = "sized") -> str | None:
    """The ``settings`` value of a run: canonical JSON of the settings given, None if none
    (``decode`` is given when it is not the default, "sized")."""
    given = {k: v for k, v in (("decode", None if decode == "sized" else decode), ("max_instances", max_instances),
                               ("precision", precision), ("score_thresh", score_thresh)) if v is not None}
    return json.dumps(given, sort_keys=True, separators=(", ", ": ")) if given else None


def one_line(text: str) -> str:
    """Collapse whitespace to single spaces and cap the length: error reasons are one line."""
    text = " ".join(str(text).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text


def _utc(ts: _dt.datetime | None) -> _dt.datetime:
    if ts is None:
        return _dt.datetime.now(_dt.timezone.utc)
    if ts.tzinfo is None:
        raise ValueError("processed_at must be timezone-aware (UTC)")
    return ts.astimezone(_dt.timezone.utc)


def _counts_str(counts: Any) -> str:
    # pycocotools returns bytes; the column is a string.
    if isinstance(counts, bytes):
        return counts.decode("ascii")
    if isinstance(counts, str):
        return counts
    raise ValueError(f"mask counts must be a COCO compressed RLE string, got {type(counts).__name__}")


def ok_row(
    result: Mapping[str, Any],
    *,
    image_uri: str,
    source_etag: str | None,
    source_size: int | None,
    width: int,
    height: int,
    model_name: str,
    checkpoint_sha256: str,
    run_id: str,
    processed_at: _dt.datetime | None = None,
    settings: str | None = None,
) -> dict[str, Any]:
    """A row for a decoded image from one Predictor result.

    ``result`` holds ``boxes`` (N,4) float, ``labels`` (N,) int, ``scores`` (N,) float,
    ``label_names`` list[str]; a mask model's ``areas`` (N,) int and ``masks``, N COCO RLE
    dicts whose ``size`` must be ``[height, width]``; a keypoint model's ``keypoints`` (N, K, 3)
    float (x, y, score). Inconsistent results raise ValueError: they are a model bug, not bad
    input.
    """
    boxes = np.asarray(result["boxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(result["labels"]).reshape(-1)
    scores = np.asarray(result["scores"], dtype=np.float32).reshape(-1)
    names = list(result["label_names"])
    n = len(boxes)
    lengths = {"labels": len(labels), "scores": len(scores), "label_names": len(names)}
    has_masks = "masks" in result
    if has_masks:
        areas = np.asarray(result["areas"]).reshape(-1)
        masks = list(result["masks"])
        lengths.update(areas=len(areas), masks=len(masks))
    keypoints = None
    if "keypoints" in result:
        keypoints = np.asarray(result["keypoints"], dtype=np.float32)
        if keypoints.ndim != 3 or keypoints.shape[2] != 3:
            raise ValueError(f"predictor keypoints should be (N, K, 3), got shape {keypoints.shape}")
        lengths["keypoints"] = len(keypoints)
        if n and not np.isfinite(keypoints).all():
            raise ValueError("predictor result has non-finite keypoints")
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ValueError(f"predictor result has {n} boxes but {bad}")
    if n and not np.isfinite(boxes).all():
        raise ValueError("predictor result has non-finite boxes")
    if n and not np.isfinite(scores).all():
        raise ValueError("predictor result has non-finite scores")
    if n and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
        raise ValueError("labels do not fit int32")
    instances = []
    for i in range(n):
        if has_masks:
            size = list(masks[i]["size"])
            if size != [height, width]:
                raise ValueError(f"mask {i} has size {size}, image is [{height}, {width}] (H, W)")
        instances.append(
            {
                "label": int(labels[i]),
                "label_name": str(names[i]),
                "score": float(scores[i]),
                "bbox": [float(v) for v in boxes[i]],
                "area": int(areas[i]) if has_masks else None,
                "mask_rle": _counts_str(masks[i]["counts"]) if has_masks else None,
                "keypoints": None if keypoints is None else [
                    {"x": float(x), "y": float(y), "score": float(s)} for x, y, s in keypoints[i]],
            }
        )
    return {
        "image_uri": image_uri,
        "source_etag": source_etag,
        "source_size": None if source_size is None else int(source_size),
        "width": int(width),
        "height": int(height),
        "status": STATUS_OK,
        "error": None,
        "error_kind": None,
        "instances": instances,
        "model_name": model_name,
        "checkpoint_sha256": checkpoint_sha256,
        "settings": settings,
        "run_id": run_id,
        "processed_at": _utc(processed_at),
    }


def error_row(
    *,
    image_uri: str,
    source_etag: str | None,
    source_size: int | None,
    reason: str,
    kind: str,
    model_name: str,
    checkpoint_sha256: str,
    run_id: str,
    width: int | None = None,
    height: int | None = None,
    processed_at: _dt.datetime | None = None,
    settings: str | None = None,
) -> dict[str, Any]:
    """A row for an image that could not be processed; ``reason`` is made one line,
    ``kind`` is one of :data:`ERROR_KINDS`."""
    reason = one_line(reason)
    if not reason:
        raise ValueError("an error row needs a non-empty reason")
    if kind not in ERROR_KINDS:
        raise ValueError(f"error kind {kind!r} is not one of {', '.join(ERROR_KINDS)}")
    return {
        "image_uri": image_uri,
        "source_etag": source_etag,
        "source_size": None if source_size is None else int(source_size),
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "status": STATUS_ERROR,
        "error": reason,
        "error_kind": kind,
        "instances": None,
        "model_name": model_name,
        "checkpoint_sha256": checkpoint_sha256,
        "settings": settings,
        "run_id": run_id,
        "processed_at": _utc(processed_at),
    }


# ------------------------------------------------------------------ an image's latest row

LATEST_FIRST = (("processed_at", "descending"), ("run_id", "descending"))  # a run id sorts by its start


def first_of_each(values: pa.ChunkedArray) -> np.ndarray:
    """For sorted ``values``: True at the first of each run of equal values."""
    first = np.ones(len(values), dtype=bool)
    if len(values) > 1:
        first[1:] = pc.not_equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
    return first


def latest_rows(table: pa.Table, keep_runs: Iterable[str] = ()) -> pa.Table:
    """Per image its latest row, plus the rows of ``keep_runs``; sorted by image_uri.

    The latest row of an image is the one with the greatest ``processed_at``, then ``run_id``
    (:data:`LATEST_FIRST`): what the state, the renderer, the evaluation and the README's queries
    all take as an image's current result."""
    table = table.sort_by([("image_uri", "ascending"), *LATEST_FIRST])
    first = first_of_each(table.column("image_uri"))
    keep_runs = list(keep_runs)
    if keep_runs:
        first |= pc.is_in(table.column("run_id"), pa.array(keep_runs, pa.string())).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first))


COUNTS_KEY = b"mrcnn.counts"  # key-value metadata of every staged (and so committed) file: shard_counts


def reason_start(reason: str) -> str:
    """The start of an error reason, what summaries count: "corrupt or truncated JPEG data: OSError:
    ..." -> "corrupt or truncated JPEG data"."""
    return reason.split(":", 1)[0][:80]


def shard_counts(table: pa.Table) -> dict:
    """What a run summary counts of a table of output rows: rows, ok rows, instances, error rows
    by ``error_kind`` and by :func:`reason_start`."""
    ok = pc.sum(pc.equal(table.column("status"), STATUS_OK)).as_py() or 0
    reasons: dict[str, int] = {}
    for reason in table.column("error").drop_null().to_pylist():
        reasons[reason_start(reason)] = reasons.get(reason_start(reason), 0) + 1
    kinds: dict[str, int] = {}
    for kind in table.column("error_kind").drop_null().to_pylist():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"rows": table.num_rows, "ok": ok,
            "instances": pc.sum(pc.list_value_length(table.column("instances"))).as_py() or 0,
            "error_kinds": kinds, "error_reasons": reasons}


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (from ok_row / error_row) as a table with exactly :data:`SCHEMA`."""
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def rle_counts_stats(counts: str) -> tuple[int, int]:
    """(total pixels, foreground pixels) of a COCO compressed RLE counts string.

    Mirrors ``rleFrString`` in pycocotools' maskApi.c (6-bit chunks offset by 48, sign bit
    0x10, runs after the second stored as deltas); used to check that a mask really has
    height x width pixels, which pycocotools itself does not verify.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("RLE counts string ends inside a number")
            c = ord(counts[p]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"invalid RLE counts character {counts[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("negative run in RLE counts")
        runs.append(x)
    return sum(runs), sum(runs[1::2])


def validate_table(table: pa.Table, *, check_masks: bool = True) -> None:
    """Raise ValueError naming every way ``table`` breaks the output contract.

    Checks the schema (names, types, order), required columns, status/error/instances
    consistency, bbox length, that a row's instances all have masks or none and the same
    number of keypoints (or none) and, with ``check_masks``, that every mask_rle decodes to
    exactly height x width pixels with the stated area.
    """
    problems: list[str] = []
    if not table.schema.equals(SCHEMA, check_metadata=False):
        problems.append(f"schema differs from SCHEMA:\n{table.schema}")
        raise ValueError("; ".join(problems))
    for field in SCHEMA:
        if not field.nullable and table.column(field.name).null_count:
            problems.append(f"column {field.name} has {table.column(field.name).null_count} nulls")
    for i, row in enumerate(table.to_pylist()):
        where = f"row {i} ({row['image_uri']})"
        status = row["status"]
        if status == STATUS_OK:
            if row["error"] is not None or row["error_kind"] is not None:
                problems.append(f"{where}: ok row with an error")
            if row["instances"] is None or row["width"] is None or row["height"] is None:
                problems.append(f"{where}: ok row without instances/width/height")
                continue
            if row["width"] <= 0 or row["height"] <= 0:
                problems.append(f"{where}: non-positive size")
            kinds = {(inst["mask_rle"] is None, None if inst["keypoints"] is None else len(inst["keypoints"]))
                     for inst in row["instances"]}
            if len(kinds) > 1:
                problems.append(f"{where}: instances differ in having masks or in their keypoint count {sorted(kinds, key=str)}")
            for j, inst in enumerate(row["instances"]):
                bbox = inst["bbox"]
                if bbox is None or len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
                    problems.append(f"{where} instance {j}: bbox must be 4 finite numbers")
                if inst["mask_rle"] is None:
                    if inst["area"] is not None:
                        problems.append(f"{where} instance {j}: an area without a mask")
                    if inst["keypoints"] is None:
                        problems.append(f"{where} instance {j}: neither a mask nor keypoints")
                elif check_masks:
                    try:
                        total, area = rle_counts_stats(inst["mask_rle"] or "")
                    except ValueError as e:
                        problems.append(f"{where} instance {j}: {e}")
                        continue
                    if total != row["width"] * row["height"]:
                        problems.append(
                            f"{where} instance {j}: mask has {total} pixels, "
                            f"image is {row['height']}x{row['width']}"
                        )
                    if inst["area"] != area:
                        problems.append(f"{where} instance {j}: area {inst['area']} != mask area {area}")
        elif status == STATUS_ERROR:
            err = row["error"]
            if not err or "\n" in err or "\r" in err:
                problems.append(f"{where}: error row needs a one-line reason")
            if row["error_kind"] not in ERROR_KINDS:
                problems.append(f"{where}: error kind {row['error_kind']!r} is not one of {', '.join(ERROR_KINDS)}")
            if row["instances"] is not None:
                problems.append(f"{where}: error row with instances")
        else:
            problems.append(f"{where}: status {status!r} is not 'ok' or 'error'")
    if problems:
        raise ValueError(f"{len(problems)} problem(s): " + "; ".join(problems[:20]))

