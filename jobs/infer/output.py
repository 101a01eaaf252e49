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
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from jobs.storage import join, resolve, storage_options

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

    @classmethod
    def of(cls, output: "Output | str") -> "Output":
        return output if isinstance(output, Output) else cls(output)

    def _resolved(self) -> tuple[Any, str]:
        # the environment's S3 settings are part of the key: a new endpoint is another filesystem
        key = (self.uri, tuple(sorted({**storage_options(self.uri), **self.storage_options}.items(), key=str)))
        with _LOCK:
            found = _RESOLVED.get(key)
            if found is None:
                found = _RESOLVED[key] = resolve(self.uri, self.storage_options or None)
        return found

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

    # ------------------------------------------------------------------ readers

    def committed_files(self) -> list[str]:
        """Paths of every committed (visible) Parquet file under the output root."""
        fs, root = self.fs, self.root
        fs.invalidate_cache(root)  # object-store listings are cached per instance
        if not fs.exists(root):
            return []
        return sorted(fs.glob(join(root, VISIBLE_GLOB)))
