"""Storage faults meet the batch job's driver loop: retried, deferred to another pass, committed
as retryable rows, or stopped as an outage; never recorded as bad images.

The inputs sit on the moto S3 server behind the fault-injecting proxy (tests/_fault_proxy.py).
These tests run ``pipeline.run_job`` in this process with the Ray dataset replaced by the same
stages called in a loop (``decode_batch`` then ``PredictorActor`` on the shipped checkpoint):
the planning, passes, health check and commits are the real ones. ``test_infer_job.py``-style
runs of ``python -m jobs.infer`` on Ray are at the end (slow).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.infer import pipeline
from jobs.infer.output import Output
from jobs.infer.summary import read_summary
from jobs.storage import RetryPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")
FAST_RETRY = RetryPolicy(attempts=3, base_s=0.01)


def _put_inputs(bucket, n, *, corrupt=()):
    import s3fs

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48 + i % 5, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        names.append(f"img{i:02d}.png")
        fs.pipe_file(f"{bucket}/in/{names[-1]}", buf.getvalue())
    for name in corrupt:
        fs.pipe_file(f"{bucket}/in/{name}", b"\x89PNG\r\n\x1a\n not really")
        names.append(name)
    return names


def _config(bucket, out, **kw):
    defaults = dict(input=f"s3://{bucket}/in/", output=str(out), weights=WEIGHTS, images_per_shard=4, batch_size=2,
                    read_attempts=FAST_RETRY.attempts, read_backoff=FAST_RETRY.base_s)
    return pipeline.JobConfig(**{**defaults, **kw})


def _rows(out, run_id=None):
    rows = [r for f in Output(str(out)).committed_files() for r in pq.read_table(f).to_pylist()]
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


def test_throttled_reads_are_retried_and_a_second_pass_reads_what_still_failed(faulty_s3, tmp_path,
                                                                               run_in_process):
    bucket, proxy = faulty_s3
    names = _put_inputs(bucket, 10)
    # every key: 5 SlowDowns (one s3fs call) and every 7th GET reset; three keys fail their
    # first 18 GETs, so their shards wait for pass 2. An s3fs call makes 5 GETs and a read 3
    # calls (15 GETs), or one call (5 GETs) after a read of its batch spent its retries: by
    # the end of pass 2 every key has had at least 5 + 15 = 20 GETs, which of them the URI
    # hash puts second in a batch notwithstanding
    proxy.fail_first_gets, proxy.reset_every = 5, 7
    summary, manifest = run_in_process(_config(bucket, tmp_path / "out"))
    assert proxy.injected["slowdown"] == 5 * len(names) and proxy.injected["reset"] >= 1
    rows = _rows(tmp_path / "out")
    assert len(rows) == manifest["rows"] == len(names) and {r["status"] for r in rows} == {"ok"}
    assert summary.passes == 1 and summary.deferred == 0

    proxy.reset()
    proxy._per_key.clear()
    proxy.fail_first_gets, proxy.only_keys = 18, ("img01", "img05", "img06")
    out2 = tmp_path / "out2"
    summary, manifest = run_in_process(_config(bucket, out2))
    rows = _rows(out2)
    assert len(rows) == manifest["rows"] == len(names) and {r["status"] for r in rows} == {"ok"}
    assert Counter(r["image_uri"] for r in rows) == Counter(f"s3://{bucket}/in/{n}" for n in names)
    assert summary.passes == 2 and summary.deferred == 3 and summary.ok == len(names)
    # the held-back shards were committed under their own shard ids: a rerun finds nothing to do
    again, _ = run_in_process(_config(bucket, out2))
    assert again.planned == 0 and again.skipped_unchanged == len(names)


def test_reads_still_failing_after_the_passes_are_retryable_rows_the_next_run_plans_again(
        faulty_s3, tmp_path, run_in_process):
    bucket, proxy = faulty_s3
    names = _put_inputs(bucket, 10, corrupt=["broken.png"])
    proxy.fail_keys = ("img03", "img08")  # 503 ServiceUnavailable for every GET of these
    out = tmp_path / "out"
    s1, _ = run_in_process(_config(bucket, out))
    rows = {r["image_uri"].rsplit("/", 1)[1]: r for r in _rows(out)}
    assert len(rows) == len(names) == 11
    assert {n: (r["status"], r["error_kind"]) for n, r in rows.items() if r["status"] != "ok"} == {
        "img03.png": ("error", "unavailable"), "img08.png": ("error", "unavailable"),
        "broken.png": ("error", "decode")}
    # the first of a batch's failing reads spends the retries (which one: the plan's order, by URI hash)
    assert any("after 3 attempts" in rows[n]["error"] for n in ("img03.png", "img08.png")) and s1.passes == 2
    assert s1.error_kinds == {"unavailable": 2, "decode": 1}

    proxy.reset()  # the store serves them again: the next run reads exactly those two
    s2, _ = run_in_process(_config(bucket, out))
    assert (s2.planned, s2.planned_retry, s2.skipped_unchanged) == (2, 2, 9)
    new = {r["image_uri"].rsplit("/", 1)[1]: r["status"] for r in _rows(out, s2.run_id)}
    assert new == {"img03.png": "ok", "img08.png": "ok"}
    s3, _ = run_in_process(_config(bucket, out))  # the corrupt image is not retried
    assert s3.planned == 0 and s3.skipped_unchanged == 11


def test_an_outage_stops_the_run_without_error_rows_and_the_rerun_completes_it(faulty_s3, tmp_path,
                                                                               run_in_process):
    bucket, proxy = faulty_s3
    names = _put_inputs(bucket, 24)
    proxy.down_after_gets = 6  # the store goes down after six object reads
    out = tmp_path / "out"
    with pytest.raises(pipeline.StorageOutage, match=r"storage failing: \d+ of the last \d+ images could not be read"):
        run_in_process(_config(bucket, out))
    committed = _rows(out)
    assert all(r["status"] == "ok" for r in committed) and len(committed) <= 6
    assert proxy.injected["down"] >= 10

    proxy.reset()
    summary, manifest = run_in_process(_config(bucket, out))
    assert summary.resumed and summary.skipped_done_in_run == len(committed)
    rows = _rows(out)
    assert manifest["rows"] == len(rows) == len(names) and {r["status"] for r in rows} == {"ok"}
    assert Counter(r["image_uri"] for r in rows) == Counter(f"s3://{bucket}/in/{n}" for n in names)


def test_revoked_credentials_stop_the_run_as_an_outage(faulty_s3, tmp_path, run_in_process):
    bucket, proxy = faulty_s3
    _put_inputs(bucket, 12)
    proxy.deny_gets = True
    with pytest.raises(pipeline.StorageOutage, match="access: read failed: PermissionError"):
        run_in_process(_config(bucket, tmp_path / "out"))
    assert _rows(tmp_path / "out") == [] and proxy.injected["deny"] >= 10


def test_a_listing_outage_is_an_infrastructure_error(faulty_s3, tmp_path, run_in_process, monkeypatch):
    bucket, proxy = faulty_s3
    _put_inputs(bucket, 2)
    monkeypatch.setattr(pipeline, "_check_input", lambda uri: None)  # the listing itself meets the outage
    proxy.down = True
    with pytest.raises(pipeline.InfraError, match=r"cannot list input s3://.*unable to handle request"):
        run_in_process(_config(bucket, tmp_path / "out"))
    assert Output(str(tmp_path / "out")).committed_files() == []
    assert proxy.injected["down"] == FAST_RETRY.attempts  # one listing page, retried


def test_storage_health_trips_on_a_majority_of_storage_failures_only():
    h = pipeline.StorageHealth(window=20, fraction=0.5, min_failures=5)
    h.observe(20, 0)  # bad images (decode errors) are not an outage
    h.check()
    h.observe(4, 4, "unavailable: slow")
    h.check()  # 4 failures < min_failures
    h.observe(6, 6, "unavailable: slow")
    with pytest.raises(pipeline.StorageOutage, match=r"10 of the last 20 images could not be read \(unavailable: slow\)"):
        h.check()
    h.observe(20, 0)  # the window forgets
    h.check()


@pytest.mark.slow
def test_jobs_infer_on_ray_stops_on_an_outage_with_exit_2_and_the_same_command_finishes(faulty_s3, tmp_path):
    """``python -m jobs.infer`` (embedded Ray) through the proxy: throttling and resets all the
    way, an outage part-way; exit 2 with one line, then the same command finishes the run."""
    bucket, proxy = faulty_s3
    names = _put_inputs(bucket, 16)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.infer", "--input", f"s3://{bucket}/in/", "--output", str(out),
           "--weights", WEIGHTS, "--images-per-shard", "4", "--batch-size", "1", "--num-actors", "1",
           "--read-attempts", "4", "--read-backoff", "0.05", "--max-concurrent-reads", "1"]
    # blocks of 4 rows: 4 decode tasks could read at once (2 free CPUs, 0.5 each); slow GETs overlap
    proxy.get_delay_s = 0.3
    proxy.fail_first_gets, proxy.reset_every, proxy.down_after_gets = 5, 7, 40
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 2, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("jobs.infer: error:")]
    assert len(errors) == 1 and "storage failing" in errors[0], first.stderr[-3000:]
    committed = _rows(out)
    assert all(r["status"] == "ok" for r in committed) and len(committed) < len(names)

    proxy.reset()
    proxy.reset_every = 7  # the store is back, connections still drop now and then
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = _rows(out)
    assert Counter(r["image_uri"] for r in rows) == Counter(f"s3://{bucket}/in/{n}" for n in names)
    assert {r["status"] for r in rows} == {"ok"} and len({r["run_id"] for r in rows}) == 1
    run_id = rows[0]["run_id"]
    s = read_summary(str(out), run_id)
    assert s["resumed"] and s["skipped_done_in_run"] == len(committed) and s["ok"] == len(names) - len(committed)
    assert proxy.max_in_flight == 1  # --max-concurrent-reads bounds the GETs in flight


@pytest.mark.slow
def test_losing_the_worker_node_mid_run_loses_and_duplicates_nothing(tmp_path):
    """A two-node Ray cluster on this machine (a head without CPUs, one worker node holding
    every task and actor); the worker node is killed once the first shard is committed and a
    new one joins. The job (a separate driver) must finish on its own, Ray retrying the lost
    tasks and restarting the actor: exactly one committed row per image. (With a retry count
    on actor tasks it needed the same command again; the reruns it takes are printed.)"""
    import threading

    from ray.cluster_utils import Cluster

    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(1)
    names = [f"img{i:02d}.png" for i in range(48)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (56, 64, 3), dtype=np.uint8)).save(inp / name)
    out = tmp_path / "out"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cmd = [sys.executable, "-m", "jobs.infer", "--input", str(inp), "--output", str(out), "--weights", WEIGHTS,
               "--images-per-shard", "4", "--batch-size", "2", "--num-actors", "1"]
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines, committed_once = [], threading.Event()

        def watch():
            for line in job.stderr:
                lines.append(line)
                if line.startswith("jobs.infer: ") and " images committed" in line and not line.startswith("jobs.infer: 0/"):
                    committed_once.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert committed_once.wait(300), "".join(lines)[-3000:]
        cluster.remove_node(worker, allow_graceful=False)  # the node and its workers die
        killed_after = len(_rows(out))
        cluster.add_node(num_cpus=2)
        job.wait(600)
        watcher.join(10)
        reruns = 0
        if job.returncode != 0:
            why = [line for line in lines if line.startswith("jobs.infer: error") or "Error" in line]
            print(f"first attempt exited {job.returncode}: {(why or lines or [''])[-1].strip()[:300]}")
        while job.returncode != 0 and reruns < 2:
            reruns += 1
            job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, "".join(lines)[-3000:]
        print(f"worker node killed after {killed_after}/{len(names)} rows committed; reruns needed: {reruns}")
    finally:
        cluster.shutdown()
    rows = _rows(out)
    assert 0 < killed_after < len(names)
    assert Counter(r["image_uri"] for r in rows) == Counter(f"file://{inp}/{n}" for n in names)
    assert {r["status"] for r in rows} == {"ok"} and len({r["run_id"] for r in rows}) == 1
    # Ray's retries and restarts (pipeline.py's policy) carried the run on: no rerun was needed
    assert reruns == 0
