"""Spark reads the job's output root: committed rows only, and the latest-result-per-image query.

Slow (a local Spark session takes ~10 s to start on the CI machine), hence the mark.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _infer_fake_job import run_job  # noqa: E402
from test_infer_commit import CKPT, _local_write, input_files, png  # noqa: E402

from jobs.infer import commit  # noqa: E402


@pytest.mark.slow
def test_spark_reads_committed_rows_and_latest_per_image(tmp_path):
    pyspark = pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")
    run1, _ = run_job(str(inp), out, CKPT)
    (inp / "img0.png").write_bytes(png(40, 30, 99))
    os.utime(inp / "img0.png", ns=(2 * 10**18, 2 * 10**18))
    run2, _ = run_job(str(inp), out, CKPT)
    # An uncommitted staged shard of a third run must stay invisible.
    run3 = commit.begin_run(out, {"other": 1})
    objs = [commit.SourceObject(f"file:///x/{i}.jpg", "e", 1) for i in range(3)]
    shard = commit.Shard(commit.shard_id_for(objs, CKPT), tuple(objs))
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
        assert n == 11  # one fake instance per decodable row: 10 in run 1, 1 in run 2
    finally:
        spark.stop()
