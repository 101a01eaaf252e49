"""The batch job's inputs (:func:`list_inputs`), listed in parallel Ray tasks in the serial order.

Two inputs grow with the archive. An S3 prefix is listed 1,000 keys a call, one page after
the other (about an hour per 10 million keys); an S3 Inventory report is a set of data
files. Here Ray tasks read them and stream their objects back in chunks while the driver
takes them in order, never holding more than the chunks of the tasks in flight:

* An S3 prefix is split on its delimiter-level common prefixes, breadth first, until there
  are ``target_parts`` prefixes or ``max_depth`` levels have been split; each prefix left is
  listed whole (no delimiter) by one task, and the objects sitting directly at a split level
  come with the split's own listing. The keys under one common prefix are one contiguous
  range of the sorted key space, so the parts taken in key order are exactly the serial
  listing: the same objects in the same order, hence the same shards (cut by content, in
  listing order) and the same resumes.
* An inventory report's data files are read one per task, in the manifest's order.

A flat prefix (no common prefix under it) has nothing to split: the split's own listing is
the serial one. Local directories and other filesystems are listed serially (no network
round trips to hide), and so is everything when Ray is not initialised.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from ..storage import (IMAGE_EXTENSIONS, RetryPolicy, SourceObject, call_with_retries, has_extension, is_list_file,
                       iter_list_file, list_prefix, normalize_etag, resolve, stat_uris, walk_s3)

DEFAULT_TARGET_PARTS = 64  # prefixes to split into: a few per CPU of a small cluster
DEFAULT_MAX_DEPTH = 3  # delimiter levels split at most
MAX_TASKS_IN_FLIGHT = 32  # tasks listing ahead of the part the driver is taking
CHUNK = 1000  # objects per streamed chunk (one S3 page)
# Objects the split may hold on the driver (those sitting directly at the levels it splits). A
# level holding more is not split but listed whole by one task: a flat prefix of millions of
# keys streams as it would serially, after a probe of at most this many keys.
MAX_SPLIT_OBJECTS = 100_000
TASK_RETRIES = 3  # a lost worker's listing task runs again (its chunks are not repeated)


@dataclass(frozen=True)
class Part:
    """One piece of a split listing: objects already listed, or a prefix (``s3://b/p/``) to list."""

    objects: tuple[SourceObject, ...] = ()
    prefix: Optional[str] = None


def _is_s3(fs) -> bool:
    return "s3" in fs.protocol and hasattr(fs, "call_s3")


def _level(fs, bucket: str, prefix: str, retry: RetryPolicy, budget: int) -> Optional[list[Part]]:
    """One delimiter level under ``prefix``: its objects and common prefixes, in key order; None
    when it holds more than ``budget`` objects."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": CHUNK}
    entries: list[tuple[str, Any]] = []
    objects = 0
    while True:
        page = call_with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs), retry)
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # "directory" marker objects are not inputs
                entries.append((obj["Key"], SourceObject(f"s3://{bucket}/{obj['Key']}",
                                                         normalize_etag(obj.get("ETag")), int(obj["Size"]))))
                objects += 1
        if objects > budget:
            return None
        for common in page.get("CommonPrefixes", []):
            entries.append((common["Prefix"], f"s3://{bucket}/{common['Prefix']}"))
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    # a prefix "a/" sorts where its whole key range does: str order is S3's (UTF-8 byte) order
    entries.sort(key=lambda e: e[0])
    parts: list[Part] = []
    run: list[SourceObject] = []
    for _, value in entries:
        if isinstance(value, SourceObject):
            run.append(value)
            continue
        if run:
            parts.append(Part(objects=tuple(run)))
            run = []
        parts.append(Part(prefix=value))
    if run:
        parts.append(Part(objects=tuple(run)))
    return parts


def split_prefix(uri: str, *, target_parts: int = DEFAULT_TARGET_PARTS, max_depth: int = DEFAULT_MAX_DEPTH,
                 retry: RetryPolicy = RetryPolicy()) -> list[Part]:
    """``uri`` (an S3 prefix) as parts in key order: a level is split while it holds fewer than
    ``target_parts`` prefixes and fewer than ``max_depth`` levels were split, as long as the
    objects found at split levels stay within ``MAX_SPLIT_OBJECTS``."""
    fs, path = resolve(uri)
    if not _is_s3(fs):
        raise ValueError(f"split_prefix lists S3 prefixes, got {uri}")
    bucket, _, key = path.partition("/")
    root = key.rstrip("/") + "/" if key.strip("/") else ""
    parts = _level(fs, bucket, root, retry, MAX_SPLIT_OBJECTS)
    if parts is None:  # too flat to split: one part, listed whole
        return [Part(prefix=f"s3://{bucket}/{root}")]
    for _ in range(1, max(1, max_depth)):
        prefixes = sum(p.prefix is not None for p in parts)
        if prefixes == 0 or prefixes >= target_parts:
            break
        budget = MAX_SPLIT_OBJECTS - sum(len(p.objects) for p in parts)
        split: list[Part] = []
        for p in parts:
            level = None if p.prefix is None else _level(fs, bucket, p.prefix[len(f"s3://{bucket}/"):], retry, budget)
            if level is None:
                split.append(p)  # an object run, or a prefix too flat to split: listed whole
            else:
                split.extend(level)
                budget -= sum(len(q.objects) for q in level)
        parts = split
    return parts


def _chunks(objects: Iterable[SourceObject], size: int) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for o in objects:
        chunk.append((o.uri, o.etag, o.size))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def list_prefix_task(prefix: str, retry: RetryPolicy, page_size: int) -> Iterator[list[tuple]]:
    """Every object under ``prefix``, a page of (uri, etag, size) at a time (a Ray streaming task)."""
    fs, path = resolve(prefix)
    yield from _chunks(walk_s3(fs, path, page_size, retry), page_size)


def inventory_file_task(manifest, data_file, retry: RetryPolicy, chunk: int) -> Iterator[list[tuple]]:
    """The current objects of one inventory data file, in chunks (a Ray streaming task)."""
    from .inventory import iter_data_file

    yield from _chunks(iter_data_file(manifest, data_file, retry=retry), chunk)


def _ordered(jobs: list[tuple[tuple[SourceObject, ...], Optional[tuple]]], remote,
             max_in_flight: int) -> Iterator[SourceObject]:
    """The objects of ``jobs`` in order. A job is (objects, None), objects already listed, or
    ((), args): a streaming task ``remote.remote(*args)``, started at most ``max_in_flight``
    jobs before the driver reaches it."""
    import ray

    running: dict[int, Any] = {}  # job index -> the streaming generator of its task
    next_start = 0
    for i, (objects, args) in enumerate(jobs):
        while next_start < len(jobs) and next_start <= i + max_in_flight:
            if jobs[next_start][1] is not None:
                running[next_start] = remote.remote(*jobs[next_start][1])
            next_start += 1
        if args is None:
            yield from objects
            continue
        for ref in running.pop(i):
            for uri, etag, size in ray.get(ref):
                yield SourceObject(uri, etag, size)


def list_prefix_parallel(uri: str, *, target_parts: int = DEFAULT_TARGET_PARTS, max_depth: int = DEFAULT_MAX_DEPTH,
                         retry: RetryPolicy = RetryPolicy(), max_in_flight: int = MAX_TASKS_IN_FLIGHT
                         ) -> Iterator[SourceObject]:
    """Every object under the S3 prefix ``uri``, in serial listing order, listed by Ray tasks."""
    import ray

    remote = ray.remote(num_returns="streaming", max_retries=TASK_RETRIES)(list_prefix_task)
    jobs = [(p.objects, None) if p.prefix is None else ((), (p.prefix, retry, CHUNK))
            for p in split_prefix(uri, target_parts=target_parts, max_depth=max_depth, retry=retry)]
    yield from _ordered(jobs, remote, max_in_flight)


def iter_inventory_parallel(uri: str, *, retry: RetryPolicy = RetryPolicy(),
                            max_in_flight: int = MAX_TASKS_IN_FLIGHT) -> Iterator[SourceObject]:
    """The current objects of an inventory report, in manifest order, one data file per Ray task."""
    import ray

    from .inventory import read_manifest

    manifest = read_manifest(uri, retry=retry)
    remote = ray.remote(num_returns="streaming", max_retries=TASK_RETRIES)(inventory_file_task)
    yield from _ordered([((), (manifest, f, retry, CHUNK)) for f in manifest.files], remote, max_in_flight)


def can_list_in_parallel(uri: str) -> bool:
    """True when ``uri`` is an S3 prefix or an inventory report and Ray is running."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    from .inventory import is_manifest

    if is_manifest(uri):
        return True
    fs, _ = resolve(uri)
    return _is_s3(fs)


def list_inputs(uri: str, *, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                retry: RetryPolicy = RetryPolicy(), list_tasks: int = 0) -> Iterator[SourceObject]:
    """The job's inputs for ``--input``.

    * an S3 Inventory report's ``manifest.json`` (:mod:`inventory`): the current objects it
      lists whose extension is in ``extensions``;
    * a list file (``.txt``/``.lst``/``.list``, optionally compressed): every line is an
      input, whatever its extension (an explicit list means "process these");
    * a directory / key prefix: the objects whose extension is in ``extensions``
      (case-insensitive); other files (sidecar JSON, READMEs) are not inputs.

    ``retry`` applies to listing pages and stats. ``list_tasks`` > 0 lists an S3 prefix split
    into about that many parts, and an inventory's data files, in Ray tasks when Ray is running
    (the same objects in the same order).
    """
    exts = frozenset(e.lower() for e in extensions)
    from . import inventory  # it builds on this module's storage helpers

    parallel = list_tasks > 0 and can_list_in_parallel(uri)
    if inventory.is_manifest(uri):
        listed = (iter_inventory_parallel(uri, retry=retry) if parallel
                  else inventory.iter_inventory(uri, retry=retry))
    elif is_list_file(uri):
        yield from stat_uris(iter_list_file(uri), retry=retry)
        return
    else:
        listed = (list_prefix_parallel(uri, target_parts=list_tasks, retry=retry) if parallel
                  else list_prefix(uri, retry=retry))
    for obj in listed:
        if has_extension(obj.uri, exts):
            yield obj
