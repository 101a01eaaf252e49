"""Incremental state as a table and planning by hash bucket (jobs/infer/commit/state.py, jobs/infer/plan/planner.py).

The bucketed plan is compared with today's driver-side planner (tests/_plan_reference.py: the
committed-state dict and the per-object loop) on the same committed outputs and listings.
"""

import datetime as dt
import random
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.infer import schema
from jobs.infer.commit import protocol
from jobs.infer.commit import state
from jobs.infer.output import Output
from jobs.infer.plan import planner
from jobs.infer.plan.planner import PlanStats, group_buckets, listed_table, plan_rows
from jobs.infer.schema import SourceObject

sys.path.insert(0, str(Path(__file__).parent))
from _plan_reference import committed_state, plan_work  # noqa: E402

CKPT = "a" * 64
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _row(uri, etag, size, *, run_id, ckpt=CKPT, status="ok", kind=None, settings=None, at=0):
    meta = dict(image_uri=uri, source_etag=etag, source_size=size, model_name="m", checkpoint_sha256=ckpt,
                run_id=run_id, processed_at=T0 + dt.timedelta(minutes=at), settings=settings)
    if status == "error":
        return schema.error_row(reason=f"{kind} failure", kind=kind, **meta)
    return schema.ok_row({"boxes": [], "labels": [], "scores": [], "label_names": []}, width=4, height=4, **meta)


def _commit_rows(out, run_id, name, rows):
    """A committed file of ``rows`` in ``run_id`` (as ``Run.commit`` leaves it)."""
    d = Path(out) / f"run_id={run_id}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.rows_to_table(rows), d / f"part-{name}.parquet")


def _bucketed(listing, out, *, run_id=None, **kw):
    """The bucketed plan of ``listing`` against the state table of ``out``: planned URIs, stats."""
    version = state.fold(out)
    planned, total = [], PlanStats()
    listed = listed_table(listing, 0)
    by_bucket = dict(state.split_by_bucket(listed, version.buckets))
    for b in range(version.buckets):
        rows = Output(out).read_parquet(version.bucket_path(b)) if version.generation else state.STATE_SCHEMA.empty_table()
        got, stats = plan_rows(by_bucket.get(b, planner.LISTED_SCHEMA.empty_table()), rows, run_id=run_id,
                               checkpoint_sha256=CKPT, **kw)
        planned += got.column("image_uri").to_pylist()
        total.add(stats)
    return sorted(planned), total


def _reference(listing, out, *, run_id=None, **kw):
    stats = PlanStats()
    got = plan_work(listing, committed_state(out, run_id=run_id), CKPT, run_id=run_id, stats=stats, **kw)
    return sorted(o.image_uri for o in got), stats


# ------------------------------------------------------------------ the rules

@pytest.fixture
def rules_output(tmp_path):
    """Committed rows covering every rule; run r1 is unfinished (being resumed), r0 and r2 finished."""
    out = str(tmp_path / "out")
    r0 = protocol.begin_run(out, {"n": 0}, run_id="r0")
    r1 = protocol.begin_run(out, {"n": 1}, run_id="r1")
    r2 = protocol.begin_run(out, {"n": 2}, run_id="r2")
    _commit_rows(out, "r0", "a", [
        _row("s3://b/same", "e", 1, run_id="r0"),
        _row("s3://b/etag", "old", 1, run_id="r0"),
        _row("s3://b/size", "e", 1, run_id="r0"),
        _row("s3://b/ckpt", "e", 1, run_id="r0", ckpt="old"),
        _row("s3://b/settings", "e", 1, run_id="r0", settings='{"score_thresh": 0.5}'),
        _row("s3://b/err", "e", 1, run_id="r0", status="error", kind="decode"),
        _row("s3://b/slow", "e", 1, run_id="r0", status="error", kind="unavailable"),
        _row("s3://b/deny", "e", 1, run_id="r0", status="error", kind="access"),
        _row("s3://b/fixed", "e", 1, run_id="r0", status="error", kind="unavailable"),
    ])
    _commit_rows(out, "r1", "b", [_row("s3://b/mine", "e", 1, run_id="r1", at=5),
                                  _row("s3://b/mine-older", "e", 1, run_id="r1", at=5)])
    # a newer row of another run for an image r1 already committed: r1 must still skip it
    _commit_rows(out, "r2", "c", [_row("s3://b/mine-older", "e", 1, run_id="r2", ckpt="other", at=9),
                                  _row("s3://b/fixed", "e", 1, run_id="r2", at=9)])
    r0.finish(state.fold(out).files_of("r0"))
    r2.finish(state.fold(out).files_of("r2"))
    assert not r1.resumed
    return out


LISTING = [SourceObject(f"s3://b/{n}", "e", 2 if n == "size" else 1)
           for n in ["same", "etag", "size", "ckpt", "settings", "err", "slow", "deny", "fixed", "mine", "mine-older",
                     "new", "new"]]


