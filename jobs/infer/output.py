"""The job's output location, owned in one place: its URI, its filesystem, and the layout under it.

Everything the job keeps under OUT::

    OUT/run_id=<run_id>/part-<shard_id>.parquet      committed rows: what readers see
    OUT/_staging/<run_id>/part-<shard_id>.parquet    a staged shard, not yet committed
    OUT/_staging/<run_id>/parts/<shard_id>/*.parquet part files the workers write
    OUT/_staging/<run_id>/plan-<id>/                 a run's plan files
    OUT/_runs/<run_id>/                              run.json, summary.json, manifest.json, _SUCCESS, report.html
    OUT/_state/                                      the state table (``commit/state.py``)
    OUT/_writer.json                                 the writer lease (``commit/lock.py``)

An :class:`Output` is made from the URI (``Output.of``) and resolves its filesystem once per
process: handles of the same URI and storage settings share one resolved filesystem, and a
pickled handle (a ``Run`` sent to a worker) travels without it and resolves again, once, in the
worker's process. Readers skip every ``_`` folder, as Spark and DuckDB do.

The job's files under OUT are read and written through the handle: whole-object writes that
readers never see half done (``write``, ``write_json``, ``write_parquet``), exclusive creates
(``exclusive=True``: the run's ``run.json`` and ``_SUCCESS``, the lease), one-GET JSON reads.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.storage import create_exclusive, join, read_json, resolve, storage_options, write_atomic

STAGING_DIR = "_staging"
RUNS_DIR = "_runs"
STATE_DIR = "_state"
LOCK_NAME = "_writer.json"
PARTITION_KEY = "run_id"
SUCCESS_NAME = "_SUCCESS"
VISIBLE_GLOB = f"{PARTITION_KEY}=*/part-*.parquet"  # also the DuckDB glob (never matches _staging)

# (uri, storage settings) -> (filesystem, root): one resolve per process and output
_RESOLVED: dict[tuple, tuple[Any, str]] = {}
_LOCK = threading.Lock()


class Output:
    """The output location of a run: ``uri`` and its ``storage_options`` (the AWS environment's
    when not given); ``fs`` and ``root`` resolved once per process."""

    def __init__(self, uri: str, storage_options: Optional[dict] = None):
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self._found: Optional[tuple[Any, str]] = None

    @classmethod
    def of(cls, output: "Output | str") -> "Output":
        return output if isinstance(output, Output) else cls(output)

    def _resolved(self) -> tuple[Any, str]:
        if self._found is None:
            # the environment's S3 settings are part of the key: a new endpoint is another filesystem
            key = (self.uri, tuple(sorted({**storage_options(self.uri), **self.storage_options}.items(), key=str)))
            with _LOCK:
                if key not in _RESOLVED:
                    _RESOLVED[key] = resolve(self.uri, self.storage_options or None)
                self._found = _RESOLVED[key]
        return self._found

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_found": None}  # the filesystem stays in this process

    @property
    def fs(self):
        return self._resolved()[0]

    @property
    def root(self) -> str:
        return self._resolved()[1]

    def __eq__(self, other) -> bool:
        return isinstance(other, Output) and (self.uri, self.storage_options) == (other.uri, other.storage_options)

    def __hash__(self) -> int:
        return hash(self.uri)

    def __repr__(self) -> str:  # storage options may hold credentials: never shown
        return f"Output({self.uri!r})"

    # ------------------------------------------------------------------ layout

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def visible_path(self, run_id: str, shard_id: str) -> str:
        return self.path(f"{PARTITION_KEY}={run_id}", f"part-{shard_id}.parquet")

    def staging_dir(self, run_id: str) -> str:
        return self.path(STAGING_DIR, run_id)

    def staged_path(self, run_id: str, shard_id: str) -> str:
        return self.path(STAGING_DIR, run_id, f"part-{shard_id}.parquet")

    def part_path(self, run_id: str, shard_id: str, name: str) -> str:
        return self.path(STAGING_DIR, run_id, "parts", shard_id, f"{name}.parquet")

    def run_path(self, run_id: str, name: str = "") -> str:
        return self.path(RUNS_DIR, run_id, name) if name else self.path(RUNS_DIR, run_id)

    def state_path(self, *parts: str) -> str:
        return self.path(STATE_DIR, *parts)

    def lock_path(self) -> str:
        return self.path(LOCK_NAME)

    # ------------------------------------------------------------------ files under OUT

    def write(self, path: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Write ``path`` whole (readers see the old content or the new); with ``exclusive``, only
        if it does not exist yet: False when it did."""
        if exclusive:
            return create_exclusive(self.fs, path, data)
        write_atomic(self.fs, path, data)
        return True

    def write_json(self, path: str, obj: Any, *, exclusive: bool = False) -> bool:
        return self.write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), exclusive=exclusive)

    def read_json(self, path: str) -> Any:
        """A JSON file another process may be replacing, in one GET (``storage.read_json``)."""
        return read_json(self.fs, path)

    def write_parquet(self, path: str, table: pa.Table, **options: Any) -> None:
        """One Parquet file, serialised in memory first (zstd unless ``options`` say otherwise)."""
        options.setdefault("compression", "zstd")
        sink = io.BytesIO()
        pq.write_table(table, sink, **options)
        write_atomic(self.fs, path, sink.getvalue())

    def read_parquet(self, path: str, columns: Optional[list[str]] = None, schema: Optional[pa.Schema] = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns, schema=schema)

    # ------------------------------------------------------------------ readers

    def committed_files(self, run_id: Optional[str] = None) -> list[str]:
        """Paths of the committed (visible) Parquet files under the output root: all, or one run's."""
        fs, root = self.fs, self.root
        fs.invalidate_cache(root)  # object-store listings are cached per instance
        if not fs.exists(root):
            return []
        glob = VISIBLE_GLOB if run_id is None else f"{PARTITION_KEY}={run_id}/part-*.parquet"
        return sorted(fs.glob(join(root, glob)))
