"""Today's planning before the state table (the driver-side dict and per-object loop), kept as the
oracle the bucketed planning (``jobs/infer/plan/planner.py``) is compared with in tests."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import pyarrow as pa
import pyarrow.dataset as pads

from jobs.infer import schema
from jobs.infer.output import Output
from jobs.infer.plan.planner import PlanStats
from jobs.infer.commit.state import legacy_error_kind
from jobs.infer.schema import SourceObject
from jobs.storage import resolve


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


def committed_state(output_uri: str, *, run_id: str | None = None) -> CommittedState:
    """Latest committed row per image, read from the committed files (state columns only)."""
    fs, _ = resolve(output_uri)
    files = Output(output_uri).committed_files()
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
        if obj.image_uri in seen:
            stats.duplicates += 1
            continue
        seen.add(obj.image_uri)
        if obj.image_uri in in_run:
            stats.done_in_run += 1
            continue
        entry = state.get(obj.image_uri)
        retry = False
        if not full and entry is not None:
            same = ((entry[0], entry[1], entry[2]) == (obj.source_etag, obj.source_size, checkpoint_sha256)
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
