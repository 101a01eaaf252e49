"""Which shards are complete: the driver's bookkeeping of the part files the workers write.

The workers write a shard's rows as part files and send the driver one row per part
(``execute.parts.PART_SCHEMA``). :class:`ShardCollector` follows those rows for one pass and
says when a shard's parts hold all its images; the driver then has the shard assembled and
staged (``parts.finalize_shard``) and commits it (``pipeline.commit_parts``). It is plain
bookkeeping, no I/O and no Ray, so it is tested alone (``tests/test_infer_collect.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from jobs.infer.execute.parts import Deferred


@dataclass(frozen=True)
class Complete:
    """A shard whose parts hold all its images: assemble ``images`` images from ``kept`` (the
    previous pass's rows of its deferred images) and ``parts``."""

    shard_id: str
    parts: tuple[str, ...]
    images: int
    kept: tuple[str, ...] = ()


@dataclass
class ShardCollector:
    """The shards of one pass: ``expected`` (shard_id -> images this pass computes) and ``held``
    (shards the previous pass deferred, whose kept rows complete them)."""

    expected: dict[str, int]
    held: dict[str, Deferred] = field(default_factory=dict)
    _parts: dict[str, list[str]] = field(default_factory=dict, init=False)
    _rows: dict[str, int] = field(default_factory=dict, init=False)
    _done: set[str] = field(default_factory=set, init=False)

    def seen(self, shard_id: str, part: str) -> bool:
        """A part seen before (a re-executed task writes the same file again), or of a shard
        already done: it counts for nothing."""
        return shard_id in self._done or part in self._parts.get(shard_id, ())

    def add(self, shard_id: str, part: str, rows: int) -> Optional[Complete]:
        """One new part of ``rows`` rows; the shard when this part completes it."""
        if self.seen(shard_id, part):
            return None
        if shard_id not in self.expected:
            raise RuntimeError(f"result part for unknown shard {shard_id}")
        self._parts.setdefault(shard_id, []).append(part)
        self._rows[shard_id] = self._rows.get(shard_id, 0) + rows
        if self._rows[shard_id] < self.expected[shard_id]:
            return None
        held = self.held.get(shard_id)
        return Complete(shard_id, tuple(self._parts[shard_id]), self.expected[shard_id] + (held.kept_rows if held else 0),
                        held.kept if held else ())

    def incomplete(self, shard_id: str, missing: int) -> None:
        """The shard's parts held ``missing`` images fewer than counted (the parts of a re-executed
        task overlap): wait for more."""
        self._rows[shard_id] = self.expected[shard_id] - missing

    def finished(self, shard_id: str) -> None:
        """The shard is staged and committed, or deferred: later parts of it count for nothing."""
        self.expected.pop(shard_id)
        del self._rows[shard_id], self._parts[shard_id]
        self._done.add(shard_id)

    def check_all_done(self) -> None:
        if self.expected:
            raise RuntimeError(f"{len(self.expected)} shards got no complete results: {sorted(self.expected)[:3]}...")
