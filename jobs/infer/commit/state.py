"""The committed state as a table: the latest committed row of every image, by hash bucket of its URI.

Incremental planning needs, for every image ever committed, its latest row's change key
(etag, size, checkpoint, settings) and status. Read from every committed file into one dict
on the driver, that grows with the archive (1.8 s per 100k images, ~200 bytes each); here it
is a table kept next to the output, brought up to date by a *fold* and read bucket by bucket
by the planning tasks (``plan/planner.py``)::

    OUT/_state/current.json                        {"generation": ..., "buckets": B, "rows": N}
    OUT/_state/<generation>/bucket-NNNN.parquet    the state rows of one bucket, sorted by image_uri
    OUT/_state/<generation>/covered.parquet        the committed files folded in (path, run_id, rows, bytes)

A fold reads the committed files the current generation does not cover yet (state columns
only) in map tasks that split their rows by bucket (``bucket_ids``: a keyed BLAKE2b of the URI
modulo B), then one reduce task per bucket merges the old bucket file with its new rows and
keeps, per image, the latest row (greatest ``processed_at``, then ``run_id``), and also every
row of an unfinished run (a resumed run must know each image it already committed, even where
another run's row is newer). The new generation becomes current by one atomic write of
``current.json``; a fold killed before that leaves an unreferenced folder, removed by the next
fold. Committed files never change once visible, so "covered" is a list of paths.

The job folds before planning (bringing in the files of a killed run) and before finishing a
run (so the state is current after every finished run, and the run's manifest takes its file
list and row counts from the fold). Every fold checks that the run it is given holds no image
twice, over all its rows, and refuses (RuntimeError) before switching generations.
Readers (pyarrow, Spark, DuckDB) skip ``_state`` like every ``_`` folder.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from jobs.infer import schema
from jobs.infer.commit import protocol
from jobs.infer.errors import DuplicateRowsError
from jobs.infer.output import PARTITION_KEY, Output
from jobs.infer.tasks import run_tasks
from jobs.storage import join

CURRENT_NAME = "current.json"
COVERED_NAME = "covered.parquet"
DEFAULT_BUCKETS = 64  # fixed when the state is first written; a bucket holds ~1/64 of the archive
MAP_TASKS = 64  # groups of committed files read per fold, at most
FILES_PER_MAP_TASK = 50  # committed files a map task reads, about (fewer in all: read in this process)
_HASH_KEY = b"mrcnn-state"

STATE_COLUMNS = ["image_uri", "source_etag", "source_size", "checkpoint_sha256", "settings", "status", "error_kind",
                 "run_id", "processed_at"]
STATE_SCHEMA = pa.schema([schema.SCHEMA.field(c) for c in STATE_COLUMNS])
# read from committed files with this schema, so files written before a column existed give nulls
_READ_COLUMNS = STATE_COLUMNS + ["error"]
_READ_SCHEMA = pa.schema([schema.SCHEMA.field(c) for c in _READ_COLUMNS])
COVERED_SCHEMA = pa.schema([("path", pa.string()), ("run_id", pa.string()), ("rows", pa.int64()),
                            ("bytes", pa.int64())])


def bucket_ids(uris: Iterable[str], buckets: int) -> np.ndarray:
    """The state bucket of each URI (stable across runs, machines and Python versions)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8, key=_HASH_KEY).digest(), "big") % buckets
         for u in uris), dtype=np.int32)


def split_by_bucket(table: pa.Table, buckets: int) -> Iterable[tuple[int, pa.Table]]:
    """(bucket, rows of that bucket) for every bucket ``table``'s ``image_uri`` values fall in."""
    if table.num_rows == 0:
        return
    ids = bucket_ids(table.column("image_uri").to_pylist(), buckets)
    order = np.argsort(ids, kind="stable")
    table = table.take(pa.array(order))
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    for s, e in zip(starts, ends):
        yield int(ids[s]), table.slice(int(s), int(e - s))


def legacy_error_kind(reason: Optional[str]) -> str:
    """The error kind of an error row written before ``error_kind`` existed, from its reason:
    its storage failures (``read failed: ...``, ``cannot stat source: ...``) count as ``read``,
    so they are planned again; everything else as ``decode``."""
    reason = reason or ""
    if reason.startswith("source not found") or reason.startswith("not a file"):
        return "not_found"
    if reason.startswith(("read failed", "cannot stat source")):
        return "read"
    return "decode"


def state_rows(table: pa.Table) -> pa.Table:
    """The state columns of committed rows (``_READ_COLUMNS``), error kinds of older rows derived."""
    kinds = table.column("error_kind")
    missing = pc.and_(pc.equal(table.column("status"), schema.STATUS_ERROR), pc.is_null(kinds))
    if pc.any(missing).as_py():
        reasons = table.column("error").to_pylist()
        filled = [legacy_error_kind(r) if m else k
                  for k, r, m in zip(kinds.to_pylist(), reasons, missing.to_pylist())]
        table = table.set_column(table.schema.get_field_index("error_kind"), "error_kind",
                                 pa.array(filled, pa.string()))
    return table.select(STATE_COLUMNS).cast(STATE_SCHEMA)


