"""The batch job's inputs as parts that tasks list independently (:func:`input_parts`), and the
serial listing (:func:`list_inputs`) they add up to, object for object and in its order.

Two inputs grow with the archive. An S3 prefix is listed 1,000 keys a call, one page after
the other (about an hour per 10 million keys); an S3 Inventory report is a set of data
files. The planner's listing tasks (``planner.scatter_part``) each list one part:

* An S3 prefix is split on its delimiter-level common prefixes, breadth first, until there
  are ``target_parts`` prefixes or ``max_depth`` levels have been split; each prefix left is
  listed whole (no delimiter) by one task, and the objects sitting directly at a split level
  come with the split's own listing. The keys under one common prefix are one contiguous
  range of the sorted key space, so the parts taken in key order are exactly the serial
  listing: the same objects in the same order.
* An inventory report's data files are read one per task, in the manifest's order.

A flat prefix (no common prefix under it) has nothing to split: the split's own listing is
the serial one. List files, local directories and other filesystems are one part, listed
serially (no network round trips to hide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from jobs.infer.plan.sources import (IMAGE_EXTENSIONS, has_extension, is_list_file, is_s3, iter_list_file,
                                     list_prefix, normalize_etag, stat_uris, walk_s3)
from jobs.infer.schema import SourceObject
from jobs.storage import RetryPolicy, call_with_retries, resolve

DEFAULT_TARGET_PARTS = 64  # prefixes to split into: a few per CPU of a small cluster
DEFAULT_MAX_DEPTH = 3  # delimiter levels split at most
CHUNK = 1000  # objects per streamed chunk (one S3 page)
# Objects the split may hold on the driver (those sitting directly at the levels it splits). A
# level holding more is not split but listed whole by one task: a flat prefix of millions of
# keys streams as it would serially, after a probe of at most this many keys.
MAX_SPLIT_OBJECTS = 100_000


@dataclass(frozen=True)
class Part:
    """One piece of the input listing: objects already listed (by a prefix split), a prefix
    (``s3://b/p/``) to list whole, an inventory data file (``(manifest, data file)``), or the
    whole input (``serial``: its URI) listed serially."""

    objects: tuple[SourceObject, ...] = ()
    prefix: Optional[str] = None
    inventory: Optional[tuple] = None
    serial: Optional[str] = None


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
    if not is_s3(fs):
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


def input_parts(uri: str, *, list_tasks: int = DEFAULT_TARGET_PARTS, retry: RetryPolicy = RetryPolicy()) -> list[Part]:
    """``--input`` as parts that tasks list independently (their objects together are the input's):
    an inventory's data files, an S3 prefix split on its common prefixes (``list_tasks`` > 0),
    or else one part, the whole input listed serially."""
    from jobs.infer.plan import inventory  # it builds on this module's storage helpers

    if list_tasks > 0 and inventory.is_manifest(uri):
        manifest = inventory.read_manifest(uri, retry=retry)
        return [Part(inventory=(manifest, f)) for f in manifest.files]
    if list_tasks > 0 and not is_list_file(uri) and is_s3(resolve(uri)[0]):
        return split_prefix(uri, target_parts=list_tasks, retry=retry)
    return [Part(serial=uri)]


def part_objects(part: Part, *, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                 retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """The inputs of one part, in listing order (a serial part: :func:`list_inputs`' serial listing)."""
    if part.serial is not None:
        yield from list_inputs(part.serial, extensions=extensions, retry=retry)
        return
    exts = frozenset(e.lower() for e in extensions)
    if part.inventory is not None:
        from jobs.infer.plan.inventory import iter_data_file

        listed: Iterable[SourceObject] = iter_data_file(*part.inventory, retry=retry)
    elif part.prefix is not None:
        fs, path = resolve(part.prefix)
        listed = walk_s3(fs, path, CHUNK, retry)
    else:
        listed = part.objects
    for obj in listed:
        if has_extension(obj.image_uri, exts):
            yield obj


def chunks(objects: Iterable[SourceObject], size: int) -> Iterator[list[SourceObject]]:
    """``objects`` in lists of ``size`` (the last one shorter)."""
    chunk: list[SourceObject] = []
    for o in objects:
        chunk.append(o)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def list_inputs(uri: str, *, extensions: Iterable[str] = IMAGE_EXTENSIONS,
                retry: RetryPolicy = RetryPolicy()) -> Iterator[SourceObject]:
    """The job's inputs for ``--input``.

    * an S3 Inventory report's ``manifest.json`` (:mod:`inventory`): the current objects it
      lists whose extension is in ``extensions``;
    * a list file (``.txt``/``.lst``/``.list``, optionally compressed): every line is an
      input, whatever its extension (an explicit list means "process these");
    * a directory / key prefix: the objects whose extension is in ``extensions``
      (case-insensitive); other files (sidecar JSON, READMEs) are not inputs.

    ``retry`` applies to listing pages and stats. This is the serial listing; the job lists the
    :func:`input_parts` of its input in tasks (``planner.scatter_part``), which together are
    the same objects in the same order.
    """
    exts = frozenset(e.lower() for e in extensions)
    from jobs.infer.plan import inventory  # it builds on this module's storage helpers

    if inventory.is_manifest(uri):
        listed: Iterable[SourceObject] = inventory.iter_inventory(uri, retry=retry)
    elif is_list_file(uri):
        yield from stat_uris(iter_list_file(uri), retry=retry)
        return
    else:
        listed = list_prefix(uri, retry=retry)
    for obj in listed:
        if has_extension(obj.image_uri, exts):
            yield obj
