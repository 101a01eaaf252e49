"""S3 Inventory reports as input (jobs/infer/plan/inventory.py), built here on the moto endpoint in
AWS's layout: CSV (gzip, URL-encoded keys), Parquet and ORC data files listed by a manifest."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import uuid
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.infer import pipeline
from jobs.infer.output import Output
from jobs.infer.plan.inventory import InventoryError, iter_inventory, read_manifest
from jobs.infer.plan.listing import list_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")
KEYS = ["a.jpg", "dir/with space/b c.png", "ünïcode/ñandú.jpg", "plus+sign & more.jpeg", "deep/x/y/z.webp",
        "notes.txt", "dir/"]
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"


def _sorted(objs):
    return sorted(((o.image_uri, o.source_etag, o.source_size) for o in objs))


def _s3():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def _listed(bucket):
    objs = []
    for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objs += page.get("Contents", [])
    return objs


def _rows(bucket, objs, versions=()):
    rows = [{"bucket": bucket, "key": o["Key"], "version_id": None, "is_latest": True, "is_delete_marker": False,
             "size": int(o["Size"]), "last_modified_date": o["LastModified"], "e_tag": o["ETag"].strip('"'),
             "storage_class": "STANDARD"} for o in objs]
    return rows + list(versions)


def _encode(fmt, rows, slash_safe):
    if fmt == "CSV":
        buf = io.StringIO()
        w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for r in rows:
            key = quote_plus(r["key"], safe="/" if slash_safe else "")
            w.writerow([r["bucket"], key, r["version_id"] or "", str(r["is_latest"]).lower(),
                        str(r["is_delete_marker"]).lower(), "" if r["size"] is None else r["size"],
                        r["last_modified_date"].strftime("%Y-%m-%dT%H:%M:%S.000Z"), r["e_tag"] or "",
                        r["storage_class"]])
        return gzip.compress(buf.getvalue().encode()), ".csv.gz"
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("bucket", pa.string()), ("key", pa.string()), ("version_id", pa.string()), ("is_latest", pa.bool_()),
        ("is_delete_marker", pa.bool_()), ("size", pa.int64()), ("last_modified_date", pa.timestamp("ms", "UTC")),
        ("e_tag", pa.string()), ("storage_class", pa.string())]))
    sink = io.BytesIO()
    if fmt == "Parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
        return sink.getvalue(), ".parquet"
    import pyarrow.orc as orc

    orc.write_table(table, sink)
    return sink.getvalue(), ".orc"


def write_inventory(dest, source, fmt, rows, *, n_files=2, prefix="inv"):
    """An inventory report of ``rows`` in bucket ``dest``; returns the manifest's URI."""
    s3 = _s3()
    base = f"{prefix}/{source}/daily"
    files = []
    for i in range(n_files):
        data, ext = _encode(fmt, rows[i::n_files], slash_safe=bool(i % 2))
        key = f"{base}/data/{uuid.uuid4()}{ext}"
        s3.put_object(Bucket=dest, Key=key, Body=data)
        files.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{dest}", "version": "2016-11-30",
                "creationTimestamp": "1764550800000", "fileFormat": fmt,
                "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { ... }", "files": files}
    key = f"{base}/2026-12-01T01-00Z/manifest.json"
    s3.put_object(Bucket=dest, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{dest}/{key}"


@pytest.fixture
def source(s3_bucket):
    s3 = _s3()
    for i, key in enumerate(KEYS):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"" if key.endswith("/") else os.urandom(100 + i))
    dest = f"inv-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=dest)
    return s3_bucket, dest


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
def test_an_inventory_gives_what_listing_gives(source, fmt):
    bucket, dest = source
    manifest = write_inventory(dest, bucket, fmt, _rows(bucket, _listed(bucket)))
    from_inventory = _sorted(list_inputs(manifest))
    listed = _sorted(list_inputs(f"s3://{bucket}/"))
    assert len(listed) == 5 and from_inventory == listed  # uri, etag and size alike; .txt and dir/ left out
    assert any(" " in uri and "+" in uri for uri, _, _ in listed)


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_only_current_versions_that_are_not_delete_markers(source, fmt):
    bucket, dest = source
    objs = [o for o in _listed(bucket) if o["Key"] in ("a.jpg", "deep/x/y/z.webp")]
    when = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc)
    old = {"bucket": bucket, "key": "a.jpg", "version_id": "v0", "is_latest": False, "is_delete_marker": False,
           "size": 5, "last_modified_date": when, "e_tag": "0" * 32, "storage_class": "STANDARD"}
    gone = {**old, "key": "deleted.jpg", "version_id": "v9", "is_latest": True, "is_delete_marker": True,
            "size": None, "e_tag": None}
    manifest = write_inventory(dest, bucket, fmt, _rows(bucket, objs, [old, gone]), n_files=1)
    got = list(iter_inventory(manifest))
    assert sorted(o.image_uri for o in got) == [f"s3://{bucket}/a.jpg", f"s3://{bucket}/deep/x/y/z.webp"]
    assert {o.source_size for o in got} == {int(o["Size"]) for o in objs}


