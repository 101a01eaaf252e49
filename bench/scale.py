"""Planning and committing at archive scale, without images: the driver's time, memory and bytes.

    python bench/scale.py --objects 1000000 10000000 --workdir /tmp/scale

For each N, on local disk:

* ``setup`` (not measured): an S3 Inventory report (AWS's Parquet layout, data files of 500,000
  objects) of N objects, and a second report of the next night where 1% of them changed (new
  etag); a committed output of a finished run over all N objects (files of 1,000 rows of the
  output schema, no instances: the state only reads the state columns).
* ``first``: a first run's planning on an empty output (listing, scatter by bucket, the join,
  shards, plan files), in Ray tasks on this machine's CPUs.
* ``fold``: the committed run of N rows folded into the state table, its manifest and _SUCCESS
  (``state.finish_run``: what finishing a run of N images costs).
* ``reference`` (up to ``--reference-max`` objects): the next night's plan by the former
  driver-side planner (``tests/_plan_reference.py``: the committed state read into a dict, the
  listing planned one object at a time on the driver), for the ratio of time and memory.
* ``nightly``: the next night's run: fold (nothing new), planning against the state (1% planned),
  then the real commit loop of ``jobs.infer.pipeline`` over the planned images with a stand-in
  model stage that emits rows of 20 instances each (RLE strings of realistic length): part
  files written by the workers, shards assembled and staged in Ray tasks, committed by the
  driver, then folded and finished.

Each phase runs in a process of its own, so its peak RSS (``ru_maxrss``) is the driver's peak
for that phase alone; the baseline after imports and ``ray.init`` is printed next to it. The
bytes at the driver are the Arrow bytes of the part rows the commit loop receives, per
committed row. Goals (issue 14): driver peak RSS under 1 GB at 10 million objects and flat as N
grows 10x; planning at >= 100k objects/s on this 2-core machine; result bytes at the driver per
row independent of N. Prints one JSON line per phase and a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA_FILE_ROWS = 500_000
COMMITTED_FILE_ROWS = 1_000
CHANGED_EVERY = 100  # 1% of the objects change between the two reports
INSTANCES = 20
SOURCE_BUCKET = "archive"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _paths(workdir: str, n: int) -> dict:
    d = os.path.join(workdir, f"n{n}")
    return {"dir": d, "inv1": os.path.join(d, "inv1"), "inv2": os.path.join(d, "inv2"),
            "out": os.path.join(d, "out"), "out_first": os.path.join(d, "out-first")}


def _keys(lo: int, hi: int) -> list[str]:
    return [f"photos/{i % 997:03d}/{i:010d}.jpg" for i in range(lo, hi)]


def _etags(lo: int, hi: int, night: int) -> list[str]:
    return [f"{i:024x}{(night if i % CHANGED_EVERY == 0 else 0):08x}" for i in range(lo, hi)]


def write_inventory(root: str, n: int, night: int) -> str:
    """An inventory report of objects 0..n-1 in AWS's Parquet layout under ``root``; returns the
    manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = f"inv/{SOURCE_BUCKET}/daily"
    files = []
    for k, lo in enumerate(range(0, n, DATA_FILE_ROWS)):
        hi = min(n, lo + DATA_FILE_ROWS)
        table = pa.table({"bucket": [SOURCE_BUCKET] * (hi - lo), "key": _keys(lo, hi),
                          "size": pa.array([1000 + i % 5000 for i in range(lo, hi)], pa.int64()),
                          "e_tag": _etags(lo, hi, night)})
        key = f"{base}/data/{k:05d}.parquet"
        path = os.path.join(root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path)
        data = open(path, "rb").read()
        files.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest = os.path.join(root, base, "2026-12-01T01-00Z", "manifest.json")
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    with open(manifest, "w") as f:
        json.dump({"sourceBucket": SOURCE_BUCKET, "destinationBucket": "arn:aws:s3:::inventories",
                   "version": "2016-11-30", "fileFormat": "Parquet", "fileSchema": "message s3.inventory { ... }",
                   "files": files}, f)
    return manifest


