"""The output's writer lease (jobs/infer/commit/lock.py): one run writes an output at a time; a killed
run's lease is taken over by the rerun; a live run's lease stops a second run with a clear error.

Short heartbeat and staleness intervals keep these tests to a few seconds.
"""
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from jobs.infer.commit.lock import LockedError, WriterLease
from jobs.infer.output import LOCK_NAME

FAST = dict(heartbeat_s=0.1, stale_s=1.0)


def _lease_file(out):
    return out / LOCK_NAME


def _write_lease(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    lease = {"token": "t-other", "run": "other run", "host": socket.gethostname(), "pid": 1,
             "pid_start": None, "heartbeat_at": time.time(), **fields}
    _lease_file(out).write_text(json.dumps(lease))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lease_is_held_heartbeats_and_is_released(tmp_path):
    out = tmp_path / "out"
    with WriterLease(str(out), "run A", **FAST) as lease:
        first = json.loads(_lease_file(out).read_text())
        assert first["run"] == "run A" and first["token"] == lease.token and first["host"] == socket.gethostname()
        time.sleep(0.35)
        assert json.loads(_lease_file(out).read_text())["heartbeat_at"] > first["heartbeat_at"]
        lease.check()  # still ours
    assert not _lease_file(out).exists()


def test_second_writer_is_refused_while_the_first_is_alive(tmp_path):
    out = tmp_path / "out"
    with WriterLease(str(out), "run A", **FAST):
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=r"being written by another run \(run A on host .*--break-lock"):
            WriterLease(str(out), "run B", **FAST).acquire()
        assert time.monotonic() - t0 < 1.0  # the moving heartbeat is seen well before staleness
        assert json.loads(_lease_file(out).read_text())["run"] == "run A"


def test_lease_of_a_dead_local_process_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out"
    _write_lease(out, pid=_dead_pid(), heartbeat_at=time.time())
    t0 = time.monotonic()
    with WriterLease(str(out), "rerun", heartbeat_s=5, stale_s=60) as lease:
        assert time.monotonic() - t0 < 1.0
        assert json.loads(_lease_file(out).read_text())["token"] == lease.token


def test_silent_lease_of_another_host_is_taken_over_after_stale_s(tmp_path):
    out = tmp_path / "out"
    _write_lease(out, host="some-other-host", pid=12345)
    t0 = time.monotonic()
    with WriterLease(str(out), "rerun", **FAST) as lease:
        waited = time.monotonic() - t0
        assert 1.0 <= waited < 3.0
        assert json.loads(_lease_file(out).read_text())["token"] == lease.token


def test_owner_that_cannot_renew_its_lease_stops_committing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    lease = WriterLease(str(out), "run A", heartbeat_s=0.05, stale_s=3.0).acquire()
    try:
        def unreachable(*a, **k):
            raise OSError("storage unreachable")

        monkeypatch.setattr(lease.output, "write_json", unreachable)
        time.sleep(0.2)
        lease.check()  # failed renewals are retried for stale_s / 2, not fatal at once
        time.sleep(1.8)
        with pytest.raises(LockedError, match="could not be renewed: OSError: storage unreachable"):
            lease.check()
    finally:
        monkeypatch.undo()
        lease.release()


def test_torn_lease_file_is_treated_as_silent(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _lease_file(out).write_text('{"token": "t-')
    with WriterLease(str(out), "rerun", **FAST) as lease:
        assert json.loads(_lease_file(out).read_text())["token"] == lease.token


def test_break_lock_takes_over_and_the_old_owner_stops_committing(tmp_path):
    out = tmp_path / "out"
    old = WriterLease(str(out), "old run", **FAST).acquire()
    try:
        new = WriterLease(str(out), "new run", heartbeat_s=0.1, stale_s=60, break_lock=True).acquire()
        try:
            time.sleep(0.4)  # the old owner's next heartbeat notices
            with pytest.raises(LockedError, match="taken over by new run"):
                old.check()
            new.check()
        finally:
            new.release()
    finally:
        old.release()  # must not remove a lease it no longer owns... nor fail
    assert not _lease_file(out).exists()


def test_two_newcomers_leave_one_holder(tmp_path):
    """Both see a dead lease; at most one keeps the lease file, and the other ends refused or lost."""
    out = tmp_path / "out"
    _write_lease(out, pid=_dead_pid())
    leases, refused = [], []

    def contender(name):
        try:
            leases.append(WriterLease(str(out), name, **FAST).acquire())
        except LockedError:
            refused.append(name)

    threads = [threading.Thread(target=contender, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.4)  # heartbeats run: a contender whose lease was replaced notices
    try:
        holders = [lease for lease in leases if not lease.lost]
        assert len(leases) + len(refused) == 2 and len(holders) == 1
        assert json.loads(_lease_file(out).read_text())["token"] == holders[0].token
    finally:
        for lease in leases:
            lease.release()


def test_s3_lease_on_the_moto_server(s3_bucket):
    out = f"s3://{s3_bucket}/leased"
    with WriterLease(out, "run A", **FAST):
        with pytest.raises(LockedError):
            WriterLease(out, "run B", **FAST).acquire()
    with WriterLease(out, "run B", **FAST) as lease:
        lease.check()


def test_s3_reads_racing_the_owners_heartbeat_see_whole_leases(s3_bucket):
    """A newcomer reads the lease while the owner replaces it; on S3 a HEAD-then-ranged-GET read
    of a replaced object fails (s3fs FileExpired) or tears. Every read must see one whole lease."""
    out = f"s3://{s3_bucket}/raced"
    with WriterLease(out, "the nightly run", heartbeat_s=0.01, stale_s=60) as owner:
        reader = WriterLease(out, "reader")
        seen = [reader._read() for _ in range(200)]
        owner.check()
    heartbeats = {s["heartbeat_at"] for s in seen}
    assert len(seen) == 200 and all(s["token"] == owner.token for s in seen)
    assert len(heartbeats) > 10  # the reads did race many heartbeats
