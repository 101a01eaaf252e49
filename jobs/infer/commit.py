"""Commit protocol of the batch job: staged shard files, atomic publish, per-run markers.

Layout under the output root (see DESIGN.md for the reasoning and every crash point)::

    run_id=<run_id>/part-<shard_id>.parquet    committed rows: what plain readers see
    _staging/<run_id>/part-<shard_id>.parquet  written, not yet committed (readers skip "_")
    _runs/<run_id>/run.json                    the run's parameters, written first
    _runs/<run_id>/summary.json                written by summary.py before finishing
    _runs/<run_id>/manifest.json               committed files and row counts
    _runs/<run_id>/_SUCCESS                    written last: the run is complete

Unit of commit: one shard file. A shard is a run of consecutive planned inputs;
``shard_id`` is a hash of its (uri, etag, size) items and the checkpoint, so the same
work always lands in the same file name. A shard is committed the moment its file
appears under ``run_id=<run_id>/``, which is atomic on every store (local: ``os.replace``;
object stores: a server-side copy, then the staged copy is deleted). So "visible" and
"committed" are the same thing, and readers never see a partial file.

Exactly one row per image per run, across kills and reruns:

* a rerun of the same command resumes the newest unfinished run with the same parameters
  (same run_id), instead of starting a new one;
* :func:`plan_work` drops images that already have a committed row in that run, so no
  image is written twice in a run, whatever was listed again;
* shards are cut by content (:func:`make_shards`): the cut after an item depends only on
  that item's URI and its position inside its shard, so removing whole committed shards
  from the plan leaves every other shard exactly as before (same shard_id: a shard staged
  before the kill is committed as is instead of being recomputed), and objects that
  appear in the listing between the kill and the rerun change only the shards around
  them (fixed-size chunks would all shift);
* :meth:`Run.stage` refuses a table that does not hold exactly one row per shard item,
  and :meth:`Run.finish` refuses to write _SUCCESS if the run's files hold an image twice.

Across runs an image has one row per run that processed it; "the latest result per
image" is the row with the greatest (processed_at, run_id), see DESIGN.md for the DuckDB
and Spark queries. :func:`committed_state` reads that same latest row per image for
incremental planning.

One writer per output root at a time: ``pipeline.run_job`` holds the output's writer
lease (``lock.py``) around all of this. Tests set :data:`STEP_HOOK` to stop a run between
any two steps.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import schema
from ..storage import SourceObject, create_exclusive, is_local, join, read_json, resolve, write_atomic

STAGING_DIR = "_staging"
RUNS_DIR = "_runs"
PARTITION_KEY = "run_id"
SUCCESS_NAME = "_SUCCESS"
VISIBLE_GLOB = f"{PARTITION_KEY}=*/part-*.parquet"  # also the DuckDB glob (never matches _staging)
DEFAULT_SHARD_SIZE = 1000

# Called as STEP_HOOK(step_name, detail) after each durable step; tests raise (or kill
# the process) here to simulate a crash at that point. None in production.
STEP_HOOK: Callable[[str, str], None] | None = None


def _step(name: str, detail: str = "") -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name, detail)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_run_id(now: _dt.datetime | None = None) -> str:
    """Sortable and not a number, so Hive partition inference keeps it a string."""
    now = now or _now()
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# ------------------------------------------------------------------ shards

@dataclass(frozen=True)
class Shard:
    shard_id: str
    items: tuple[SourceObject, ...]


def shard_id_for(items: Iterable[SourceObject], checkpoint_sha256: str) -> str:
    """Hash of the shard's sorted (uri, etag, size) and the checkpoint: same work, same name."""
    h = hashlib.sha256(checkpoint_sha256.encode() + b"\n")
    for uri, etag, size in sorted((o.uri, o.etag or "", -1 if o.size is None else o.size) for o in items):
        h.update(f"{uri}\t{etag}\t{size}\n".encode())
    return h.hexdigest()[:32]


