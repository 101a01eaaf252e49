"""One store's objects as job inputs: a prefix listed as the store answers, a list file's
URIs stat'ed, extensions and change tokens.

Listings are generators of :class:`~jobs.infer.schema.SourceObject` (image_uri, source_etag,
source_size) that yield as the store answers; nothing here builds the whole listing as a list:

* S3: one ``ListObjectsV2`` page (1000 keys) at a time through s3fs's client, so a
  prefix of a million keys costs one page of memory and the first key arrives after the
  first request. (s3fs's own ``find``/``ls`` collect every page before returning.)
* local paths: ``os.scandir`` recursion, yielding entries as the directory is read.
* other fsspec filesystems: ``fs.walk``, which holds one directory level at a time.

Change tokens (``etag``) are opaque strings compared together with the size:

* S3/GCS/Azure: the store's ETag, surrounding quotes and a weak ``W/`` prefix removed.
  Multipart ETags (``...-N``) are not content MD5s; that is fine for change detection.
* local files: ``"<st_mtime_ns>-<st_size>"``. A content hash would mean reading every
  byte of the archive on the driver while listing, before any work starts, and again in
  the worker; mtime+size is what make/rsync use and changes whenever a file is rewritten
  or replaced. It misses only a content change that keeps both size and mtime (e.g.
  ``cp -p`` of a different file of the same size), which we accept.

Listing pages and stats retry ``unavailable`` failures as :class:`~jobs.storage.RetryPolicy` says.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import posixpath
from collections import deque
from typing import Any, Iterable, Iterator

import fsspec
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from jobs.infer.schema import SourceObject
from jobs.storage import RetryPolicy, call_with_retries, classify_storage_error, describe_error, resolve

# what decode.py accepts (HEIC/HEIF with pillow-heif, AVIF with Pillow's libavif)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif", ".heic",
                              ".heif"})
LIST_FILE_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
COMPRESSION_EXTENSIONS = frozenset({".gz", ".bz2", ".xz", ".zst"})


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """An s3fs filesystem (listed page by page through its client)."""
    return "s3" in fs.protocol and hasattr(fs, "call_s3")


def canonical_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The one spelling of an object's URI used in rows and state (``s3://b/k``, ``file:///p``)."""
    return fs.unstrip_protocol(path)


# ------------------------------------------------------------------ change tokens

def normalize_etag(value: Any) -> str | None:
    """An opaque change token as stored in the output: no quotes, no weak prefix."""
    if value is None:
        return None
    s = str(value).strip()
    if s.startswith("W/"):
        s = s[2:]
    s = s.strip('"')
    return s or None


def local_etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_size}"


def _etag_from_info(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return normalize_etag(info[key])
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return f"mtime-{info[key]}-{info.get('size')}"
    return None


def _source_from_info(fs, path: str, info: dict[str, Any]) -> SourceObject:
    if isinstance(fs, LocalFileSystem):
        st = os.stat(path)
        return SourceObject(canonical_uri(fs, path), local_etag(st), st.st_size)
    size = info.get("size")
    return SourceObject(canonical_uri(fs, path), _etag_from_info(info), None if size is None else int(size))


def has_extension(uri: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    return posixpath.splitext(uri.rsplit("?", 1)[0])[1].lower() in extensions


# ------------------------------------------------------------------ listing

def _walk_local(root: str) -> Iterator[SourceObject]:
    fs = LocalFileSystem()
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            subdirs = []
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    yield SourceObject(canonical_uri(fs, entry.path), local_etag(st), st.st_size)
            # Reversed so the pop order visits subdirectories in scandir order.
            stack.extend(reversed(subdirs))


def walk_s3(fs, path: str, page_size: int, retry: RetryPolicy) -> Iterator[SourceObject]:
    """Every object under the S3 prefix ``path`` (``bucket/key``), one ListObjectsV2 page at a time."""
    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        page = call_with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs), retry)
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):  # "directory" marker objects
                continue
            yield SourceObject(
                f"s3://{bucket}/{obj['Key']}", normalize_etag(obj.get("ETag")), int(obj["Size"])
            )
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _walk_generic(fs, path: str) -> Iterator[SourceObject]:
    for _root, _dirs, files in fs.walk(path, detail=True):
        for name in sorted(files):
            info = files[name]
            if info.get("type", "file") == "file":
                yield _source_from_info(fs, info["name"], info)


def list_prefix(uri: str, *, page_size: int = 1000, retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """Every object under ``uri`` (a directory / key prefix), streamed as listed.

    Raises FileNotFoundError when a local directory does not exist; an empty or missing
    S3 prefix simply yields nothing. S3 listing pages are retried as ``retry`` says.
    """
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"input directory not found: {uri}")
        yield from _walk_local(path)
    elif is_s3(fs):
        yield from walk_s3(fs, path, page_size, retry)
    else:
        yield from _walk_generic(fs, path)


def iter_list_file(uri: str) -> Iterator[str]:
    """The URIs in a list file, one per line, streamed; blank lines and ``#`` comments skipped.

    Compressed list files (.gz, .bz2, .xz, .zst) are decompressed on the fly.
    """
    fs, path = resolve(uri)
    codec = infer_compression(path)
    with fs.open(path, "rb") as raw:
        stream = compr[codec](raw, mode="rb") if codec else raw
        with io.TextIOWrapper(stream, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line


def _stat_one(uri: str, retry: RetryPolicy) -> SourceObject:
    try:
        fs, path = resolve(uri)
        if isinstance(fs, LocalFileSystem):
            st = os.stat(path)
            if not os.path.isfile(path):
                return SourceObject(canonical_uri(fs, path), None, None, f"not a file: {uri}", "not_found")
            return SourceObject(canonical_uri(fs, path), local_etag(st), st.st_size)
        info = call_with_retries(lambda: fs.info(path), retry)
        if info.get("type") != "file":
            return SourceObject(canonical_uri(fs, path), None, None, f"not a file: {uri}", "not_found")
        return _source_from_info(fs, path, info)
    except FileNotFoundError:
        return SourceObject(_canonical_or_raw(uri), None, None, f"source not found: {uri}", "not_found")
    except Exception as e:  # noqa: BLE001  (one bad line must not stop the run)
        return SourceObject(_canonical_or_raw(uri), None, None, f"cannot stat source: {describe_error(e)}",
                            classify_storage_error(e))


def _canonical_or_raw(uri: str) -> str:
    try:
        fs, path = resolve(uri)
        return canonical_uri(fs, path)
    except Exception:  # noqa: BLE001
        return uri


def stat_uris(uris: Iterable[str], *, concurrency: int = 16, retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """SourceObjects for ``uris`` in input order, ``concurrency`` stats in flight at once.

    A sliding window keeps memory bounded: a list of a million URIs is never held whole.
    Objects that cannot be stat'ed come back with ``error`` set instead of raising.
    """
    it = iter(uris)
    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        window: deque[cf.Future] = deque()
        for uri in it:
            window.append(pool.submit(_stat_one, uri, retry))
            if len(window) >= 2 * concurrency:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def is_list_file(uri: str) -> bool:
    stem = uri
    if posixpath.splitext(stem)[1].lower() in COMPRESSION_EXTENSIONS:
        stem = posixpath.splitext(stem)[0]
    return has_extension(stem, LIST_FILE_EXTENSIONS)