@pytest.mark.parametrize("kw,expected,counts", [
    # storage errors (the image was never read) are planned again; the image's own are not
    (dict(full=False, run_id="r1"), ["ckpt", "deny", "etag", "new", "settings", "size", "slow"],
     dict(listed=13, duplicates=1, done_in_run=2, unchanged=3, new=1, changed=4, retry=2, planned=7)),
    (dict(full=False, run_id="r1", retry_errors=True), ["ckpt", "deny", "err", "etag", "new", "settings", "size", "slow"],
     dict(retry=3, unchanged=2, planned=8)),
    (dict(full=True, run_id="r1"), ["ckpt", "deny", "err", "etag", "fixed", "new", "same", "settings", "size", "slow"],
     dict(done_in_run=2, new=1, changed=9, retry=0, unchanged=0, planned=10)),
    (dict(full=True), ["ckpt", "deny", "err", "etag", "fixed", "mine", "mine-older", "new", "same", "settings", "size",
                       "slow"], dict(done_in_run=0, planned=12)),
    (dict(full=False, settings='{"score_thresh": 0.5}'), ["ckpt", "deny", "err", "etag", "fixed", "mine", "mine-older",
                                                          "new", "same", "size", "slow"], dict(unchanged=1, planned=11)),
])
def test_plan_rules_by_bucket_equal_todays(rules_output, kw, expected, counts):
    got, stats = _bucketed(LISTING, rules_output, **kw)
    assert [u.rsplit("/", 1)[1] for u in got] == expected
    for name, value in counts.items():
        assert getattr(stats, name) == value, name
    ref, ref_stats = _reference(LISTING, rules_output, **kw)
    assert got == ref and stats == ref_stats


def test_bucketed_plans_equal_todays_on_random_outputs(tmp_path):
    """Random committed outputs (several runs, finished or not, rows of every status, newer rows
    of other runs) and random listings (repeats, changes, new objects): the same plan and counts
    as the driver-side planner, in six modes, with 1, 3 and 64 buckets."""
    rng = random.Random(7)
    compared = 0
    for case in range(3):
        out = str(tmp_path / f"out{case}")
        uris = [f"s3://b/k{rng.randrange(10**6):06d}-{i}.jpg" for i in range(300)]
        runs = []
        for r in range(4):
            run_id = f"2026010{r}T000000Z-{case}{r}"
            run = protocol.begin_run(out, {"r": r}, run_id=run_id)
            rows = [_row(u, rng.choice(["e1", "e2", None]), rng.choice([1, 2]), run_id=run_id, at=r * 10 + rng.random(),
                         ckpt=rng.choice([CKPT, "old"]), settings=rng.choice([None, "s"]),
                         status=rng.choice(["ok", "ok", "error"]), kind=rng.choice(sorted(schema.ERROR_KINDS)))
                    for u in rng.sample(uris, 120)]
            for k in range(0, len(rows), 40):
                _commit_rows(out, run_id, f"{k}", rows[k:k + 40])
            runs.append(run)
        buckets = [1, 3, 64][case % 3]
        state.fold(out, buckets=buckets)
        for run in runs[:2]:  # runs 0 and 1 finished; 2 and 3 not
            run.finish(state.fold(out).files_of(run.run_id))
        listing = [SourceObject(u, rng.choice(["e1", "e2", None]), rng.choice([1, 2, None])) for u in uris]
        listing += [SourceObject(f"s3://b/new{i}.jpg", "e1", 1) for i in range(20)] + rng.sample(listing, 15)
        rng.shuffle(listing)
        assert state.current(out).buckets == buckets
        for kw in (dict(full=False), dict(full=False, settings="s"), dict(full=False, retry_errors=True),
                   dict(full=True), dict(full=False, run_id=runs[3].run_id), dict(full=True, run_id=runs[2].run_id)):
            got, stats = _bucketed(listing, out, **kw)
            ref, ref_stats = _reference(listing, out, **kw)
            assert got == ref and stats == ref_stats, (case, kw)
            assert stats.listed == len(listing) and stats.duplicates == 15
            compared += len(ref)
    assert compared > 1500  # planned objects compared, over 18 plans


# ------------------------------------------------------------------ the state table

