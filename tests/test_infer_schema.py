"""jobs.infer.schema: row builders, the Parquet types readers rely on, and validate_table."""

import datetime as dt
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from jobs.infer import schema

META = dict(image_uri="s3://b/a.jpg", source_etag="e1", source_size=123, model_name="m",
            checkpoint_sha256="f" * 64, run_id="r1")


def all_types(sch):
    out, todo = [], [f.type for f in sch]
    while todo:
        t = todo.pop()
        out.append(t)
        todo += [t.field(i).type for i in range(t.num_fields)] if pa.types.is_struct(t) else []
        todo += [t.value_type] if pa.types.is_list(t) else []
    return out


def result_for(h, w, n=2, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.asfortranarray((rng.random((h, w, n)) > 0.7).astype(np.uint8))
    rles = mask_utils.encode(masks)
    return {
        "boxes": rng.random((n, 4)).astype(np.float32) * 10,
        "labels": np.arange(1, n + 1, dtype=np.int64),
        "scores": rng.random(n).astype(np.float32),
        "label_names": [f"c{i}" for i in range(n)],
        "areas": mask_utils.area(rles).astype(np.int64),
        "masks": [{"size": r["size"], "counts": r["counts"]} for r in rles],  # counts: bytes
    }, masks


def test_ok_row_and_parquet_roundtrip_types():
    res, masks = result_for(12, 17)
    rows = [schema.ok_row(res, width=17, height=12, **META),
            schema.ok_row(result_for(12, 17, n=0)[0], width=17, height=12, **{**META, "image_uri": "s3://b/none.jpg"}),
            schema.error_row(reason="bad\nthing  here", kind="decode", **{**META, "image_uri": "s3://b/bad.jpg"})]
    table = schema.rows_to_table(rows)
    schema.validate_table(table)
    buf = io.BytesIO()
    pq.write_table(table, buf, **schema.PARQUET_WRITE_OPTIONS)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert back.schema.equals(schema.SCHEMA, check_metadata=False)
    assert back.schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert back.schema.field("source_size").type == pa.int64()
    assert back.schema.field("width").type == pa.int32()
    # The Parquet file itself (what Spark reads): microsecond UTC timestamps only.
    text = str(pq.ParquetFile(io.BytesIO(buf.getvalue())).schema)
    assert "timeUnit=microseconds" in text and "nanoseconds" not in text, text
    assert not [t for t in all_types(back.schema) if pa.types.is_unsigned_integer(t)
                or pa.types.is_float16(t) or (pa.types.is_timestamp(t) and t.unit != "us")]

    got = back.to_pylist()
    assert [r["status"] for r in got] == ["ok", "ok", "error"]
    assert got[1]["instances"] == [] and got[2]["instances"] is None
    assert got[2]["error"] == "bad thing here"
    inst = got[0]["instances"]
    assert len(inst) == 2
    for i, d in enumerate(inst):
        assert d["label"] == i + 1 and d["label_name"] == f"c{i}"
        assert d["bbox"] == pytest.approx(res["boxes"][i].tolist())
        decoded = mask_utils.decode({"size": [12, 17], "counts": d["mask_rle"]})
        assert (decoded == masks[:, :, i]).all()
        assert d["area"] == int(masks[:, :, i].sum())


def test_rle_counts_stats_matches_pycocotools():
    rng = np.random.default_rng(1)
    checked = 0
    for h, w in [(1, 1), (5, 7), (40, 33), (64, 64)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            m = np.asfortranarray((rng.random((h, w)) < p).astype(np.uint8))
            rle = mask_utils.encode(m)
            total, area = schema.rle_counts_stats(rle["counts"].decode())
            assert total == h * w and area == int(m.sum())
            checked += 1
    assert checked == 16


def test_ok_row_rejects_inconsistent_results():
    res, _ = result_for(12, 17)
    with pytest.raises(ValueError, match="mask 0 has size"):
        schema.ok_row(res, width=12, height=17, **META)
    bad = dict(res, scores=res["scores"][:1])
    with pytest.raises(ValueError, match="2 boxes"):
        schema.ok_row(bad, width=17, height=12, **META)
    bad = dict(res, boxes=np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        schema.ok_row(bad, width=17, height=12, **META)
    with pytest.raises(ValueError, match="timezone-aware"):
        schema.ok_row(res, width=17, height=12, processed_at=dt.datetime(2026, 1, 1), **META)
    with pytest.raises(ValueError, match="non-empty reason"):
        schema.error_row(reason=" \n ", kind="decode", **META)


def test_validate_table_names_the_problems():
    res, _ = result_for(12, 17)
    row = schema.ok_row(res, width=17, height=12, **META)
    bad_area = {**row, "instances": [{**row["instances"][0], "area": 1}]}
    wrong_size = {**row, "width": 18}
    bad_status = {**row, "status": "maybe"}
    err_no_reason = {**schema.error_row(reason="x", kind="decode", **META), "error": None}
    table = schema.rows_to_table([bad_area, wrong_size, bad_status, err_no_reason])
    with pytest.raises(ValueError) as ei:
        schema.validate_table(table)
    msg = str(ei.value)
    assert "area 1 != mask area" in msg
    assert "mask has 204 pixels, image is 12x18" in msg
    assert "status 'maybe'" in msg
    assert "error row needs a one-line reason" in msg
    with pytest.raises(ValueError, match="schema differs"):
        schema.validate_table(table.drop_columns(["run_id"]))


def test_long_reasons_are_capped():
    row = schema.error_row(reason="x" * 5000, kind="decode", **META)
    assert len(row["error"]) == schema.MAX_ERROR_CHARS and row["error"].endswith("...")
