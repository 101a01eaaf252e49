"""Commit protocol of the batch job: staged shard files, atomic publish, per-run markers.

The files it writes under the output root (their paths: ``output.py``; DESIGN.md has the
reasoning and every crash point): a shard staged in ``_staging/<run_id>/``, committed under
``run_id=<run_id>/`` (what plain readers see), and the run's ``run.json`` (written first),
``manifest.json`` and ``_SUCCESS`` (written last: the run is complete) in ``_runs/<run_id>/``.

Unit of commit: one shard file. A shard is a run of consecutive planned inputs;
``shard_id`` is a hash of its (uri, etag, size) items and the checkpoint, so the same
work always lands in the same file name. A shard is committed the moment its file
appears under ``run_id=<run_id>/``, which is atomic on every store (local: ``os.replace``;
object stores: a server-side copy, then the staged copy is deleted). So "visible" and
"committed" are the same thing, and readers never see a partial file.

Exactly one row per image per run, across kills and reruns:

* a rerun of the same command resumes the newest unfinished run with the same parameters
  (same run_id), instead of starting a new one;
* planning (``plan/planner.py``, against the state table of ``state.py``) drops images that already
  have a committed row in that run, so no image is written twice in a run, whatever was
  listed again;
* shards are cut by content (``planner.make_shards``): the cut after an item depends only on
  that item's URI and its position inside its shard, so removing whole committed shards
  from the plan leaves every other shard exactly as before (same shard_id: a shard staged
  before the kill is committed as is instead of being recomputed), and objects that
  appear in the listing between the kill and the rerun change only the shards around
  them (fixed-size chunks would all shift);
* :meth:`Run.stage` refuses a table that does not hold exactly one row per shard item,
  and ``state.finish_run`` refuses to write _SUCCESS if the run's files hold an image twice.

Across runs an image has one row per run that processed it; "the latest result per
image" is the row with the greatest (processed_at, run_id), see DESIGN.md for the DuckDB
and Spark queries. The state table (``state.py``) keeps that same latest row per image for
incremental planning.

One writer per output root at a time: ``pipeline.run_job`` holds the output's writer
lease (``lock.py``) around all of this. Tests give a run an ``on_step`` hook to stop it between
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
from typing import Any, Callable, Mapping, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.infer import schema
from jobs.infer.errors import RunMismatchError
from jobs.infer.output import RUNS_DIR, SUCCESS_NAME, Output
from jobs.infer.schema import SourceObject
from jobs.storage import is_local, join


# A run's crash points: on_step(step_name, detail) is called after each durable step (a Run
# carries it to the workers). Tests raise there, or kill the process, to stop a run at that
# point; None in production.
OnStep = Optional[Callable[[str, str], None]]


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


def list_runs(output: Output | str) -> list[RunInfo]:
    """Runs recorded under ``_runs/`` (those with a run.json), oldest first."""
    output = Output.of(output)
    fs, root = output.fs, output.root
    runs_dir = join(root, RUNS_DIR)
    fs.invalidate_cache(root)
    if not fs.exists(runs_dir):
        return []
    out = []
    for d in sorted(fs.ls(runs_dir, detail=False)):
        meta_path = join(d, "run.json")
        if not fs.exists(meta_path):
            continue  # killed before run.json was written: nothing was done in it
        meta = output.read_json(meta_path)
        out.append(
            RunInfo(
                meta["run_id"], meta["params"], meta["fingerprint"], meta["started_at"],
                fs.exists(join(d, SUCCESS_NAME)),
            )
        )
    return sorted(out, key=lambda r: (r.started_at, r.run_id))


@dataclass(frozen=True)
class Run:
    """One run's handle; picklable (its output travels without its filesystem) so workers can
    commit too."""

    output: Output  # a URI is taken as Output(uri)
    run_id: str
    resumed: bool = False
    params: dict = field(default_factory=dict)
    # key-value metadata every output file of the run carries (e.g. the model's keypoint names)
    file_metadata: dict = field(default_factory=dict)
    on_step: OnStep = field(default=None, compare=False, repr=False)

    def step(self, name: str, detail: str = "") -> None:
        """A durable step is done (a crash point for tests)."""
        if self.on_step is not None:
            self.on_step(name, detail)

    def __post_init__(self):
        object.__setattr__(self, "output", Output.of(self.output))

    # paths
    def staged_path(self, shard_id: str) -> str:
        return self.output.staged_path(self.run_id, shard_id)

    def visible_path(self, shard_id: str) -> str:
        return self.output.visible_path(self.run_id, shard_id)

    def part_path(self, shard_id: str, name: str) -> str:
        """A part file of a shard's rows, written by a worker (``execute/parts.py``)."""
        return self.output.part_path(self.run_id, shard_id, name)

    @property
    def fs(self):
        return self.output.fs

    def run_path(self, name: str) -> str:
        return self.output.run_path(self.run_id, name)

    # shards
    def is_staged(self, shard: Shard) -> bool:
        """True if a complete staged file for exactly this shard exists (footer checked)."""
        fs = self.fs
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
        fs = self.fs
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
        expected = [o.image_uri for o in shard.items]
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
        path = self.staged_path(shard.shard_id)
        self.output.write_parquet(path, table, **schema.PARQUET_WRITE_OPTIONS)  # serialised before a byte is sent
        self.step("staged", shard.shard_id)
        return path

    def commit(self, shard_id: str) -> str:
        """Publish a staged shard under ``run_id=<run_id>/``; idempotent. Returns the path."""
        fs = self.fs
        staged, visible = self.staged_path(shard_id), self.visible_path(shard_id)
        if is_local(fs):
            os.makedirs(posixpath.dirname(visible), exist_ok=True)
            try:
                os.replace(staged, visible)  # atomic publish
            except FileNotFoundError:
                if not os.path.exists(visible):
                    raise FileNotFoundError(f"shard {shard_id} is neither staged nor committed") from None
            self.step("committed", shard_id)
            return visible
        if fs.exists(staged):
            fs.copy(staged, visible)  # server-side copy: the visible object appears whole
            self.step("copied", shard_id)
            fs.rm(staged)
        elif not fs.exists(visible):
            raise FileNotFoundError(f"shard {shard_id} is neither staged nor committed")
        self.step("committed", shard_id)
        return visible

    # end of run
    def committed_files(self) -> list[str]:
        return self.output.committed_files(self.run_id)

    def finish(self, files: list[dict], extra: Mapping[str, Any] | None = None) -> dict:
        """Write manifest.json, then _SUCCESS (exclusive create), then drop the staging dir.

        ``files``: the run's committed files (path relative to the output root, rows, bytes), as
        ``state.fold`` gives them once it has checked that no image has two rows in the run
        (``state.finish_run`` does both). Returns the manifest.
        """
        listed = {posixpath.relpath(p, self.output.root) for p in self.committed_files()}
        given = {f["path"] for f in files}
        if given != listed:
            raise RuntimeError(f"run {self.run_id}: the manifest's files are not the committed files "
                               f"({len(given)} given, {len(listed)} committed)")
        entries = [{"path": f["path"], "rows": int(f["rows"]), "bytes": int(f["bytes"])} for f in files]
        total = sum(e["rows"] for e in entries)
        manifest = {
            "run_id": self.run_id,
            "params": self.params,
            "files": entries,
            "rows": total,
            "finished_at": _now().isoformat(),
            **(dict(extra) if extra else {}),
        }
        self.output.write_json(self.run_path("manifest.json"), manifest)
        self.step("manifest", self.run_id)
        self.output.write_json(self.run_path(SUCCESS_NAME), {"run_id": self.run_id, "rows": total}, exclusive=True)
        self.step("success", self.run_id)
        _remove_staging(self.output, self.run_id)
        self.step("cleaned", self.run_id)
        return manifest


