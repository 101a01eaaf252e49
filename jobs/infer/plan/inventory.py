"""S3 Inventory reports as the job's input: the objects of a bucket without listing it.

``--input .../manifest.json`` names one report (daily or weekly). Its layout is AWS's
(docs: "Inventory location", "Inventory list contents"):

* ``manifest.json``: ``sourceBucket``, ``destinationBucket`` (an ARN), ``fileFormat``
  (``CSV``, ``ORC`` or ``Parquet``), ``fileSchema`` and ``files`` = ``[{key, size,
  MD5checksum}]``, the data files' keys in the destination bucket
  (``dest-prefix/source-bucket/config-ID/data/<uuid>.csv.gz``; the manifest itself is at
  ``dest-prefix/source-bucket/config-ID/YYYY-MM-DDTHH-MMZ/manifest.json``).
* CSV data files are gzip-compressed, without a header; ``fileSchema`` names their columns
  (``"Bucket, Key, Size, LastModifiedDate, ETag, ..."``) and every value is quoted. Keys are
  URL-encoded, a space as ``+`` (form encoding): decoded with ``unquote_plus``.
* Parquet and ORC data files carry their own schema, columns in snake case (``bucket``,
  ``key``, ``size``, ``last_modified_date``, ``e_tag``, ``is_latest``, ``is_delete_marker``);
  keys are plain.

Inventories of versioned buckets list every version: only the latest version of each key
that is not a delete marker is an input. The ETag and size are what listing reports (the
inventory's ETag is unquoted, :func:`sources.normalize_etag` makes both the same), so
switching an output from prefix listing to inventory input reprocesses nothing. Each data
file is checked against its manifest MD5 before use. A report made by copying one elsewhere
(another bucket, a local folder) works too: data files are looked up next to the manifest
when the manifest's own path holds their prefix.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote_plus

import pyarrow as pa

from jobs.infer.errors import UsageError
from jobs.infer.plan.sources import normalize_etag
from jobs.infer.schema import SourceObject
from jobs.storage import RetryPolicy, call_with_retries, resolve

MANIFEST_NAME = "manifest.json"
FORMATS = ("CSV", "ORC", "Parquet")
# CSV fileSchema names -> Parquet/ORC column names
_CSV_TO_COLUMN = {"Bucket": "bucket", "Key": "key", "Size": "size", "ETag": "e_tag", "IsLatest": "is_latest",
                  "IsDeleteMarker": "is_delete_marker"}


class InventoryError(UsageError):
    """The inventory report cannot be used as it is (its reason says what is wrong)."""


@dataclass(frozen=True)
class DataFile:
    uri: str
    size: int | None
    md5: str | None


@dataclass(frozen=True)
class Manifest:
    uri: str
    source_bucket: str
    file_format: str
    file_schema: str
    files: tuple[DataFile, ...]

    def csv_columns(self) -> list[str]:
        return [c.strip() for c in self.file_schema.split(",")]


def is_manifest(uri: str) -> bool:
    return posixpath.basename(uri.rstrip("/")) == MANIFEST_NAME


def _bucket_of(arn: str) -> str:
    # "arn:aws:s3:::bucket-name" (the documented form), or a bare bucket name
    return arn.rsplit(":", 1)[-1]


def _data_uri(manifest_uri: str, key: str, destination_bucket: str) -> str:
    """Where data file ``key`` lives: next to the manifest when its path holds the key's
    config prefix (a copied report, a local folder), else in the destination bucket."""
    config_prefix = key.split("/data/", 1)[0] if "/data/" in key else posixpath.dirname(key)
    at = manifest_uri.find("/" + config_prefix + "/") if config_prefix else -1
    if at >= 0:
        return manifest_uri[:at] + "/" + key
    return f"s3://{destination_bucket}/{key}"


def read_manifest(uri: str, *, retry: RetryPolicy = RetryPolicy()) -> Manifest:
    fs, path = resolve(uri)
    raw = call_with_retries(lambda: fs.cat_file(path), retry)
    try:
        doc = json.loads(raw)
        fmt = doc["fileFormat"]
        files = doc["files"]
        source_bucket = doc["sourceBucket"]
        destination = _bucket_of(doc["destinationBucket"])
        schema = doc.get("fileSchema", "")
    except (ValueError, KeyError, TypeError) as e:
        raise InventoryError(f"{uri} is not an S3 Inventory manifest ({type(e).__name__}: {e})") from None
    match = {f.lower(): f for f in FORMATS}.get(str(fmt).lower())
    if match is None:
        raise InventoryError(f"{uri}: fileFormat {fmt!r} is not one of {', '.join(FORMATS)}")
    if match == "CSV" and "Key" not in [c.strip() for c in schema.split(",")]:
        raise InventoryError(f"{uri}: the CSV fileSchema {schema!r} has no Key column")
    data = []
    for f in files:
        try:
            data.append(DataFile(_data_uri(uri, f["key"], destination), f.get("size"), f.get("MD5checksum")))
        except (KeyError, TypeError):
            raise InventoryError(f"{uri}: a files entry without a key: {f!r}") from None
    return Manifest(uri, source_bucket, match, schema, tuple(data))


def _fetch(f: DataFile, retry: RetryPolicy) -> bytes:
    fs, path = resolve(f.uri)
    data = call_with_retries(lambda: fs.cat_file(path), retry)
    if f.md5 and hashlib.md5(data).hexdigest() != f.md5.lower():
        raise InventoryError(f"inventory data file {f.uri} does not match its manifest's MD5checksum "
                             "(truncated or replaced): fetch the report again")
    return data


def _csv_table(data: bytes, columns: list[str]) -> pa.Table:
    text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    rows = csv.reader(io.StringIO(text.decode("utf-8"), newline=""))
    cols: dict[str, list] = {c: [] for c in columns}
    for row in rows:
        if not row:
            continue
        for name, value in zip(columns, row):
            cols[name].append(value)
    out = {}
    if "Key" in cols:
        out["key"] = [unquote_plus(k) for k in cols["Key"]]
    if "Bucket" in cols:
        out["bucket"] = cols["Bucket"]
    if "Size" in cols:
        out["size"] = [int(v) if v else None for v in cols["Size"]]
    if "ETag" in cols:
        out["e_tag"] = [v or None for v in cols["ETag"]]
    for name in ("IsLatest", "IsDeleteMarker"):
        if name in cols:
            out[_CSV_TO_COLUMN[name]] = [v.lower() == "true" if v else None for v in cols[name]]
    return pa.table(out)


def read_data_file(manifest: Manifest, f: DataFile, *, retry: RetryPolicy = RetryPolicy()) -> pa.Table:
    """One data file as a table of ``uri``, ``etag``, ``size``: the current objects it lists."""
    data = _fetch(f, retry)
    try:
        if manifest.file_format == "CSV":
            table = _csv_table(data, manifest.csv_columns())
        elif manifest.file_format == "Parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
        else:
            import pyarrow.orc as orc

            table = orc.read_table(io.BytesIO(data))
    except InventoryError:
        raise
    except Exception as e:  # noqa: BLE001  (a malformed data file names itself)
        raise InventoryError(f"cannot read inventory data file {f.uri} as {manifest.file_format}: "
                             f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    names = set(table.column_names)
    if "key" not in names:
        raise InventoryError(f"inventory data file {f.uri} has no key column (columns: {sorted(names)})")
    keep = None
    for column, wanted in (("is_latest", True), ("is_delete_marker", False)):
        if column in names:
            values = table.column(column).to_pylist()
            mask = [v is None or bool(v) == wanted for v in values]
            keep = mask if keep is None else [a and b for a, b in zip(keep, mask)]
    if keep is not None:
        table = table.filter(pa.array(keep))
    keys = table.column("key").to_pylist()
    buckets = table.column("bucket").to_pylist() if "bucket" in names else [manifest.source_bucket] * len(keys)
    etags = table.column("e_tag").to_pylist() if "e_tag" in names else [None] * len(keys)
    sizes = table.column("size").to_pylist() if "size" in names else [None] * len(keys)
    return pa.table({
        "uri": [f"s3://{b or manifest.source_bucket}/{k}" for b, k in zip(buckets, keys)],
        "etag": [normalize_etag(e) for e in etags],
        "size": pa.array([None if s is None else int(s) for s in sizes], pa.int64()),
    })


def iter_data_file(manifest: Manifest, f: DataFile, *, retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """The current objects one data file lists, "directory" marker objects left out."""
    table = read_data_file(manifest, f, retry=retry)
    for u, e, s in zip(*(table.column(c).to_pylist() for c in ("uri", "etag", "size"))):
        if not u.endswith("/"):
            yield SourceObject(u, e, s)


def iter_inventory(uri: str, *, retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """The current objects of an inventory report, one data file in memory at a time
    (``listing.input_parts`` gives them to Ray tasks, one data file each)."""
    manifest = read_manifest(uri, retry=retry)
    for f in manifest.files:
        yield from iter_data_file(manifest, f, retry=retry)
