"""Shard collection without Ray or storage: ``collect.ShardCollector`` says when a shard's part
files hold all its images, and ``pipeline.commit_parts`` stages and commits it then, defers it,
or waits for more parts."""

from __future__ import annotations

import pyarrow as pa
import pytest

from jobs.infer.collect import Complete, ShardCollector
from jobs.infer.execute.parts import PART_SCHEMA, Deferred, Incomplete, Staged
from jobs.infer.pipeline import commit_parts
from jobs.infer.schema import SourceObject
from jobs.infer.summary import RunSummary


def test_a_shard_is_complete_when_its_parts_hold_its_images():
    c = ShardCollector({"A": 5, "B": 2})
    assert c.add("A", "a1", 2) is None and c.add("B", "b1", 1) is None
    assert c.seen("A", "a1") and c.add("A", "a1", 2) is None  # a re-executed task's part again
    assert c.add("A", "a2", 3) == Complete("A", ("a1", "a2"), 5)
    c.finished("A")
    assert c.seen("A", "a3") and c.add("A", "a3", 1) is None  # late parts of a done shard
    with pytest.raises(RuntimeError, match="1 shards got no complete results"):
        c.check_all_done()
    assert c.add("B", "b2", 1) == Complete("B", ("b1", "b2"), 2)
    c.finished("B")
    c.check_all_done()
    with pytest.raises(RuntimeError, match="unknown shard C"):
        c.add("C", "c1", 1)


def test_overlapping_parts_wait_for_more_and_held_rows_complete_a_shard():
    held = {"A": Deferred(kept=("a-kept",), kept_rows=3, retry=(SourceObject("s3://b/x", "e", 1),))}
    c = ShardCollector({"A": 2}, held)
    assert c.add("A", "a1", 2) == Complete("A", ("a1",), 5, ("a-kept",))
    c.incomplete("A", missing=1)  # the parts held one image fewer than counted
    assert c.add("A", "a2", 1) == Complete("A", ("a1", "a2"), 5, ("a-kept",))


class FakeRun:
    def __init__(self):
        self.committed = []

    def commit(self, shard_id):
        self.committed.append(shard_id)


def _parts(*rows):
    return pa.Table.from_pylist([{"shard_id": s, "part": p, "rows": n, "storage_failures": 0, "failure": None}
                                 for s, p, n in rows], schema=PART_SCHEMA)


def test_commit_parts_stages_commits_defers_and_waits():
    calls = []
    counts = {"rows": 3, "ok": 3, "instances": 7, "error_kinds": {}, "error_reasons": {}}
    answers = {"A": [Incomplete(1), Staged(counts)], "B": [Deferred((), 0, (SourceObject("u", "e", 1),))]}

    def finalize(run, shard_id, parts, images, *, final, pass_no, kept):
        calls.append((shard_id, tuple(parts), images))
        return answers[shard_id].pop(0)

    run, summary, progress = FakeRun(), RunSummary("r"), []
    batches = [_parts(("A", "a1", 2), ("B", "b1", 1)), _parts(("A", "a2", 1), ("A", "a2", 1), ("A", "a3", 1))]
    deferred = commit_parts(run, iter(batches), ShardCollector({"A": 3, "B": 1}), summary, final=False,
                            finalize=finalize, progress=lambda done, committed: progress.append((done, committed)))
    assert calls == [("B", ("b1",), 1), ("A", ("a1", "a2"), 3), ("A", ("a1", "a2", "a3"), 3)]
    assert run.committed == ["A"] and list(deferred) == ["B"] and summary.deferred == 1 and summary.ok == 3
    assert summary.part_rows == 5 and progress == [(2, 0), (1, 0), (1, 0), (1, 0), (0, 3)]