def _committed_files(out: str, run_id: str, lo: int, hi: int) -> int:
    """Committed files of objects lo..hi-1 (a Ray task): the output schema, no instances."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.infer import schema

    template = schema.rows_to_table([
        schema.ok_row({"boxes": [], "labels": [], "scores": [], "label_names": []}, image_uri="x", source_etag="e",
                      source_size=0, width=640, height=480, model_name="maskrcnn", checkpoint_sha256="c" * 64,
                      run_id=run_id) for _ in range(COMMITTED_FILE_ROWS)])
    d = os.path.join(out, f"run_id={run_id}")
    os.makedirs(d, exist_ok=True)
    for a in range(lo, hi, COMMITTED_FILE_ROWS):
        b = min(hi, a + COMMITTED_FILE_ROWS)
        t = template.slice(0, b - a)
        t = t.set_column(t.schema.get_field_index("image_uri"), "image_uri",
                         pa.array([f"s3://{SOURCE_BUCKET}/{k}" for k in _keys(a, b)], pa.string()))
        t = t.set_column(t.schema.get_field_index("source_etag"), "source_etag", pa.array(_etags(a, b, 1), pa.string()))
        t = t.set_column(t.schema.get_field_index("source_size"), "source_size",
                         pa.array([1000 + i % 5000 for i in range(a, b)], pa.int64()))
        pq.write_table(t, os.path.join(d, f"part-{a:010d}.parquet"), **schema.PARQUET_WRITE_OPTIONS)
    return hi - lo


def _ray():
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


def phase_setup(p: dict, n: int) -> dict:
    from jobs.infer.commit import protocol
    from jobs.infer.tasks import run_tasks

    _ray()
    t0 = time.perf_counter()
    write_inventory(p["inv1"], n, 1)
    write_inventory(p["inv2"], n, 2)
    run = protocol.begin_run(p["out"], {"night": 1})
    step = 250_000
    run_tasks(_committed_files, [(p["out"], run.run_id, lo, min(n, lo + step)) for lo in range(0, n, step)])
    return {"setup_s": round(time.perf_counter() - t0, 1), "run_id": run.run_id}


def _manifest(root: str) -> str:
    return os.path.join(root, "inv", SOURCE_BUCKET, "daily", "2026-12-01T01-00Z", "manifest.json")


def _plan(run, manifest: str, out: str):
    from jobs.infer.commit import state
    from jobs.infer.plan import planner

    return planner.make_plan(run, manifest, state.current(out), checkpoint_sha256="c" * 64, full=False)


def phase_first(p: dict, n: int) -> dict:
    from jobs.infer.commit import protocol

    _ray()
    base = rss_mb()
    run = protocol.begin_run(p["out_first"], {"night": 1})
    t0 = time.perf_counter()
    planned = _plan(run, _manifest(p["inv1"]), p["out_first"])
    wall = time.perf_counter() - t0
    assert planned.stats.planned == n and sum(planned.expected.values()) == n, planned.stats
    return {"plan_s": round(wall, 2), "objects_per_s": round(n / wall), "planned": planned.stats.planned,
            "shards": len(planned.expected), "rss_mb": round(rss_mb()), "baseline_rss_mb": round(base)}


def phase_fold(p: dict, n: int) -> dict:
    from jobs.infer.commit import protocol
    from jobs.infer.commit import state

    _ray()
    base = rss_mb()
    run = protocol.begin_run(p["out"], {"night": 1})
    assert run.resumed
    t0 = time.perf_counter()
    manifest = state.finish_run(run)
    wall = time.perf_counter() - t0
    assert manifest["rows"] == n and state.current(p["out"]).rows == n
    return {"fold_s": round(wall, 2), "rows_per_s": round(n / wall), "files": len(manifest["files"]),
            "rss_mb": round(rss_mb()), "baseline_rss_mb": round(base)}


class StandIn:
    """The model stage's stand-in: a row of ``INSTANCES`` instances per planned image."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        from jobs.infer import schema
        from jobs.infer.plan.planner import SHARD_COLUMN

        rng = np.random.default_rng(len(batch["image_uri"]))
        rows = []
        for uri, etag, size in zip(batch["image_uri"], batch["source_etag"], batch["source_size"]):
            boxes = rng.uniform(0, 400, (INSTANCES, 4)).astype(np.float32)
            boxes[:, 2:] += boxes[:, :2]
            result = {"boxes": boxes, "labels": rng.integers(1, 80, INSTANCES), "scores": rng.uniform(0, 1, INSTANCES),
                      "label_names": ["thing"] * INSTANCES, "areas": rng.integers(100, 9000, INSTANCES),
                      "masks": [{"size": [480, 640], "counts": "".join(rng.choice(list("0123456789:;<=>?@ABC"), 80))}
                                for _ in range(INSTANCES)]}
            rows.append(schema.ok_row(result, image_uri=str(uri), source_etag=str(etag), source_size=int(size),
                                      width=640, height=480, model_name="maskrcnn", checkpoint_sha256="c" * 64,
                                      run_id=self.run_id))
        table = schema.rows_to_table(rows)
        return table.append_column(SHARD_COLUMN, pa.array([str(s) for s in batch[SHARD_COLUMN]], pa.string()))