@dataclass(frozen=True)
class StateVersion:
    """One generation of the state table (``current.json``)."""

    output: Output
    generation: Optional[str]  # None: nothing committed yet
    buckets: int
    rows: int = 0
    checked_run: Optional[str] = None  # the run this generation's fold checked for repeats (all its rows)

    def _dir(self) -> str:
        return self.output.state_path(self.generation or "")

    def bucket_path(self, bucket: int) -> Optional[str]:
        return None if self.generation is None else join(self._dir(), f"bucket-{bucket:04d}.parquet")

    def covered(self) -> pa.Table:
        """The committed files this generation holds (``COVERED_SCHEMA``)."""
        if self.generation is None:
            return COVERED_SCHEMA.empty_table()
        return self.output.read_parquet(join(self._dir(), COVERED_NAME))

    def files_of(self, run_id: str) -> list[dict]:
        """The committed files of one run with their row counts and sizes, for its manifest."""
        t = self.covered()
        t = t.filter(pc.equal(t.column("run_id"), run_id)).sort_by("path")
        return [{"path": p, "rows": r, "bytes": b}
                for p, r, b in zip(*(t.column(c).to_pylist() for c in ("path", "rows", "bytes")))]


def current(output: Output | str) -> StateVersion:
    """The current generation (an empty version when the state was never written)."""
    output = Output.of(output)
    try:
        meta = output.read_json(output.state_path(CURRENT_NAME))
    except FileNotFoundError:
        return StateVersion(output, None, DEFAULT_BUCKETS)
    return StateVersion(output, meta["generation"], int(meta["buckets"]), int(meta.get("rows", 0)),
                        meta.get("checked_run"))


def _run_of(relpath: str) -> str:
    head = relpath.split("/", 1)[0]
    return head.split("=", 1)[1] if head.startswith(PARTITION_KEY + "=") else ""


@dataclass(frozen=True)
class Spilled:
    """What a fold's map task read and wrote: the committed files, ``(path relative to the
    output, run_id, rows, bytes)``, and its spill file of each bucket."""

    files: tuple[tuple[str, str, int, int], ...]
    spills: dict[int, str]


@dataclass(frozen=True)
class Repeats:
    """The images a run holds more than once in one bucket (``example``: one of them)."""

    images: int = 0
    example: Optional[str] = None


@dataclass(frozen=True)
class Folded:
    """One bucket of a new state generation: its rows, and the checked run's repeats."""

    rows: int
    repeats: Repeats


def fold_map(output: Output | str, paths: list[str], buckets: int, spill_dir: str, name: str) -> Spilled:
    """Read committed files (state columns) and write their rows split by bucket, one spill file
    per bucket. Returns the files' (path, run_id, rows, bytes) and the spills by bucket."""
    output = Output.of(output)
    fs, root = output.fs, output.root
    tables, files = [], []
    for path in paths:
        t = pads.dataset([path], filesystem=fs, format="parquet", schema=_READ_SCHEMA).to_table(columns=_READ_COLUMNS)
        rel = posixpath.relpath(path, root)
        files.append((rel, _run_of(rel), t.num_rows, int(fs.size(path))))
        tables.append(state_rows(t))
    spills = {}
    for b, rows in split_by_bucket(pa.concat_tables(tables) if tables else STATE_SCHEMA.empty_table(), buckets):
        spills[b] = join(spill_dir, f"b{b:04d}-{name}.parquet")
        output.write_parquet(spills[b], rows)
    return Spilled(tuple(files), spills)


def repeated_images(table: pa.Table, run_id: str) -> tuple[int, Optional[str]]:
    """(images with more than one row of ``run_id``, one of them)."""
    mine = table.filter(pc.equal(table.column("run_id"), run_id)).column("image_uri")
    counts = pc.value_counts(mine)
    twice = counts.filter(pc.greater(counts.field("counts"), 1))
    return len(twice), (twice.field("values")[0].as_py() if len(twice) else None)


def fold_reduce(output: Output | str, base: Optional[str], spills: list[str], out: str, keep_runs: list[str],
                check_run: Optional[str]) -> Folded:
    """One bucket's new state: its old rows and new rows collapsed (``schema.latest_rows``) and written to
    ``out``. Returns its row count and the images ``check_run`` holds twice."""
    output = Output.of(output)
    tables = [output.read_parquet(p).cast(STATE_SCHEMA) for p in ([base] if base else []) + spills]
    table = pa.concat_tables(tables) if tables else STATE_SCHEMA.empty_table()
    repeats = Repeats(*repeated_images(table, check_run)) if check_run else Repeats()
    table = schema.latest_rows(table, keep_runs)
    output.write_parquet(out, table)
    return Folded(table.num_rows, repeats)


