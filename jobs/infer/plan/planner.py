"""Planning as a join by hash bucket: the listing meets the committed state bucket by bucket, in tasks.

1. *Listing, scattered.* Each part of the input (``listing.input_parts``: an inventory data
   file, a piece of a split S3 prefix, or the whole input listed serially) is listed by a task
   that writes its objects, ``LISTING_CHUNK`` at a time, split by the state's hash bucket
   (``state.bucket_ids``): ``_staging/<run>/plan-<id>/listed/bNNNN/<part>-<chunk>.parquet``.
2. *Joined.* One task per bucket (:func:`plan_bucket`) reads the bucket's listed objects and
   its state rows (``state.StateVersion.bucket_path``), decides what to process
   (:func:`plan_rows`, the rules below) and writes the planned objects sorted by URI.
3. *Sharded.* Consecutive buckets are grouped until a group holds a shard's worth of objects
   (:func:`group_buckets`: a nightly run that plans a few images still makes full shards;
   objects this run committed before a kill count, so a resume groups as its first attempt), and
   one task per group (:func:`shard_group`) cuts them into content-defined shards
   (:func:`make_shards`), notes the shards a killed attempt already staged, and writes the
   others' items to ``plan-<id>/plan-bNNNN.parquet`` (``PLAN_SCHEMA``).
4. The driver gathers paths, counts and a shard_id -> item count map: never an object.

Which objects a run processes (the same rules as ever, now per bucket): repeats of a URI are
dropped (the first listed is kept); images already committed in the run being resumed are
dropped; unless ``full``, images whose latest committed row has the same etag, size,
checkpoint and ``settings`` are dropped unless that row is a storage error
(``schema.RETRYABLE_ERROR_KINDS``; any error with ``retry_errors``).

Shards are cut in bucket order, then URI order, so they do not depend on the listing's order:
buckets are grouped by what the run plans in all (objects still to do and objects an earlier
attempt committed), and a shard's cuts depend only on its own objects, so a resumed run that
lists the same objects cuts the same shards, less the committed ones: a shard staged before a
kill is committed as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.infer import schema
from jobs.infer.commit import protocol
from jobs.infer.output import Output
from jobs.infer.commit.state import STATE_SCHEMA, StateVersion, split_by_bucket
from jobs.infer.plan.listing import DEFAULT_TARGET_PARTS, Part, chunks, input_parts, part_objects
from jobs.infer.plan.sources import IMAGE_EXTENSIONS
from jobs.infer.schema import PLAN_SCHEMA, SHARD_COLUMN, SourceObject
from jobs.infer.tasks import run_tasks
from jobs.storage import RetryPolicy, describe_error, join

LISTING_CHUNK = 100_000  # listed objects a listing task holds before writing them out by bucket
# A listed object: the plan's columns, and its place in the listing (the first of repeats is kept)
LISTED_SCHEMA = pa.schema(
    [("image_uri", pa.string()), ("source_etag", pa.string()), ("source_size", pa.int64()), ("error", pa.string()),
     ("error_kind", pa.string()), ("listing_order", pa.int64())]
)
DEFAULT_SHARD_SIZE = 1000  # images a shard holds, about (between half and double)


def shard_id_for(items: Iterable[SourceObject], checkpoint_sha256: str) -> str:
    """Hash of the shard's sorted (uri, etag, size) and the checkpoint: same work, same name."""
    h = hashlib.sha256(checkpoint_sha256.encode() + b"\n")
    for uri, etag, size in sorted((o.image_uri, o.source_etag or "", -1 if o.source_size is None else o.source_size) for o in items):
        h.update(f"{uri}\t{etag}\t{size}\n".encode())
    return h.hexdigest()[:32]


