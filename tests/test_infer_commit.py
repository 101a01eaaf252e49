"""Commit protocol: crash at every step and rerun, readers see committed rows only, incremental plans.

The job is pipeline.run_job in this process with a stand-in model (tests/_stand_in_job.py): the
real listing, planning, sharding, decoding, rows, part files, staging and commit code.
"""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.infer import schema
from jobs.infer.commit import protocol
from jobs.infer.output import VISIBLE_GLOB, Output
from jobs.infer.commit import state
from jobs.infer.plan import planner
from jobs.infer.plan.listing import list_inputs
from jobs.infer.schema import SourceObject
from jobs.storage import resolve

sys.path.insert(0, str(Path(__file__).parent))
from _stand_in_job import WEIGHTS, run_job  # noqa: E402

CKPT = "a" * 64
REPO = Path(__file__).resolve().parents[1]
LATEST_SQL = """
SELECT * FROM read_parquet('{root}/run_id=*/part-*.parquet')
QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY processed_at DESC, run_id DESC) = 1
"""


class Crash(BaseException):
    """Raised by the step hook: not an Exception, so nothing in the job can swallow it."""


def png(w, h, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def input_files():
    # 12 inputs with shard_size=4 (shards of 2..8 items): always at least two shards.
    files = {f"img{i}.png": png(24 + i, 16 + i, i) for i in range(9)}
    files["sub/photo.jpg"] = _jpeg()
    files["empty.jpg"] = b""
    files["sub/notes.png"] = b"hello, I am text"
    return files


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _local_write(root, rel, data):
    p = Path(root) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(input_uri, make_output_uri) on local disk or on the moto S3 server."""
    if request.param == "local":
        inp = tmp_path / "in"
        for rel, data in input_files().items():
            _local_write(inp, rel, data)
        counter = iter(range(1000))
        yield str(inp), lambda: str(tmp_path / f"out{next(counter)}")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        fs, _ = resolve(f"s3://{bucket}")
        for rel, data in input_files().items():
            fs.pipe_file(f"{bucket}/in/{rel}", data)
        counter = iter(range(1000))
        yield f"s3://{bucket}/in", lambda: f"s3://{bucket}/out{next(counter)}"


def all_input_uris(inp):
    return sorted(o.image_uri for o in list_inputs(inp))


def visible(out):
    """What plain readers see at the output root: pyarrow.dataset (Hive) and the DuckDB glob."""
    fs, root = resolve(out)
    fs.invalidate_cache()
    if not fs.exists(root):
        return [], []
    table = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()
    con = duckdb.connect()
    con.register_filesystem(fs) if out.startswith("s3://") else None
    duck = con.sql(f"SELECT image_uri, run_id FROM read_parquet('{out}/run_id=*/part-*.parquet')").fetchall() \
        if fs.glob(f"{root}/run_id=*/part-*.parquet") else []
    return table.to_pylist(), duck


def done_images(out, run_id):
    """Images already committed or durably staged in ``run_id`` (must not be recomputed)."""
    fs, root = resolve(out)
    fs.invalidate_cache()
    paths = fs.glob(f"{root}/run_id={run_id}/part-*.parquet") + fs.glob(f"{root}/_staging/{run_id}/part-*.parquet")
    uris = set()
    for p in paths:
        with fs.open(p, "rb") as f:
            uris |= set(pq.read_table(f, columns=["image_uri"]).column("image_uri").to_pylist())
    return uris


def collapse_state(out):
    """The state table's rows, latest per image (what incremental planning compares with)."""
    version = state.fold(out)
    rows = [Output(out).read_parquet(version.bucket_path(b)) for b in range(version.buckets)]
    return schema.latest_rows(pa.concat_tables(rows))


def assert_one_row_per_image(rows, duck, expected_uris):
    uris = [r["image_uri"] for r in rows]
    assert sorted(uris) == expected_uris, "each input image exactly once"
    assert sorted(u for u, _ in duck) == expected_uris


# ------------------------------------------------------------------ sharding

def items(n, prefix="s3://b/k"):
    return [SourceObject(f"{prefix}{i:05d}.jpg", f"e{i}", i) for i in range(n)]


def test_shards_are_content_defined_and_survive_removal_of_committed_shards():
    objs = items(600)
    shards = list(planner.make_shards(objs, checkpoint_sha256=CKPT, target_size=20))
    sizes = [len(s.items) for s in shards]
    assert sum(sizes) == 600 and [o for s in shards for o in s.items] == objs
    assert all(10 <= n <= 40 for n in sizes[:-1]), sizes
    assert 20 <= len(shards) <= 60, len(shards)
    # A resumed run plans without the shards already committed: the others are unchanged.
    committed = {1, 4, 5, len(shards) - 2}
    remaining = [o for i, s in enumerate(shards) if i not in committed for o in s.items]
    again = list(planner.make_shards(remaining, checkpoint_sha256=CKPT, target_size=20))
    assert [s.shard_id for s in again] == [s.shard_id for i, s in enumerate(shards) if i not in committed]


def test_shards_resynchronise_after_new_items_appear_in_the_listing():
    # New objects listed between a kill and the rerun change only the shards around them,
    # so the staged shards elsewhere are still reused (fixed-size chunks would all shift).
    objs = items(600)
    before = [s.shard_id for s in planner.make_shards(objs, checkpoint_sha256=CKPT, target_size=20)]
    inserted = objs[:100] + items(3, "s3://b/new") + objs[100:]
    after = [s.shard_id for s in planner.make_shards(inserted, checkpoint_sha256=CKPT, target_size=20)]
    kept = len(set(before) & set(after))
    assert kept >= len(before) - 3, (kept, len(before))


def test_shard_id_depends_on_content_and_checkpoint_not_order():
    a = items(5)
    assert planner.shard_id_for(a, CKPT) == planner.shard_id_for(a[::-1], CKPT)
    assert planner.shard_id_for(a, CKPT) != planner.shard_id_for(a, "b" * 64)
    changed = a[:4] + [SourceObject(a[4].image_uri, "other-etag", a[4].source_size)]
    assert planner.shard_id_for(a, CKPT) != planner.shard_id_for(changed, CKPT)


# ------------------------------------------------------------------ a clean run

def test_clean_run_layout_and_readers(backend):
    inp, new_out = backend
    out = new_out()
    expected = all_input_uris(inp)
    assert len(expected) == 12
    run, manifest = run_job(inp, out)
    rows, duck = visible(out)
    assert_one_row_per_image(rows, duck, expected)
    assert manifest["rows"] == 12 and sum(f["rows"] for f in manifest["files"]) == 12
    assert all(f["path"].startswith(f"run_id={run.run_id}/part-") for f in manifest["files"])
    by_uri = {r["image_uri"]: r for r in rows}
    assert by_uri[f"{_prefix(inp)}/empty.jpg"]["status"] == "error"
    assert by_uri[f"{_prefix(inp)}/empty.jpg"]["error"] == "empty file (0 bytes)"
    assert by_uri[f"{_prefix(inp)}/sub/notes.png"]["error"].startswith("not a recognised image")
    assert by_uri[f"{_prefix(inp)}/sub/photo.jpg"]["width"] == 20
    assert sum(r["status"] == "ok" for r in rows) == 10
    fs, root = resolve(out)
    assert fs.exists(f"{root}/_runs/{run.run_id}/_SUCCESS")
    assert not fs.exists(f"{root}/_staging/{run.run_id}")
    files = Output(out).committed_files()
    with fs.open(files[0], "rb") as f:
        t = pq.read_table(f)
    assert t.schema.equals(schema.SCHEMA, check_metadata=False)
    schema.validate_table(t)


def _prefix(inp):
    return inp if inp.startswith("s3://") else f"file://{inp}"


# ------------------------------------------------------------------ crash anywhere, rerun

def record_steps(inp, out, **kw):
    """(step, detail) of a clean run, and the number of rows of each shard it committed."""
    steps = []
    _, manifest = run_job(inp, out, on_step=lambda name, detail: steps.append((name, detail)), **kw)
    rows = {f["path"].rsplit("part-", 1)[1][: -len(".parquet")]: f["rows"] for f in manifest["files"]}
    return steps, rows


def test_crash_at_every_step_then_rerun(backend, monkeypatch):
    inp, new_out = backend
    # Locally --full, where only "already committed in this run" stops double work; on S3
    # the default incremental mode.
    kw = {"full": not inp.startswith("s3://"), "shard_size": 4}
    expected = all_input_uris(inp)
    steps, shard_rows = record_steps(inp, new_out(), **kw)
    names = [n for n, _ in steps]
    assert names[0] == "run_created" and names[-3:] == ["manifest", "success", "cleaned"]
    assert names.count("staged") == names.count("committed") == len(shard_rows) >= 2
    assert max(shard_rows.values()) >= 2 and sum(shard_rows.values()) == len(expected)
    # The commit point: the visible file appears (local rename; S3 server-side copy).
    commit_step = "copied" if inp.startswith("s3://") else "committed"
    if inp.startswith("s3://"):
        assert names.count("copied") == names.count("committed")
    # Locally every step is a crash point. On moto (about 1 s per run here) the steps whose
    # store-side behaviour differs from local disk: staged PUT, copy then delete of the
    # publish, and the exclusive create of _SUCCESS.
    points = list(range(len(steps)))
    if inp.startswith("s3://"):
        points = [names.index(name) for name in ("staged", "copied", "committed", "success")]
    checked = 0
    for k in points:
        out = new_out()
        seen = {"n": 0}

        def hook(name, detail, k=k):
            if seen["n"] == k:
                raise Crash(f"{name} {detail}")
            seen["n"] += 1

        with pytest.raises(Crash):
            run_job(inp, out, on_step=hook, **kw)

        # After the crash: readers see the committed shards' rows only, no image twice.
        rows, duck = visible(out)
        uris = [r["image_uri"] for r in rows]
        assert len(uris) == len(set(uris)) and set(uris) <= set(expected)
        assert sorted(u for u, _ in duck) == sorted(uris)
        committed_rows = sum(shard_rows[d] for n, d in steps[: k + 1] if n == commit_step)
        assert len(uris) == committed_rows, f"crash after step {k} {steps[k]}"
        first_run = protocol.list_runs(out)[-1]
        before = done_images(out, first_run.run_id)

        calls = []
        run, manifest = run_job(inp, out, calls=calls, **kw)
        rows, duck = visible(out)
        per_run = {}
        for r in rows:
            per_run.setdefault(r["run_id"], []).append(r["image_uri"])
        if first_run.finished:  # crash after _SUCCESS: the rerun is a new run
            assert run.run_id != first_run.run_id and not run.resumed
            assert sorted(per_run[first_run.run_id]) == expected
            # A new --full run holds every image once more; an incremental one nothing.
            assert sorted(per_run.get(run.run_id, [])) == (expected if kw["full"] else [])
            assert sorted(calls) == (expected if kw["full"] else [])
        else:
            assert_one_row_per_image(rows, duck, expected)
            assert run.run_id == first_run.run_id and run.resumed
            assert manifest["rows"] == len(expected)
            # Committed or staged shards are not recomputed; everything else is, once.
            assert set(calls).isdisjoint(before) and sorted(set(calls) | before) == expected
            assert len(calls) == len(set(calls))
        fs, root = resolve(out)
        fs.invalidate_cache()
        assert fs.exists(f"{root}/_runs/{run.run_id}/_SUCCESS")
        assert not fs.glob(f"{root}/_staging/*/part-*")
        checked += 1
    assert checked >= 4


# The 12 images make at least 2 shards (content-defined cuts, at most 8 items a shard, placed by
# the temporary paths' hashes): "committed:0" is the one commit that is never the last.
@pytest.mark.parametrize("crash_at", ["staged:1", "committed:0", "manifest:0"])
def test_sigkill_subprocess_then_rerun(tmp_path, crash_at):
    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")
    env = {**os.environ, "CRASH_AT": crash_at, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_stand_in_job.py"), str(inp), out],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "finished" not in proc.stdout
    rows, _ = visible(out)
    assert len(rows) == len({r["image_uri"] for r in rows})
    assert len(rows) < 12 or crash_at == "manifest:0"
    calls = []
    run, manifest = run_job(str(inp), out, calls=calls)
    assert run.resumed
    rows, duck = visible(out)
    assert_one_row_per_image(rows, duck, all_input_uris(str(inp)))
    assert len(calls) < 12 and len(calls) == len(set(calls))


# ------------------------------------------------------------------ runs and incrementality

def test_incremental_run_processes_new_and_changed_only(tmp_path):
    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")
    run1, _ = run_job(str(inp), out)

    # Nothing changed: a new run that plans nothing.
    calls = []
    run2, m2 = run_job(str(inp), out, calls=calls)
    assert calls == [] and m2["rows"] == 0 and run2.run_id != run1.run_id
    assert run2.listed == 12 and run2.skipped_unchanged == 12 and run2.planned == 0

    # One image rewritten (new mtime), one added.
    (inp / "img0.png").write_bytes(png(40, 30, 99))
    os.utime(inp / "img0.png", ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    (inp / "new.png").write_bytes(png(10, 10, 7))
    calls = []
    run3, m3 = run_job(str(inp), out, calls=calls)
    assert sorted(calls) == [f"file://{inp}/img0.png", f"file://{inp}/new.png"]
    assert (run3.planned_new, run3.planned_changed, run3.skipped_unchanged) == (1, 1, 11)

    latest = duckdb.sql(LATEST_SQL.format(root=out)).to_arrow_table()
    latest = {r["image_uri"]: r for r in latest.to_pylist()}
    assert len(latest) == 13
    assert latest[f"file://{inp}/img0.png"]["run_id"] == run3.run_id
    assert latest[f"file://{inp}/img0.png"]["width"] == 40
    assert latest[f"file://{inp}/img1.png"]["run_id"] == run1.run_id
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/run_id=*/part-*.parquet')").fetchall() == [(14,)]

    # A new checkpoint reprocesses everything; so does --full.
    other = other_weights(tmp_path)
    calls = []
    run_job(str(inp), out, other, calls=calls)
    assert len(calls) == 13
    calls = []
    run_job(str(inp), out, other, calls=calls, full=True)
    assert len(calls) == 13
    latest = collapse_state(out)
    assert latest.num_rows == 13 and set(latest.column("checkpoint_sha256").to_pylist()) == {sha256(other)}


def other_weights(tmp_path):
    """The shipped checkpoint saved again with one more metadata key: another model identity."""
    import torch

    ckpt = torch.load(WEIGHTS, weights_only=True, map_location="cpu")
    ckpt["metadata"]["note"] = "another model"
    path = str(tmp_path / "other.pt")
    torch.save(ckpt, path)
    assert sha256(path) != sha256(WEIGHTS)
    return path


def sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_begin_run_resumes_only_the_same_unfinished_command(tmp_path):
    out = str(tmp_path / "out")
    a = protocol.begin_run(out, {"input": "x", "full": False})
    assert not a.resumed
    assert protocol.begin_run(out, {"input": "x", "full": False}).run_id == a.run_id
    b = protocol.begin_run(out, {"input": "x", "full": True})
    assert b.run_id != a.run_id
    a.finish([])
    c = protocol.begin_run(out, {"input": "x", "full": False})
    assert c.run_id != a.run_id and not c.resumed
    with pytest.raises(ValueError, match="different parameters"):
        protocol.begin_run(out, {"input": "y"}, run_id=c.run_id)
    with pytest.raises(ValueError, match="already finished"):
        protocol.begin_run(out, {"input": "x", "full": False}, run_id=a.run_id)
    runs = {r.run_id: r.finished for r in protocol.list_runs(out)}
    assert runs == {a.run_id: True, b.run_id: False, c.run_id: False}
    meta = json.loads((tmp_path / "out" / "_runs" / a.run_id / "_SUCCESS").read_text())
    assert meta == {"run_id": a.run_id, "rows": 0}


def _rows(run, objs):
    return schema.rows_to_table([
        schema.error_row(image_uri=o.image_uri, source_etag=o.source_etag, source_size=o.source_size, reason="x", kind="decode",
                         model_name="m", checkpoint_sha256=CKPT, run_id=run.run_id)
        for o in objs
    ])


def test_stage_rejects_rows_that_do_not_match_the_shard(tmp_path):
    run = protocol.begin_run(str(tmp_path / "out"), {})
    objs = items(3, "file:///x/")
    shard = protocol.Shard(planner.shard_id_for(objs, CKPT), tuple(objs))
    with pytest.raises(ValueError, match="one row per shard item"):
        run.stage(shard, _rows(run, objs[:2]))
    with pytest.raises(ValueError, match="one row per shard item"):
        run.stage(shard, _rows(run, objs + objs[:1]))
    assert not run.is_staged(shard)
    run.stage(shard, _rows(run, objs))
    assert run.is_staged(shard)
    other = protocol.Shard(planner.shard_id_for(objs, "b" * 64), tuple(objs))
    assert not run.is_staged(other)
    # A torn staged file is not taken for a staged shard.
    path = run.staged_path(shard.shard_id)
    Path(path).write_bytes(Path(path).read_bytes()[:-20])
    assert not run.is_staged(shard)


def test_finish_refuses_an_image_committed_twice(tmp_path):
    out = str(tmp_path / "out")
    run = protocol.begin_run(out, {})
    objs = items(3, "file:///x/")
    for group in (objs[:2], objs[1:]):
        shard = protocol.Shard(planner.shard_id_for(group, CKPT), tuple(group))
        run.stage(shard, _rows(run, group))
        run.commit(shard.shard_id)
    with pytest.raises(RuntimeError, match="1 images have more than one committed row"):
        state.finish_run(run)
    with pytest.raises(RuntimeError, match="not the committed files"):
        run.finish([])
    assert not (tmp_path / "out" / "_runs" / run.run_id / "_SUCCESS").exists()


def test_staged_files_are_invisible_to_readers(tmp_path):
    out = str(tmp_path / "out")
    run = protocol.begin_run(out, {})
    objs = items(3, "file:///x/")
    shard = protocol.Shard(planner.shard_id_for(objs, CKPT), tuple(objs))
    run.stage(shard, _rows(run, objs))
    assert Path(run.staged_path(shard.shard_id)).exists()
    assert ds.dataset(out, format="parquet", partitioning="hive").count_rows() == 0
    assert state.fold(out).rows == 0
    run.commit(shard.shard_id)
    run.commit(shard.shard_id)  # idempotent
    assert ds.dataset(out, format="parquet", partitioning="hive").count_rows() == 3
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/{VISIBLE_GLOB}')").fetchall() == [(3,)]
    version = state.fold(out)
    assert version.rows == 3 and version.files_of(run.run_id) == [
        {"path": f"run_id={run.run_id}/part-{shard.shard_id}.parquet", "rows": 3,
         "bytes": Path(run.visible_path(shard.shard_id)).stat().st_size}]