def test_broken_reports_are_refused_with_a_reason(source):
    bucket, dest = source
    manifest = write_inventory(dest, bucket, "CSV", _rows(bucket, _listed(bucket)), n_files=1)
    doc = read_manifest(manifest)
    assert doc.file_format == "CSV" and len(doc.files) == 1
    s3 = _s3()
    data_key = doc.files[0].uri.split(f"s3://{dest}/", 1)[1]
    s3.put_object(Bucket=dest, Key=data_key, Body=b"truncated")
    with pytest.raises(InventoryError, match="does not match its manifest's MD5checksum"):
        list(list_inputs(manifest))
    s3.put_object(Bucket=dest, Key="x/manifest.json", Body=b'{"files": []}')
    with pytest.raises(InventoryError, match="is not an S3 Inventory manifest"):
        list(list_inputs(f"s3://{dest}/x/manifest.json"))


def test_a_report_copied_to_local_disk(source, tmp_path):
    import s3fs

    bucket, dest = source
    manifest = write_inventory(dest, bucket, "Parquet", _rows(bucket, _listed(bucket)))
    s3fs.S3FileSystem().get(f"{dest}/inv", str(tmp_path / "inv"), recursive=True)
    local = tmp_path / manifest.split(f"s3://{dest}/", 1)[1]
    assert local.exists()
    assert _sorted(list_inputs(str(local))) == _sorted(list_inputs(manifest))
    assert all(d.uri.startswith(str(tmp_path)) for d in read_manifest(str(local)).files)


def test_the_job_over_an_inventory_then_over_the_prefix_reprocesses_nothing(s3_bucket, tmp_path, run_in_process):
    from jobs.synthetic import generate

    generate(f"s3://{s3_bucket}/shapes", 4, seed=11, size="128/160")
    images = [o for o in _listed(s3_bucket) if o["Key"].endswith(".png")]
    dest = f"inv-{uuid.uuid4().hex[:8]}"
    _s3().create_bucket(Bucket=dest)
    manifest = write_inventory(dest, s3_bucket, "CSV", _rows(s3_bucket, images))
    out = str(tmp_path / "out")

    def run(inp):
        return run_in_process(pipeline.JobConfig(input=inp, output=out, weights=WEIGHTS, batch_size=2))[0]

    first = run(manifest)
    assert first.planned == 4 and first.ok == 4
    assert run(f"s3://{s3_bucket}/shapes/images/").planned == 0  # the same etags and sizes
    rows = [r for f in Output(out).committed_files() for r in pq.read_table(f).to_pylist()]
    assert sorted(r["image_uri"] for r in rows) == sorted(f"s3://{s3_bucket}/{o['Key']}" for o in images)
