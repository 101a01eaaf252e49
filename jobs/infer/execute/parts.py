"""Result rows written by the workers: staged part files, and a shard assembled from its parts.

The model actors' rows never travel to the driver. A write stage after the model
(:func:`write_parts`, a Ray Data task) writes each block's rows, by shard, to part files under
``_staging/<run_id>/parts/<shard_id>/`` and returns one small row per part: shard, path, rows,
storage failures (with one example). A part's name is a hash of the pass and of the image URIs
it holds, so a retried or re-executed task writes the same file again instead of adding one.

Once a shard's parts hold all its images, :func:`finalize_shard` (a Ray task) reads them,
keeps one row per image, and either stages the shard's file (``Run.stage``, the commit
protocol's staged file, which the driver then publishes) or, in a pass that is not the last,
defers a shard with storage failures: its good rows go to a ``kept`` part and its failed images
back to the driver, for the next pass to read again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from jobs.infer import schema
from jobs.infer.commit import protocol
from jobs.infer.schema import SHARD_COLUMN, SourceObject

PART_SCHEMA = pa.schema([
    (SHARD_COLUMN, pa.string()), ("part", pa.string()), ("rows", pa.int64()),
    ("storage_failures", pa.int64()), ("failure", pa.string()),
])
_RETRYABLE = pa.array(sorted(schema.RETRYABLE_ERROR_KINDS))


def storage_failed(table: pa.Table) -> pa.ChunkedArray:
    """Rows whose image could not be read from the store (worth another read)."""
    return pc.fill_null(pc.is_in(table.column("error_kind"), _RETRYABLE), False)


def _write(run: protocol.Run, path: str, table: pa.Table) -> None:
    run.output.write_parquet(path, table, **schema.PARQUET_WRITE_OPTIONS)


def write_parts(batch: pa.Table, *, run: protocol.Run, pass_no: int) -> pa.Table:
    """Write ``batch`` (result rows with ``shard_id``) as one part file per shard; return a
    :data:`PART_SCHEMA` row for each."""
    out = []
    sids = batch.column(SHARD_COLUMN)
    for sid in sorted(set(sids.to_pylist())):
        rows = batch.filter(pc.equal(sids, sid)).drop_columns([SHARD_COLUMN])
        digest = hashlib.sha256("\n".join(sorted(rows.column("image_uri").to_pylist())).encode()).hexdigest()
        path = run.part_path(sid, f"p{pass_no}-{digest[:24]}")
        _write(run, path, rows)
        run.step("part written", path)
        failed = rows.filter(storage_failed(rows))
        example = None
        if failed.num_rows:
            example = f"{failed.column('error_kind')[0].as_py()}: {failed.column('error')[0].as_py()}"
        out.append({SHARD_COLUMN: sid, "part": path, "rows": rows.num_rows, "storage_failures": failed.num_rows,
                    "failure": example})
    return pa.Table.from_pylist(out, schema=PART_SCHEMA)


def _items(table: pa.Table) -> tuple[SourceObject, ...]:
    cols = (table.column(c).to_pylist() for c in ("image_uri", "source_etag", "source_size"))
    return tuple(SourceObject(u, e, s) for u, e, s in zip(*cols))


@dataclass(frozen=True)
class Incomplete:
    """The parts hold ``missing`` fewer distinct images than the shard (a re-executed task split
    its rows differently): more parts are to come."""

    missing: int


@dataclass(frozen=True)
class Deferred:
    """A complete shard held back from commit because some of its reads failed in storage:
    ``kept`` are the part files of its final rows (``kept_rows`` of them), ``retry`` the items
    the next pass reads again."""

    kept: tuple[str, ...]
    kept_rows: int
    retry: tuple[SourceObject, ...]


@dataclass(frozen=True)
class Staged:
    """The shard's file is staged (``Run.stage``); ``counts``: ``schema.shard_counts`` of its rows."""

    counts: dict


def finalize_shard(run: protocol.Run, shard_id: str, parts: Sequence[str], images: int, *, final: bool,
                   pass_no: int, kept: Sequence[str] = ()) -> Incomplete | Deferred | Staged:
    """Assemble a shard of ``images`` images from its ``kept`` and ``parts`` files: staged, or
    (not ``final``, some images failed in storage) the others kept in a part file and the failed
    ones deferred to the next pass, or incomplete."""
    table = pa.concat_tables([run.output.read_parquet(path, schema=schema.SCHEMA) for path in [*kept, *parts]])
    seen: set[str] = set()
    first = [not (u in seen or seen.add(u)) for u in table.column("image_uri").to_pylist()]
    table = table.filter(pa.array(first))  # a retried task must not give an image two rows
    if table.num_rows < images:
        return Incomplete(images - table.num_rows)
    if table.num_rows > images:
        raise RuntimeError(f"shard {shard_id}: {table.num_rows} images in its parts, {images} planned")
    failed = storage_failed(table)
    if not final and pc.any(failed).as_py():
        good = table.filter(pc.invert(failed))
        kept_parts: tuple[str, ...] = ()
        if good.num_rows:
            kept_parts = (run.part_path(shard_id, f"kept-p{pass_no}"),)
            _write(run, kept_parts[0], good)
        return Deferred(kept_parts, good.num_rows, _items(table.filter(failed)))
    run.stage(protocol.Shard(shard_id, _items(table)), table)
    return Staged(schema.shard_counts(table))


def remote_finalize() -> Optional[object]:
    """:func:`finalize_shard` as a call that runs it in a Ray task (None without Ray)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    task = ray.remote(num_cpus=0, max_retries=3)(finalize_shard)
    return lambda *args, **kwargs: ray.get(task.remote(*args, **kwargs))
