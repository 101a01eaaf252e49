"""Spark reads the job's output root: committed rows only, and the latest-result-per-image query.

Slow (a local Spark session takes ~10 s to start on the CI machine), hence the mark.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _stand_in_job import run_job  # noqa: E402
from test_infer_commit import CKPT, _local_write, input_files, png  # noqa: E402

from jobs.infer.commit import protocol  # noqa: E402
from jobs.infer.plan.planner import shard_id_for  # noqa: E402
from jobs.infer.schema import SourceObject  # noqa: E402


@pytest.mark.slow
def test_spark_reads_committed_rows_and_latest_per_image(tmp_path):
    pyspark = pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")
    run1, _ = run_job(str(inp), out)
    (inp / "img0.png").write_bytes(png(40, 30, 99))
    os.utime(inp / "img0.png", ns=(2 * 10**18, 2 * 10**18))
    run2, _ = run_job(str(inp), out)
    # An uncommitted staged shard of a third run must stay invisible.
    run3 = protocol.begin_run(out, {"other": 1})
    objs = [SourceObject(f"file:///x/{i}.jpg", "e", 1) for i in range(3)]
    shard = protocol.Shard(shard_id_for(objs, CKPT), tuple(objs))
    from test_infer_commit import _rows
    run3.stage(shard, _rows(run3, objs))

    spark = (SparkSession.builder.master("local[1]").appName("t")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1")
             .config("spark.sql.session.timeZone", "UTC").getOrCreate())
    try:
        df = spark.read.parquet(out)
        assert df.count() == 13  # 12 from run 1, 1 changed image from run 2, none staged
        types = dict(df.dtypes)
        assert types["processed_at"] == "timestamp" and types["source_size"] == "bigint"
        assert types["width"] == "int" and types["run_id"] == "string"
        assert types["instances"].startswith("array<struct<label:int,label_name:string,score:float,bbox:array<float>")
        w = Window.partitionBy("image_uri").orderBy(F.col("processed_at").desc(), F.col("run_id").desc())
        latest = df.withColumn("rn", F.row_number().over(w)).filter("rn = 1").drop("rn")
        rows = {r["image_uri"]: r for r in latest.select("image_uri", "run_id", "width").collect()}
        assert len(rows) == 12
        assert rows[f"file://{inp}/img0.png"]["run_id"] == run2.run_id
        assert rows[f"file://{inp}/img0.png"]["width"] == 40
        assert sum(r["run_id"] == run1.run_id for r in rows.values()) == 11
        n = (df.select(F.explode("instances").alias("i")).filter("i.score > 0.5").count())
        assert n == 11  # one stand-in instance per decodable row: 10 in run 1, 1 in run 2
    finally:
        spark.stop()


@pytest.mark.slow
def test_spark_reads_keypoints_and_older_files_without_them(tmp_path):
    """A keypoint model's rows (instances[].keypoints) next to a file written before the field
    existed: with mergeSchema Spark sees the field, null in the older file's instances."""
    pytest.importorskip("pyspark")
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import SparkSession
    from pycocotools import mask as mask_utils
    from pyspark.sql import functions as F

    from jobs.infer import schema

    meta = dict(source_etag=None, source_size=None, model_name="k", checkpoint_sha256="0" * 64)
    kp = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    result = dict(boxes=np.array([[0, 0, 5, 5], [1, 1, 6, 6]], np.float32), labels=[1, 1], scores=[0.9, 0.8],
                  label_names=["person", "person"], keypoints=kp)
    new = tmp_path / "out" / "run_id=b"
    new.mkdir(parents=True)
    pq.write_table(schema.rows_to_table([schema.ok_row(result, image_uri="file:///a.jpg", width=8, height=8,
                                                        run_id="b", **meta)]), new / "part-1.parquet")
    # the schema of before: the instance struct without its last field
    old_instance = pa.struct([f for f in schema.INSTANCE_TYPE if f.name != "keypoints"])
    old_schema = pa.schema([pa.field("instances", pa.list_(old_instance)) if f.name == "instances" else f
                            for f in schema.SCHEMA])
    old_row = schema.ok_row(dict(boxes=np.zeros((1, 4), np.float32), labels=[1], scores=[0.7], label_names=["cat"],
                                 areas=[0], masks=[mask_utils.encode(np.zeros((8, 8), np.uint8, order="F"))]),
                            image_uri="file:///b.jpg", width=8, height=8, run_id="a", **meta)
    for inst in old_row["instances"]:
        inst.pop("keypoints")
    (tmp_path / "out" / "run_id=a").mkdir()
    pq.write_table(pa.Table.from_pylist([old_row], schema=old_schema), tmp_path / "out" / "run_id=a" / "part-0.parquet")

    spark = (SparkSession.builder.master("local[1]").appName("t").config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC").getOrCreate())
    try:
        df = spark.read.option("mergeSchema", "true").parquet(str(tmp_path / "out"))
        inst = df.select("image_uri", F.explode("instances").alias("i"))
        assert "keypoints:array<struct<x:float,y:float,score:float>>" in dict(df.dtypes)["instances"]
        by_image = {r["image_uri"]: r["n"] for r in inst.groupBy("image_uri").agg(
            F.count(F.col("i.keypoints")).alias("n")).collect()}
        assert by_image == {"file:///a.jpg": 2, "file:///b.jpg": 0}  # null keypoints in the older file
        points = inst.select(F.explode("i.keypoints").alias("k")).select("k.x", "k.y", "k.score").collect()
        assert len(points) == 6 and sorted(p["x"] for p in points) == sorted(kp[..., 0].ravel().tolist())
    finally:
        spark.stop()