def _is_cut(uri: str, modulus: int) -> bool:
    digest = hashlib.blake2b(uri.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % modulus == 0


def make_shards(
    items: Iterable[SourceObject], *, checkpoint_sha256: str, target_size: int = DEFAULT_SHARD_SIZE
) -> Iterator[Shard]:
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
        if n >= max_size or (n >= min_size and _is_cut(obj.uri, modulus)):
            yield Shard(shard_id_for(cur, checkpoint_sha256), tuple(cur))
            cur = []
    if cur:
        yield Shard(shard_id_for(cur, checkpoint_sha256), tuple(cur))


# ------------------------------------------------------------------ committed state

class StateEntry(NamedTuple):
    """The latest committed row of an image (first three fields: the change key)."""

    etag: str | None
    size: int | None
    checkpoint_sha256: str | None
    status: str
    run_id: str
    processed_at: _dt.datetime
    error_kind: str | None = None
    settings: str | None = None


class CommittedState(Mapping[str, StateEntry]):
    """image_uri -> StateEntry of its latest committed row, plus the images of one run.

    ``in_run`` holds the images with a committed row in the run given to
    :func:`committed_state` (the run being resumed), whichever row is the latest.
    Memory: one dict entry per image ever committed (about 200 bytes each).
    """

    def __init__(self, latest: dict[str, StateEntry], in_run: set[str], run_id: str | None = None):
        self._latest = latest
        self.in_run = in_run
        self.run_id = run_id

    def __getitem__(self, key: str) -> StateEntry:
        return self._latest[key]

    def __iter__(self):
        return iter(self._latest)

    def __len__(self) -> int:
        return len(self._latest)


_STATE_COLUMNS = ["image_uri", "source_etag", "source_size", "checkpoint_sha256", "status", "run_id", "processed_at",
                  "error_kind", "error", "settings"]
# Read with this schema so that files written before a column existed give nulls for it.
_STATE_SCHEMA = pa.schema([schema.SCHEMA.field(c) for c in _STATE_COLUMNS])


def legacy_error_kind(reason: str | None) -> str:
    """The error kind of an error row written before ``error_kind`` existed, from its reason:
    its storage failures (``read failed: ...``, ``cannot stat source: ...``) count as ``read``,
    so they are planned again; everything else as ``decode``."""
    reason = reason or ""
    if reason.startswith("source not found") or reason.startswith("not a file"):
        return "not_found"
    if reason.startswith(("read failed", "cannot stat source")):
        return "read"
    return "decode"


def committed_files(output_uri: str) -> list[str]:
    """Paths of every committed (visible) Parquet file under the output root."""
    fs, root = resolve(output_uri)
    fs.invalidate_cache(root)  # object-store listings are cached per instance
    if not fs.exists(root):
        return []
    return sorted(fs.glob(join(root, VISIBLE_GLOB)))


def committed_state(output_uri: str, *, run_id: str | None = None) -> CommittedState:
    """Latest committed row per image, read from the committed files (state columns only)."""
    fs, _ = resolve(output_uri)
    files = committed_files(output_uri)
    if not files:
        return CommittedState({}, set(), run_id)
    table = pads.dataset(files, filesystem=fs, format="parquet", schema=_STATE_SCHEMA).to_table(columns=_STATE_COLUMNS)
    table = table.sort_by(
        [("image_uri", "ascending"), ("processed_at", "descending"), ("run_id", "descending")]
    )
    latest: dict[str, StateEntry] = {}
    in_run: set[str] = set()
    cols = [table.column(c).to_pylist() for c in _STATE_COLUMNS]
    for uri, etag, size, ckpt, status, rid, ts, kind, reason, settings in zip(*cols):
        if uri not in latest:
            if status == schema.STATUS_ERROR and kind is None:
                kind = legacy_error_kind(reason)
            latest[uri] = StateEntry(etag, size, ckpt, status, rid, ts, kind, settings)
        if run_id is not None and rid == run_id:
            in_run.add(uri)
    return CommittedState(latest, in_run, run_id)


# ------------------------------------------------------------------ planning

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


def plan_work(
    listing: Iterable[SourceObject],
    state: Mapping[str, Any],
    checkpoint_sha256: str,
    full: bool,
    *,
    run_id: str | None = None,
    retry_errors: bool = False,
    stats: PlanStats | None = None,
    settings: str | None = None,
) -> Iterator[SourceObject]:
    """The listed objects that this run must process, streamed in listing order.

    Dropped: repeats of a URI; images already committed in ``run_id`` (``state.in_run``);
    unless ``full``, images whose latest committed row has the same etag, size, checkpoint
    and ``settings`` (the run's output settings, ``schema.settings_key``) and is not a storage error (``schema.RETRYABLE_ERROR_KINDS``: the image was
    never read); with ``retry_errors``, only images whose latest row is ok. Keeps a set of
    the URIs seen to drop repeats, so memory grows with the listing's distinct URIs, not
    its pages.
    """
    stats = stats if stats is not None else PlanStats()
    in_run: set[str] = set()
    if run_id is not None and hasattr(state, "in_run"):
        if state.run_id != run_id:
            raise ValueError(f"state was read for run {state.run_id!r}, planning run {run_id!r}")
        in_run = state.in_run
    seen: set[str] = set()
    for obj in listing:
        stats.listed += 1
        if obj.uri in seen:
            stats.duplicates += 1
            continue
        seen.add(obj.uri)
        if obj.uri in in_run:
            stats.done_in_run += 1
            continue
        entry = state.get(obj.uri)
        retry = False
        if not full and entry is not None:
            same = ((entry[0], entry[1], entry[2]) == (obj.etag, obj.size, checkpoint_sha256)
                    and getattr(entry, "settings", None) == settings)
            failed = getattr(entry, "status", schema.STATUS_OK) == schema.STATUS_ERROR
            retry = failed and (retry_errors or getattr(entry, "error_kind", None) in schema.RETRYABLE_ERROR_KINDS)
            if same and not retry:
                stats.unchanged += 1
                continue
            retry = same
        if entry is None:
            stats.new += 1
        elif retry:
            stats.retry += 1
        else:
            stats.changed += 1
        stats.planned += 1
        yield obj


# ------------------------------------------------------------------ runs

def params_fingerprint(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    params: dict
    fingerprint: str
    started_at: str
    finished: bool


def list_runs(output_uri: str) -> list[RunInfo]:
    """Runs recorded under ``_runs/`` (those with a run.json), oldest first."""
    fs, root = resolve(output_uri)
    runs_dir = join(root, RUNS_DIR)
    fs.invalidate_cache(root)
    if not fs.exists(runs_dir):
        return []
    out = []
    for d in sorted(fs.ls(runs_dir, detail=False)):
        meta_path = join(d, "run.json")
        if not fs.exists(meta_path):
            continue  # killed before run.json was written: nothing was done in it
        meta = read_json(fs, meta_path)
        out.append(
            RunInfo(
                meta["run_id"], meta["params"], meta["fingerprint"], meta["started_at"],
                fs.exists(join(d, SUCCESS_NAME)),
            )
        )
    return sorted(out, key=lambda r: (r.started_at, r.run_id))


@dataclass(frozen=True)
class Run:
    """One run's handle; picklable (holds URIs, not filesystems) so workers can commit too."""

    output_uri: str
    run_id: str
    resumed: bool = False
    params: dict = field(default_factory=dict)
    # key-value metadata every output file of the run carries (e.g. the model's keypoint names)
    file_metadata: dict = field(default_factory=dict)

    # paths
    @property
    def _fs_root(self):
        return resolve(self.output_uri)

    def staged_path(self, shard_id: str) -> str:
        return join(self._fs_root[1], STAGING_DIR, self.run_id, f"part-{shard_id}.parquet")

    def visible_path(self, shard_id: str) -> str:
        return join(self._fs_root[1], f"{PARTITION_KEY}={self.run_id}", f"part-{shard_id}.parquet")

    def part_path(self, shard_id: str, name: str) -> str:
        """A part file of a shard's rows, written by a worker (``parts.py``)."""
        return join(self._fs_root[1], STAGING_DIR, self.run_id, "parts", shard_id, f"{name}.parquet")

    @property
    def fs(self):
        return self._fs_root[0]

    def run_path(self, name: str) -> str:
        return join(self._fs_root[1], RUNS_DIR, self.run_id, name)

    # shards
    def is_staged(self, shard: Shard) -> bool:
        """True if a complete staged file for exactly this shard exists (footer checked)."""
        fs = self._fs_root[0]
        path = self.staged_path(shard.shard_id)
        try:
            with fs.open(path, "rb") as f:
                md = pq.read_metadata(f)
        except FileNotFoundError:
            return False
        except Exception:  # noqa: BLE001  (torn or foreign file: recompute and overwrite it)
            return False
        kv = md.metadata or {}
        return md.num_rows == len(shard.items) and kv.get(b"mrcnn.shard_id") == shard.shard_id.encode()

    def staged_counts(self, shard_id: str) -> dict:
        """:func:`schema.shard_counts` of a staged shard, from its footer (files staged before the
        counts were recorded there are read whole)."""
        fs = self._fs_root[0]
        with fs.open(self.staged_path(shard_id), "rb") as f:
            counts = (pq.read_metadata(f).metadata or {}).get(schema.COUNTS_KEY)
            if counts is not None:
                return json.loads(counts)
            f.seek(0)
            return schema.shard_counts(pq.read_table(f))

    def stage(self, shard: Shard, table: pa.Table) -> str:
        """Write the shard's rows to its staged file (atomically); return the path."""
        if not table.schema.equals(schema.SCHEMA, check_metadata=False):
            raise ValueError(f"shard table does not have the output schema:\n{table.schema}")
        uris = table.column("image_uri").to_pylist()
        expected = [o.uri for o in shard.items]
        if len(uris) != len(expected) or set(uris) != set(expected):
            raise ValueError(
                f"shard {shard.shard_id}: table must hold one row per shard item "
                f"({len(expected)} items, {len(uris)} rows, {len(set(uris))} distinct)"
            )
        run_ids = set(table.column("run_id").to_pylist())
        if run_ids != {self.run_id}:
            raise ValueError(f"shard rows carry run_id {sorted(run_ids)}, expected {self.run_id}")
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), **self.file_metadata, b"mrcnn.shard_id": shard.shard_id.encode(),
             b"mrcnn.run_id": self.run_id.encode(), schema.COUNTS_KEY: json.dumps(schema.shard_counts(table)).encode()}
        )
        sink = pa.BufferOutputStream()  # serialise fully before touching storage
        pq.write_table(table, sink, **schema.PARQUET_WRITE_OPTIONS)
        fs = self._fs_root[0]
        path = self.staged_path(shard.shard_id)
        write_atomic(fs, path, sink.getvalue().to_pybytes())
        _step("staged", shard.shard_id)
        return path

    def commit(self, shard_id: str) -> str:
        """Publish a staged shard under ``run_id=<run_id>/``; idempotent. Returns the path."""
        fs = self._fs_root[0]
        staged, visible = self.staged_path(shard_id), self.visible_path(shard_id)
        if is_local(fs):
            os.makedirs(posixpath.dirname(visible), exist_ok=True)
            try:
                os.replace(staged, visible)  # atomic publish
            except FileNotFoundError:
                if not os.path.exists(visible):
                    raise FileNotFoundError(f"shard {shard_id} is neither staged nor committed") from None
            _step("committed", shard_id)
            return visible
        if fs.exists(staged):
            fs.copy(staged, visible)  # server-side copy: the visible object appears whole
            _step("copied", shard_id)
            fs.rm(staged)
        elif not fs.exists(visible):
            raise FileNotFoundError(f"shard {shard_id} is neither staged nor committed")
        _step("committed", shard_id)
        return visible

    # end of run
    def committed_files(self) -> list[str]:
        fs, root = self._fs_root
        d = join(root, f"{PARTITION_KEY}={self.run_id}")
        fs.invalidate_cache(root)
        if not fs.exists(d):
            return []
        return sorted(fs.glob(join(d, "part-*.parquet")))

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict:
        """Write manifest.json, then _SUCCESS (exclusive create), then drop the staging dir.

        Refuses (RuntimeError) if the run's committed files hold an image twice.
        Returns the manifest.
        """
        fs, root = self._fs_root
        files = self.committed_files()
        entries, total = [], 0
        for path in files:
            with fs.open(path, "rb") as f:
                md = pq.read_metadata(f)
            entries.append({"path": posixpath.relpath(path, root), "rows": md.num_rows,
                            "bytes": int(fs.size(path))})
            total += md.num_rows
        if files:
            uris = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["image_uri"])
            distinct = len(set(uris.column("image_uri").to_pylist()))
            if distinct != uris.num_rows:
                raise RuntimeError(
                    f"run {self.run_id}: {uris.num_rows} committed rows but {distinct} distinct images"
                )
        manifest = {
            "run_id": self.run_id,
            "params": self.params,
            "files": entries,
            "rows": total,
            "finished_at": _now().isoformat(),
            **(dict(extra) if extra else {}),
        }
        write_atomic(fs, self.run_path("manifest.json"), _json_bytes(manifest))
        _step("manifest", self.run_id)
        create_exclusive(fs, self.run_path(SUCCESS_NAME), _json_bytes({"run_id": self.run_id, "rows": total}))
        _step("success", self.run_id)
        _remove_staging(fs, root, self.run_id)
        _step("cleaned", self.run_id)
        return manifest


