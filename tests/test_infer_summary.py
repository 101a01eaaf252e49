"""jobs.infer.summary: counts of a real run (stand-in model), written next to the run's manifest."""

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.infer.commit import protocol

from jobs.infer.output import Output
from jobs.infer.summary import read_summary

sys.path.insert(0, str(Path(__file__).parent))
from _stand_in_job import run_job  # noqa: E402
from test_infer_commit import _local_write, input_files  # noqa: E402


class Crash(BaseException):
    pass


def test_summary_of_a_run_and_of_its_resume(tmp_path):
    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")

    def crash_after_first_commit(name, detail):
        if name == "committed":
            raise Crash()

    with pytest.raises(Crash):
        run_job(str(inp), out, on_step=crash_after_first_commit)
    first = Output(out).committed_files()
    assert len(first) == 1
    done = pq.read_table(first[0], columns=["image_uri"]).column("image_uri").to_pylist()
    assert 1 <= len(done) < 12

    run, manifest = run_job(str(inp), out)
    s = read_summary(out, run.run_id)
    assert s["resumed"] is True and s["listed"] == 12
    assert s["skipped_done_in_run"] == len(done) and s["skipped"] == len(done)
    assert s["processed"] == s["planned"] == 12 - len(done)
    assert s["ok"] + s["error"] == s["processed"]
    assert manifest["rows"] == 12
    # The stand-in model finds one instance per decodable image; the two bad inputs are errors.
    bad = [u for u in done if u.endswith(("empty.jpg", "notes.png"))]
    assert s["error"] == 2 - len(bad) and s["instances"] == s["ok"]
    assert sum(s["error_reasons"].values()) == sum(s["error_kinds"].values()) == s["error"]
    assert s["wall_s"] > 0 and s["images_per_s"] > 0
    printed = run.format()
    assert f"run {run.run_id} (resumed)" in printed and f"ok {s['ok']}, error {s['error']}" in printed

    # A fresh output: every count from scratch.
    run2, _ = run_job(str(inp), str(tmp_path / "out2"))
    s2 = read_summary(str(tmp_path / "out2"), run2.run_id)
    assert (s2["ok"], s2["error"], s2["instances"], s2["skipped"]) == (10, 2, 10, 0)
    assert s2["error_reasons"] == {"empty file (0 bytes)": 1, "not a recognised image (16 bytes of text)": 1}
    assert s2["error_kinds"] == {"decode": 2}
    assert s2["shards_computed"] == len(Output(str(tmp_path / "out2")).committed_files()) and s2["shards_reused"] == 0


def test_summary_counts_a_reused_staged_shard(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")

    def crash_once_staged(name, detail):
        if name == "staged":
            raise Crash()

    with pytest.raises(Crash):
        run_job(str(inp), out, on_step=crash_once_staged)
    calls = []
    run, manifest = run_job(str(inp), out, calls=calls)
    s = read_summary(out, run.run_id)
    assert s["shards_reused"] == 1 and s["shards_computed"] >= 1
    assert s["processed"] == 12 == manifest["rows"]
    assert len(calls) < 12  # the reused shard's images were not decoded again


def test_a_reused_shard_is_counted_from_its_footer_alone(tmp_path, monkeypatch):
    """Resuming reads a staged shard's counts from its Parquet footer, not its rows; a file staged
    before the counts were recorded is read whole."""
    import json

    import pyarrow.parquet as pq

    from jobs.infer import schema

    inp = tmp_path / "in"
    for rel, data in input_files().items():
        _local_write(inp, rel, data)
    out = str(tmp_path / "out")
    staged = []

    def crash_once_staged(name, detail):
        if name == "staged":
            staged.append(detail)
            raise Crash()

    with pytest.raises(Crash):
        run_job(str(inp), out, on_step=crash_once_staged)
    run = protocol.list_runs(out)[0]
    path = protocol.Run(out, run.run_id).staged_path(staged[0])
    table = pq.read_table(path)
    want = schema.shard_counts(table)
    assert want["rows"] == table.num_rows > 0 and want["ok"] + sum(want["error_kinds"].values()) == want["rows"]
    assert json.loads(pq.read_metadata(path).metadata[schema.COUNTS_KEY]) == want

    def no_rows(*a, **k):
        raise AssertionError("the staged rows were read")

    monkeypatch.setattr(pq, "read_table", no_rows)
    assert protocol.Run(out, run.run_id).staged_counts(staged[0]) == want
    monkeypatch.undo()
    older = table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items() if k != schema.COUNTS_KEY})
    pq.write_table(older, path)
    assert protocol.Run(out, run.run_id).staged_counts(staged[0]) == want


def test_progress_lines_say_done_committed_rate_and_time_left(monkeypatch):
    import io

    from jobs.infer import __main__ as cli

    clock = iter([100.0, 105.0, 106.0, 116.0, 117.0, 125.0])
    monkeypatch.setattr(cli.time, "time", lambda: next(clock))
    log = io.StringIO()
    progress = cli.Progress(log, tty=False, every_s=10)  # t0 = 100
    progress(committed=0, done=0, total=50)  # the plan, at 105
    progress(committed=0, done=5, total=50)  # the first results (106; held back): the rate counts from here
    progress(committed=0, done=25, total=50)  # 10 s later: 2 images/s
    progress(committed=20, done=25, total=50)  # a commit: always shown
    progress(committed=50, done=50, total=50)
    assert log.getvalue().splitlines() == [
        "jobs.infer: 0/50 images committed, 0 done, starting (5 s)",
        "jobs.infer: 0/50 images committed, 25 done, 2.0 images/s, about 12 s left (16 s)",
        "jobs.infer: 20/50 images committed, 25 done, 1.8 images/s, about 14 s left (17 s)",
        "jobs.infer: 50/50 images committed, 50 done, 2.4 images/s (25 s)",
    ]
    term = io.StringIO()
    clock = iter([0.0, 0.0, 2.0, 3.0])
    tty = cli.Progress(term, tty=True)
    tty(committed=0, done=0, total=4)
    tty(committed=0, done=1, total=4)
    tty(committed=4, done=4, total=4)
    assert term.getvalue() == ("\r\x1b[Kjobs.infer: 0/4 images committed, 0 done, starting (0 s)"
                               "\r\x1b[Kjobs.infer: 0/4 images committed, 1 done (2 s)"
                               "\r\x1b[Kjobs.infer: 4/4 images committed, 4 done, 3.0 images/s (3 s)\n")