def phase_reference(p: dict, n: int) -> dict:
    """The next night's plan by the former driver-side planner (the committed state read into a
    dict, the listing planned object by object on the driver; ``tests/_plan_reference.py``)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from _plan_reference import committed_state, plan_work

    from jobs.infer.plan.listing import list_inputs

    base = rss_mb()
    t0 = time.perf_counter()
    planned = sum(1 for _ in plan_work(list_inputs(_manifest(p["inv2"])), committed_state(p["out"]), "c" * 64, False))
    wall = time.perf_counter() - t0
    assert planned == len(range(0, n, CHANGED_EVERY))
    return {"plan_s": round(wall, 2), "objects_per_s": round(n / wall), "rss_mb": round(rss_mb()),
            "baseline_rss_mb": round(base)}


def phase_nightly(p: dict, n: int) -> dict:
    import ray

    from jobs.infer import execution, pipeline
    from jobs.infer.collect import ShardCollector
    from jobs.infer.commit import protocol, state
    from jobs.infer.execute.parts import remote_finalize, write_parts
    from jobs.infer.summary import RunSummary

    _ray()
    base = rss_mb()
    run = protocol.begin_run(p["out"], {"night": 2})
    t0 = time.perf_counter()
    state.fold(p["out"], check_run=run.run_id)
    planned = _plan(run, _manifest(p["inv2"]), p["out"])
    plan_wall = time.perf_counter() - t0
    plan_rss = rss_mb()
    expect = len(range(0, n, CHANGED_EVERY))
    assert planned.stats.planned == planned.stats.changed == expect, planned.stats

    ds = ray.data.read_parquet(planned.files).repartition(target_num_rows_per_block=64)
    ds = ds.map_batches(StandIn, fn_constructor_args=(run.run_id,), batch_size=64, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    ds = ds.map_batches(write_parts, fn_kwargs={"run": run, "pass_no": 1}, batch_size=execution.WRITE_BATCH_ROWS,
                        batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=execution.WRITE_TASKS))
    received = {"bytes": 0, "rows": 0}

    def parts():
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            received["bytes"] += batch.nbytes
            received["rows"] += batch.num_rows
            yield batch

    summary = RunSummary(run.run_id)
    t1 = time.perf_counter()
    pipeline.commit_parts(run, parts(), ShardCollector(dict(planned.expected)), summary, finalize=remote_finalize())
    manifest = state.finish_run(run)
    commit_wall = time.perf_counter() - t1
    assert manifest["rows"] == expect and summary.part_rows == received["rows"]
    return {"plan_s": round(plan_wall, 2), "objects_per_s": round(n / plan_wall), "planned": expect,
            "plan_rss_mb": round(plan_rss), "commit_s": round(commit_wall, 1),
            "committed_rows_per_s": round(expect / commit_wall), "part_rows": received["rows"],
            "driver_bytes_per_row": round(received["bytes"] / expect, 2), "rss_mb": round(rss_mb()),
            "baseline_rss_mb": round(base)}


PHASES = {"setup": phase_setup, "first": phase_first, "fold": phase_fold, "reference": phase_reference,
          "nightly": phase_nightly}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--workdir", default="/tmp/scale")
    ap.add_argument("--reference-max", type=int, default=1_000_000,
                    help="run the former driver-side planner up to this many objects (it holds them all)")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # one phase, in this process
    a = ap.parse_args()
    if a.phase:
        out = PHASES[a.phase](_paths(a.workdir, a.objects[0]), a.objects[0])
        print("RESULT " + json.dumps(out))
        return
    results = {}
    for n in a.objects:
        import shutil

        shutil.rmtree(_paths(a.workdir, n)["dir"], ignore_errors=True)
        phases = ["setup", "first", "fold"] + (["reference"] if n <= a.reference_max else []) + ["nightly"]
        for phase in phases:
            proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--objects", str(n), "--workdir",
                                   a.workdir], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"phase {phase} at {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[(n, phase)] = json.loads(line[len("RESULT "):])
            print(json.dumps({"objects": n, "phase": phase, **results[(n, phase)]}), flush=True)
        shutil.rmtree(_paths(a.workdir, n)["dir"], ignore_errors=True)
    print(f"\n| objects | first plan s (obj/s) | fold s | nightly plan s (obj/s) | former planner, nightly: s, "
          f"peak RSS MB | commit s (rows) | driver B/row | peak RSS MB first/fold/nightly (baseline) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in a.objects:
        f, d, g = results[(n, "first")], results[(n, "fold")], results[(n, "nightly")]
        r = results.get((n, "reference"))
        ref = "not run" if r is None else (f"{r['plan_s']} s, {r['rss_mb']} MB "
                                           f"(former / ours: time {r['plan_s'] / g['plan_s']:.2f}x, RSS {r['rss_mb'] / g['plan_rss_mb']:.2f}x)")
        print(f"| {n:,} | {f['plan_s']} ({f['objects_per_s']:,}) | {d['fold_s']} | {g['plan_s']} ({g['objects_per_s']:,}) "
              f"| {ref} | {g['commit_s']} ({g['planned']:,}) | {g['driver_bytes_per_row']} | "
              f"{f['rss_mb']}/{d['rss_mb']}/{g['rss_mb']} ({f['baseline_rss_mb']}) |")


if __name__ == "__main__":
    main()