def _remove_staging(fs, root: str, run_id: str) -> None:
    d = join(root, STAGING_DIR, run_id)
    try:
        if fs.exists(d):
            fs.rm(d, recursive=True)
    except FileNotFoundError:
        pass


def begin_run(output_uri: str, params: Mapping[str, Any], *, run_id: str | None = None) -> Run:
    """Resume the newest unfinished run with the same ``params``, or start a new one.

    ``params`` are the user-visible settings that define "the same command" (input URI,
    checkpoint sha, model, --full, limits). With an explicit ``run_id`` that run is
    resumed (its params must match) or created. Also removes staging leftovers of runs
    that already finished (a kill after _SUCCESS).
    """
    fs, root = resolve(output_uri)
    params = json.loads(json.dumps(dict(params), sort_keys=True, default=str))
    fp = params_fingerprint(params)
    runs = list_runs(output_uri)
    for r in runs:
        if r.finished:
            _remove_staging(fs, root, r.run_id)
    if run_id is not None:
        match = [r for r in runs if r.run_id == run_id]
        if match:
            if match[0].fingerprint != fp:
                raise ValueError(f"run {run_id} exists with different parameters: {match[0].params}")
            if match[0].finished:
                raise ValueError(f"run {run_id} already finished")
            return Run(output_uri, run_id, resumed=True, params=params)
    else:
        for r in reversed(runs):
            if not r.finished and r.fingerprint == fp:
                return Run(output_uri, r.run_id, resumed=True, params=params)
        run_id = new_run_id()
    meta = {"run_id": run_id, "params": params, "fingerprint": fp, "started_at": _now().isoformat()}
    run = Run(output_uri, run_id, resumed=False, params=params)
    if not create_exclusive(fs, run.run_path("run.json"), _json_bytes(meta)):
        raise RuntimeError(f"run {run_id} was created concurrently")
    _step("run_created", run_id)
    return run