def _remove_staging(output: Output, run_id: str) -> None:
    d, fs = output.staging_dir(run_id), output.fs
    try:
        if fs.exists(d):
            fs.rm(d, recursive=True)
    except FileNotFoundError:
        pass


def begin_run(output: Output | str, params: Mapping[str, Any], *, run_id: str | None = None,
              on_step: OnStep = None) -> Run:
    """Resume the newest unfinished run with the same ``params``, or start a new one.

    ``params`` are the user-visible settings that define "the same command" (input URI,
    checkpoint sha, model, --full, limits). With an explicit ``run_id`` that run is
    resumed (its params must match) or created. Also removes staging leftovers of runs
    that already finished (a kill after _SUCCESS).
    """
    output = Output.of(output)
    params = json.loads(json.dumps(dict(params), sort_keys=True, default=str))
    fp = params_fingerprint(params)
    runs = list_runs(output)
    for r in runs:
        if r.finished:
            _remove_staging(output, r.run_id)
    if run_id is not None:
        match = [r for r in runs if r.run_id == run_id]
        if match:
            if match[0].fingerprint != fp:
                raise RunMismatchError(f"run {run_id} exists with different parameters: {match[0].params}")
            if match[0].finished:
                raise RunMismatchError(f"run {run_id} already finished")
            return Run(output, run_id, resumed=True, params=params, on_step=on_step)
    else:
        for r in reversed(runs):
            if not r.finished and r.fingerprint == fp:
                return Run(output, r.run_id, resumed=True, params=params, on_step=on_step)
        run_id = new_run_id()
    meta = {"run_id": run_id, "params": params, "fingerprint": fp, "started_at": _now().isoformat()}
    run = Run(output, run_id, resumed=False, params=params, on_step=on_step)
    if not output.write_json(run.run_path("run.json"), meta, exclusive=True):
        raise RuntimeError(f"run {run_id} was created concurrently")
    run.step("run_created", run_id)
    return run