def check_bucket(output: Output | str, path: str, run_id: str) -> Repeats:
    """The images of one state bucket that ``run_id`` holds twice (a task)."""
    return Repeats(*repeated_images(Output.of(output).read_parquet(path, ["image_uri", "run_id"]), run_id))


def _refuse_repeats(run_id: Optional[str], results: list[Repeats]) -> None:
    repeated = sum(r.images for r in results)
    if repeated:
        example = next(r.example for r in results if r.images)
        raise DuplicateRowsError(f"run {run_id}: {repeated} images have more than one committed row (e.g. {example})")


def fold(output: Output | str, *, check_run: Optional[str] = None, buckets: int = DEFAULT_BUCKETS,
         on_step: protocol.OnStep = None) -> StateVersion:
    """Bring the state table up to date with every committed file; return the current version.

    A no-op when every committed file is covered. ``check_run``: refuse (RuntimeError, the state
    left as it was) if that run's rows hold an image twice. ``buckets`` applies only when the
    state is first written. ``on_step``: the run's crash points (``protocol.Run.on_step``).
    """
    output = Output.of(output)
    fs, root = output.fs, output.root
    cur = current(output)
    covered = cur.covered()
    done = set(covered.column("path").to_pylist())
    new = [p for p in output.committed_files() if posixpath.relpath(p, root) not in done]
    if not new and cur.generation is None:
        return cur  # nothing committed yet: no state to write
    if not new:
        # The folds that brought the run's rows in may not have checked them: scan the state,
        # unless the run has no rows or the fold that wrote this generation checked it.
        if check_run and check_run != cur.checked_run and check_run in covered.column("run_id").to_pylist():
            _refuse_repeats(check_run, run_tasks(check_bucket, [(output, cur.bucket_path(b), check_run)
                                                                for b in range(cur.buckets)], rows=cur.rows))
        return cur
    buckets = cur.buckets if cur.generation is not None else buckets
    generation = f"g-{protocol.new_run_id()}"
    gen_dir = output.state_path(generation)
    spill_dir = join(gen_dir, "spill")
    n_groups = min(-(-len(new) // FILES_PER_MAP_TASK), MAP_TASKS)
    groups = [new[i * len(new) // n_groups:(i + 1) * len(new) // n_groups] for i in range(n_groups)]
    args = [(output, g, buckets, spill_dir, f"{i:04d}") for i, g in enumerate(groups)]
    mapped = run_tasks(fold_map, args) if n_groups > 1 else [fold_map(*args[0])]
    spills: dict[int, list[str]] = {}
    for m in mapped:
        for b, path in m.spills.items():
            spills.setdefault(b, []).append(path)
    keep_runs = [r.run_id for r in protocol.list_runs(output) if not r.finished]
    version = StateVersion(output, generation, buckets)
    files = [f for m in mapped for f in m.files]
    reduced = run_tasks(fold_reduce, [(output, cur.bucket_path(b), spills.get(b, []), version.bucket_path(b),
                                       keep_runs, check_run) for b in range(buckets)],
                        rows=cur.rows + sum(f[2] for f in files))
    _refuse_repeats(check_run, [r.repeats for r in reduced])
    new_files = pa.Table.from_pydict({n: [f[i] for f in files] for i, n in enumerate(COVERED_SCHEMA.names)},
                                     schema=COVERED_SCHEMA)
    output.write_parquet(join(gen_dir, COVERED_NAME), pa.concat_tables([covered.cast(COVERED_SCHEMA), new_files]))
    rows = sum(r.rows for r in reduced)
    output.write_json(output.state_path(CURRENT_NAME),
                      {"generation": generation, "buckets": buckets, "rows": rows, "checked_run": check_run})
    if on_step is not None:
        on_step("state", generation)
    _remove_others(fs, output.state_path(), generation)
    return StateVersion(output, generation, buckets, rows, check_run)


def _remove_others(fs, state_dir: str, generation: str) -> None:
    """Delete older generations, stray folders of killed folds and this fold's spills (best effort:
    what is left is removed by the next fold)."""
    try:
        entries = fs.ls(state_dir, detail=False)
    except FileNotFoundError:
        return
    for path in entries:
        name = posixpath.basename(path.rstrip("/"))
        if name.startswith("g-") and name != generation:
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
    try:
        fs.rm(join(state_dir, generation, "spill"), recursive=True)
    except FileNotFoundError:
        pass


def finish_run(run: protocol.Run, extra: Optional[dict] = None) -> dict:
    """Fold the run's last commits into the state (checking it holds no image twice), then write its
    manifest and ``_SUCCESS`` (``Run.finish``). Returns the manifest."""
    version = fold(run.output, check_run=run.run_id, on_step=run.on_step)
    return run.finish(version.files_of(run.run_id), extra)