def test_fold_derives_error_kinds_of_older_files(tmp_path):
    """Files written before the error_kind column read it as null; their storage failures
    ("read failed", "cannot stat source") count as retryable, other errors as decode."""
    out = tmp_path / "out"
    rows = [
        schema.error_row(image_uri=f"s3://b/{name}", source_etag="e", source_size=1, reason=reason, kind=kind,
                         model_name="m", checkpoint_sha256=CKPT, run_id="r0")
        for name, reason, kind in [("new-slow", "read failed after 6 attempts: OSError: SlowDown", "unavailable"),
                                   ("new-bad", "not a recognised image", "decode")]
    ]
    legacy = [
        {**rows[0], "image_uri": f"s3://b/{name}", "error": reason}
        for name, reason in [("old-slow", "read failed: OSError: Please reduce your request rate"),
                             ("old-stat", "cannot stat source: ConnectionError: reset"),
                             ("old-bad", "corrupt or truncated JPEG data"),
                             ("old-gone", "source not found: s3://b/old-gone")]
    ]
    (out / "run_id=r0").mkdir(parents=True)
    pq.write_table(schema.rows_to_table(rows), out / "run_id=r0" / "part-a.parquet")
    old = schema.rows_to_table(legacy).drop_columns(["error_kind"])  # the schema before the column
    pq.write_table(old, out / "run_id=r0" / "part-b.parquet")
    version = state.fold(str(out), buckets=2)
    table = pa.concat_tables([pq.read_table(version.bucket_path(b)) for b in range(2)])
    kinds = dict(zip((u.rsplit("/", 1)[1] for u in table.column("image_uri").to_pylist()),
                     table.column("error_kind").to_pylist()))
    assert kinds == {"new-slow": "unavailable", "new-bad": "decode", "old-slow": "read", "old-stat": "read",
                     "old-bad": "decode", "old-gone": "not_found"}
    listing = [SourceObject(f"s3://b/{n}", "e", 1) for n in kinds]
    assert [u.rsplit("/", 1)[1] for u in _bucketed(listing, str(out), full=False)[0]] == [
        "new-slow", "old-slow", "old-stat"]


def test_fold_is_incremental_and_replaces_its_generation_atomically(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    assert state.current(out).generation is None and state.fold(out).rows == 0
    run = protocol.begin_run(out, {}, run_id="r0")
    _commit_rows(out, "r0", "a", [_row(f"s3://b/{i}", "e", 1, run_id="r0") for i in range(10)])
    v1 = state.fold(out, buckets=4)
    assert (v1.buckets, v1.rows) == (4, 10) and state.fold(out) == v1  # nothing new: no new generation
    assert [f["rows"] for f in v1.files_of("r0")] == [10]
    _commit_rows(out, "r0", "b", [_row(f"s3://b/{i}", "e", 2, run_id="r0", at=1) for i in range(5, 15)])

    class Crash(BaseException):
        pass

    # killed after the new generation's files, before current.json moved: the old one stays current
    real_write = Output.write
    monkeypatch.setattr(Output, "write", lambda self, path, data, **kw: (_ for _ in ()).throw(Crash())
                        if path.endswith(state.CURRENT_NAME) else real_write(self, path, data, **kw))
    with pytest.raises(Crash):
        state.fold(out, buckets=64)
    monkeypatch.undo()
    assert state.current(out) == v1
    # r0 is unfinished: both its rows of images 5..9 are kept (it could be resumed)
    v2 = state.fold(out, buckets=64)
    assert v2.generation != v1.generation and (v2.buckets, v2.rows) == (4, 20)
    assert sorted(p.name for p in (tmp_path / "out" / "_state").iterdir()) == sorted([v2.generation, "current.json"])
    assert sorted(f["rows"] for f in v2.files_of("r0")) == [10, 10]
    with pytest.raises(RuntimeError, match="5 images have more than one committed row"):
        state.finish_run(run)  # nothing new to fold: the run's rows are checked all the same
    assert state.current(out) == v2 and not (tmp_path / "out" / "_runs" / "r0" / "_SUCCESS").exists()
    # the state is derived data: removed, it is rebuilt from the committed files
    shutil.rmtree(tmp_path / "out" / "_state")
    v3 = state.fold(out, buckets=4)
    assert v3.rows == 20 and sorted(f["rows"] for f in v3.files_of("r0")) == [10, 10]
    # a nightly run's finish folds nothing new: it scans the state only if its rows were never checked
    scans, check_bucket = [], state.check_bucket
    monkeypatch.setattr(state, "check_bucket", lambda *a: scans.append(a[1]) or check_bucket(*a))
    with pytest.raises(RuntimeError, match="5 images have more than one committed row"):
        state.fold(out, check_run="r0")  # v3 took r0's rows in unchecked
    assert len(scans) == 4
    run1 = protocol.begin_run(out, {}, run_id="r1")
    _commit_rows(out, "r1", "a", [_row(f"s3://b/{i}", "e", 3, run_id="r1", at=2) for i in range(20, 25)])
    v4 = state.fold(out, check_run="r1")
    assert (v4.rows, v4.checked_run) == (25, "r1") and state.current(out) == v4
    scans.clear()
    state.finish_run(run1)  # the fold that took r1's rows in checked them
    state.fold(out, check_run="r2")  # a run without rows has nothing to check
    assert scans == [] and (tmp_path / "out" / "_runs" / "r1" / "_SUCCESS").exists()


def test_group_buckets_makes_shards_of_a_small_plan():
    assert group_buckets([0, 3, 0, 2, 5, 1, 0], 4) == [[1, 3], [4, 5]]
    assert group_buckets([1, 1, 1], 10) == [[0, 1, 2]]
    assert group_buckets([2000, 0, 10], 1000) == [[0, 2]]
    assert group_buckets([0, 0], 10) == []