def _is_cut(uri: str, modulus: int) -> bool:
    digest = hashlib.blake2b(uri.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % modulus == 0


def make_shards(
    items: Iterable[SourceObject], *, checkpoint_sha256: str, target_size: int = DEFAULT_SHARD_SIZE
) -> Iterator[protocol.Shard]:
    """Group planned items into shards of about ``target_size`` (between half and double).

    Content-defined cuts: a shard ends after an item whose URI hash hits 1 in
    (target_size - min) once the shard holds at least ``target_size // 2`` items, or at
    ``2 * target_size`` items. Both depend only on the shard's own items, so dropping whole
    committed shards from the input (a resumed run) leaves the other shards unchanged, and
    inserting items disturbs only the shards next to them.
    """
    if target_size < 1:
        raise ValueError("target_size must be >= 1")
    min_size = max(1, target_size // 2)
    max_size = 2 * target_size
    modulus = max(1, target_size - min_size)
    cur: list[SourceObject] = []
    for obj in items:
        cur.append(obj)
        n = len(cur)
        if n >= max_size or (n >= min_size and _is_cut(obj.image_uri, modulus)):
            yield protocol.Shard(shard_id_for(cur, checkpoint_sha256), tuple(cur))
            cur = []
    if cur:
        yield protocol.Shard(shard_id_for(cur, checkpoint_sha256), tuple(cur))


@dataclass
class PlanStats:
    listed: int = 0
    duplicates: int = 0  # same URI listed twice (list files)
    done_in_run: int = 0  # already committed by the run being resumed
    unchanged: int = 0  # incremental: same etag, size and checkpoint as the latest row
    retry: int = 0  # incremental: unchanged, but the latest row is a storage (retryable) error
    new: int = 0
    changed: int = 0
    planned: int = 0

    def add(self, other: "PlanStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Plan:
    """What a run computes: plan files of items with their shard, the item count of each shard,
    and the shards a killed attempt already staged (their counts from the footer)."""

    files: list[str]
    expected: dict[str, int]
    staged: dict[str, dict]
    stats: PlanStats


class ListingError(RuntimeError):
    """The input could not be listed (after the listing's own retries); ``missing``: it does not exist."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing

    def __reduce__(self):  # a listing task returns it: ``missing`` must survive the pickle
        return ListingError, (str(self), self.missing)


# ------------------------------------------------------------------ listing, scattered by bucket

def listed_table(objects: list[SourceObject], first_order: int) -> pa.Table:
    return pa.Table.from_pydict({
        "image_uri": [o.image_uri for o in objects],
        "source_etag": [o.source_etag for o in objects],
        "source_size": [o.source_size for o in objects],
        "error": [o.error for o in objects],
        "error_kind": [o.error_kind for o in objects],
        "listing_order": np.arange(first_order, first_order + len(objects), dtype=np.int64),
    }, schema=LISTED_SCHEMA)


def plan_table(objects: pa.Table, shard_ids: list[str]) -> pa.Table:
    """Plan rows (:data:`PLAN_SCHEMA`): ``objects`` (a listed or planned table) with their shard
    ids; an unknown size becomes the plan's -1."""
    sizes = pc.fill_null(objects.column("source_size"), -1)
    items = objects.select(PLAN_SCHEMA.names[:-1]).set_column(2, "source_size", sizes)
    return items.append_column(SHARD_COLUMN, pa.array(shard_ids, pa.string())).cast(PLAN_SCHEMA)


def new_plan_dir(run: protocol.Run) -> str:
    """A fresh folder for one planning's files, under the run's staging."""
    return join(run.output.staging_dir(run.run_id), f"plan-{uuid.uuid4().hex[:8]}")


def write_shards_plan(run: protocol.Run, shards: Iterable[protocol.Shard]) -> tuple[list[str], dict[str, int]]:
    """The plan of a later pass: the items of ``shards`` (deferred shards: few) as one plan file.
    Returns (plan file paths, shard_id -> item count)."""
    shards = list(shards)
    if not shards:
        return [], {}
    path = join(new_plan_dir(run), "plan-retry.parquet")
    items = listed_table([o for s in shards for o in s.items], 0)
    run.output.write_parquet(path, plan_table(items, [s.shard_id for s in shards for _ in s.items]))
    return [path], {s.shard_id: len(s.items) for s in shards}


@dataclass(frozen=True)
class Scattered:
    """A listed part: its objects' files by bucket, and how many it listed."""

    spills: dict[int, list[str]]
    listed: int


@dataclass(frozen=True)
class BucketPlanned:
    """A bucket's plan: its counts, and how many of its objects the run processes."""

    stats: PlanStats
    planned: int


@dataclass(frozen=True)
class ShardsCut:
    """A group's shards: items to compute by shard_id, the shards a killed attempt already staged
    (shard_id -> counts), and the plan file of the former (None when there are none)."""

    expected: dict[str, int]
    staged: dict[str, dict]
    plan: Optional[str]


def scatter_part(output: Output, part: Part, index: int, extensions: frozenset, retry: RetryPolicy, buckets: int,
                 listed_dir: str) -> Scattered | ListingError:
    """List one part and write its objects by bucket. A listing that fails is returned, not raised
    (a task's exception would reach the driver wrapped): the driver raises it."""
    spills: dict[int, list[str]] = {}
    n = 0
    try:
        for c, chunk in enumerate(chunks(part_objects(part, extensions=extensions, retry=retry), LISTING_CHUNK)):
            for b, rows in split_by_bucket(listed_table(chunk, (index << 32) + n), buckets):
                path = join(listed_dir, f"b{b:04d}", f"{index:06d}-{c:05d}.parquet")
                output.write_parquet(path, rows)
                spills.setdefault(b, []).append(path)
            n += len(chunk)
    except FileNotFoundError as e:
        return ListingError(" ".join(str(e).split()), missing=True)
    except Exception as e:  # noqa: BLE001  (after the listing's retries: an infrastructure failure)
        return ListingError(describe_error(e))
    return Scattered(spills, n)


# ------------------------------------------------------------------ the join, per bucket

def _equal(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """Element-wise equality where two nulls are equal."""
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(both_null, pc.fill_null(pc.equal(a, b), False))


def plan_rows(listed: pa.Table, state: pa.Table, *, run_id: Optional[str], checkpoint_sha256: str, full: bool,
              settings: Optional[str] = None, retry_errors: bool = False) -> tuple[pa.Table, PlanStats]:
    """The listed objects (``LISTED_SCHEMA``) a run must process, given the state rows
    (``state.STATE_SCHEMA``: the latest row per image, and the rows of unfinished runs) of the
    same bucket; sorted by image_uri."""
    stats = PlanStats(listed=listed.num_rows)
    listed = listed.sort_by([("image_uri", "ascending"), ("listing_order", "ascending")])
    first = schema.first_of_each(listed.column("image_uri"))  # repeats: keep the first listed
    stats.duplicates = int(len(first) - first.sum())
    listed = listed.filter(pa.array(first))
    if run_id is not None:  # committed in this run already (whichever row is the latest)
        in_run = state.filter(pc.equal(state.column("run_id"), run_id)).column("image_uri")
        done = pc.is_in(listed.column("image_uri"), in_run.combine_chunks())
        stats.done_in_run = pc.sum(done).as_py() or 0
        listed = listed.filter(pc.invert(done))
    latest = schema.latest_rows(state).select(["image_uri", "source_etag", "source_size", "checkpoint_sha256", "settings", "status",
                            "error_kind"])
    latest = latest.rename_columns(["image_uri"] + [f"s_{c}" for c in latest.column_names[1:]])
    latest = latest.append_column("s_present", pa.array(np.ones(latest.num_rows, dtype=bool)))
    joined = listed.join(latest, "image_uri", join_type="left outer").sort_by(
        [("image_uri", "ascending")])
    present = pc.fill_null(joined.column("s_present"), False)
    same = pc.and_(
        pc.and_(_equal(joined.column("s_source_etag"), joined.column("source_etag")),
                _equal(joined.column("s_source_size"), joined.column("source_size"))),
        pc.and_(pc.fill_null(pc.equal(joined.column("s_checkpoint_sha256"), checkpoint_sha256), False),
                _equal(joined.column("s_settings"), pa.array([settings] * joined.num_rows, pa.string()))))
    failed = pc.fill_null(pc.equal(joined.column("s_status"), schema.STATUS_ERROR), False)
    retryable = pc.is_in(joined.column("s_error_kind"), pa.array(sorted(schema.RETRYABLE_ERROR_KINDS)))
    retry = pc.and_(failed, pc.or_(pa.scalar(retry_errors), pc.fill_null(retryable, False)))
    present_np = present.to_numpy(zero_copy_only=False)
    if full:
        unchanged = np.zeros(joined.num_rows, dtype=bool)
        retried = unchanged
    else:
        same_np = pc.and_(present, same).to_numpy(zero_copy_only=False)
        retry_np = retry.to_numpy(zero_copy_only=False)
        unchanged = same_np & ~retry_np
        retried = same_np & retry_np
    planned = ~unchanged
    stats.unchanged = int(unchanged.sum())
    stats.new = int((~present_np).sum())
    stats.retry = int(retried.sum())
    stats.changed = int((present_np & planned & ~retried).sum())
    stats.planned = int(planned.sum())
    return joined.filter(pa.array(planned)).select(LISTED_SCHEMA.names[:-1]), stats


def _items(table: pa.Table) -> Iterator[SourceObject]:
    for uri, etag, size, error, kind in zip(*(table.column(c).to_pylist() for c in PLAN_SCHEMA.names[:-1])):
        yield SourceObject(uri, etag, size, error, kind)


def plan_bucket(run: protocol.Run, listed_paths: list[str], state_path: Optional[str], planned_path: str, *,
                checkpoint_sha256: str, full: bool, settings: Optional[str], retry_errors: bool) -> BucketPlanned:
    """Plan one bucket (a task): its planned objects, sorted by URI, go to ``planned_path``."""
    output = run.output
    listed = pa.concat_tables([output.read_parquet(p) for p in listed_paths]) if listed_paths else \
        LISTED_SCHEMA.empty_table()
    state_rows = output.read_parquet(state_path).cast(STATE_SCHEMA) if state_path else STATE_SCHEMA.empty_table()
    planned, stats = plan_rows(listed, state_rows, run_id=run.run_id, checkpoint_sha256=checkpoint_sha256, full=full,
                               settings=settings, retry_errors=retry_errors)
    if planned.num_rows:
        output.write_parquet(planned_path, planned)
    return BucketPlanned(stats, planned.num_rows)


def group_buckets(planned: list[int], target_size: int) -> list[list[int]]:
    """Consecutive buckets grouped until a group plans at least ``target_size`` objects (a short
    last group joins the one before), so that a small run is not cut into one shard per bucket."""
    groups: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for b, count in enumerate(planned):
        if not count:
            continue
        cur.append(b)
        n += count
        if n >= target_size:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        if groups:
            groups[-1].extend(cur)
        else:
            groups.append(cur)
    return groups


def shard_group(run: protocol.Run, planned_paths: list[str], plan_path: str, *, checkpoint_sha256: str,
                target_size: int) -> ShardsCut:
    """Cut a group's planned objects (its buckets in order, each sorted by URI) into shards (a task).
    The items of shards a killed attempt did not stage go to ``plan_path`` with their shard_id."""
    planned = pa.concat_tables([run.output.read_parquet(p) for p in planned_paths])
    expected: dict[str, int] = {}
    staged: dict[str, dict] = {}
    shard_ids: list[str] = []
    for shard in make_shards(_items(planned), checkpoint_sha256=checkpoint_sha256, target_size=target_size):
        if run.is_staged(shard):
            staged[shard.shard_id] = run.staged_counts(shard.shard_id)
            shard_ids += [""] * len(shard.items)  # left out of the plan
        else:
            expected[shard.shard_id] = len(shard.items)
            shard_ids += [shard.shard_id] * len(shard.items)
    path = None
    if expected:
        plan = plan_table(planned, shard_ids)
        run.output.write_parquet(plan_path, plan.filter(pc.not_equal(plan.column(SHARD_COLUMN), "")))
        path = plan_path
    return ShardsCut(expected, staged, path)


def make_plan(run: protocol.Run, input_uri: str, version: StateVersion, *, checkpoint_sha256: str, full: bool,
              settings: Optional[str] = None, retry_errors: bool = False,
              target_size: int = DEFAULT_SHARD_SIZE, list_tasks: int = DEFAULT_TARGET_PARTS,
              extensions: Iterable[str] = IMAGE_EXTENSIONS, retry: RetryPolicy = RetryPolicy()) -> Plan:
    """List ``input_uri`` and plan the run against the state ``version``, in tasks when Ray runs.

    Raises :class:`ListingError` when the input cannot be listed."""
    fs = run.fs
    plan_dir = new_plan_dir(run)
    listed_dir = join(plan_dir, "listed")
    try:
        parts = input_parts(input_uri, list_tasks=list_tasks, retry=retry)
    except FileNotFoundError as e:
        raise ListingError(" ".join(str(e).split()), missing=True) from None
    except Exception as e:  # noqa: BLE001
        raise ListingError(describe_error(e)) from None
    exts = frozenset(e.lower() for e in extensions)
    scattered = run_tasks(scatter_part, [(run.output, p, i, exts, retry, version.buckets, listed_dir)
                                         for i, p in enumerate(parts)])
    spills: dict[int, list[str]] = {}
    listed = 0
    for s in scattered:
        if isinstance(s, ListingError):
            raise s
        listed += s.listed
        for b, paths in s.spills.items():
            spills.setdefault(b, []).extend(paths)
    planned_path = lambda b: join(plan_dir, "planned", f"b{b:04d}.parquet")  # noqa: E731
    planned = run_tasks(plan_bucket, [(run, spills.get(b, []), version.bucket_path(b), planned_path(b))
                                      for b in range(version.buckets)],
                        {"checkpoint_sha256": checkpoint_sha256, "full": full, "settings": settings,
                         "retry_errors": retry_errors}, rows=listed + version.rows)
    plan = Plan([], {}, {}, PlanStats())
    for r in planned:
        plan.stats.add(r.stats)
    # Grouped by what the run plans in all (planned now, or committed by an earlier attempt): a
    # resumed run groups the buckets as its first attempt did, so its uncommitted shards are the same.
    groups = group_buckets([r.planned + r.stats.done_in_run for r in planned], target_size)
    groups = [[b for b in g if planned[b].planned] for g in groups]
    sharded = run_tasks(shard_group, [(run, [planned_path(b) for b in g], join(plan_dir, f"plan-b{g[0]:04d}.parquet"))
                                      for g in groups if g],
                        {"checkpoint_sha256": checkpoint_sha256, "target_size": target_size}, rows=plan.stats.planned)
    for r in sharded:
        plan.expected.update(r.expected)
        plan.staged.update(r.staged)
        if r.plan:
            plan.files.append(r.plan)
    for d in (listed_dir, join(plan_dir, "planned")):  # the listing's copy; the plan files stay for the pipeline
        try:
            fs.rm(d, recursive=True)
        except FileNotFoundError:
            pass
    return plan
