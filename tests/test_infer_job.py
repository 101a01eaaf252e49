"""End to end: `python -m jobs.infer` on a moto S3 server with a tiny seeded Mask R-CNN.

Slow (Ray, Spark, subprocess CLI runs): one local Ray (4 logical CPUs) for the module;
images are 64-160 px and the model resizes to 128-192 px.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.infer.__main__ import main
from jobs.infer.output import VISIBLE_GLOB
from jobs.infer.execute.decode import decode_image
from jobs.storage import resolve

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKEN = {"zero.jpg": "empty file", "truncated.jpg": "", "text.jpg": "text"}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def ray_cluster(moto_server):
    import ray

    env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto_server}  # workers reach the moto server too
    # one logical GPU: lets a GPU actor be scheduled here, to test its refusal to start without one;
    # 3 CPUs as the embedded default gives this 2-core machine: two model actors
    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import mrcnn
    from mrcnn.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=4, min_size=128, max_size=192, box_score_thresh=0.0)
    with torch.no_grad():  # peaky class scores so that "score > 0.5" selects some instances
        model.roi_heads.box_predictor.cls_score.weight.mul_(20)
    path = str(tmp_path_factory.mktemp("w") / "tiny.pt")
    save_checkpoint(model, path, class_names=["__background__", "cat", "dog", "car"])
    return path


def _image_bytes(rng, h, w, fmt):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _put_images(bucket, names, seed):
    import s3fs

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        fs.pipe_file(f"{bucket}/in/{name}", _image_bytes(rng, 64 + 8 * (i % 12), 96 + 6 * (i % 11), fmt))


def _make_input(bucket):
    import s3fs

    _put_images(bucket, [f"img{i:02d}.{'png' if i % 2 else 'jpg'}" for i in range(9)], seed=1)
    fs = s3fs.S3FileSystem()
    good = _image_bytes(np.random.default_rng(5), 80, 80, "JPEG")
    fs.pipe_file(f"{bucket}/in/zero.jpg", b"")
    fs.pipe_file(f"{bucket}/in/truncated.jpg", good[: len(good) // 2])
    fs.pipe_file(f"{bucket}/in/text.jpg", b"this is not an image\n" * 3)
    fs.pipe_file(f"{bucket}/in/notes.json", b"{}")  # not an image extension: not an input
    return f"s3://{bucket}/in", f"s3://{bucket}/out"


def _rows(out, run_id=None):
    fs, root = resolve(out)
    fs.invalidate_cache()
    table = pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()
    rows = table.to_pylist()
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


def _summary(out, run_id):
    fs, root = resolve(out)
    with fs.open(f"{root}/_runs/{run_id}/summary.json") as f:
        return json.load(f)


def _job(capsys, *args):
    assert main(list(args)) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    # not a terminal: a progress line once planned, then as images get done and shards committed,
    # ending with all of them committed and done
    progress = re.findall(r"^jobs\.infer: (\d+)/(\d+) images committed, (\d+) done(?:, [\d.]+ images/s)?"
                          r"(?:, about \d+ (?:s|min) left|, starting)? \(\d+ s\)$", captured.err, re.M)
    n = str(summary["processed"])
    assert progress[0] == ("0", n, "0") and progress[-1] == (n, n, n), captured.err[-2000:]
    return summary


def _direct(weights, uris):
    """The Predictor run directly, one image per call (as the job runs with --batch-size 1)."""
    from mrcnn.predictor import Predictor
    from jobs.storage import read_object

    pred = Predictor.from_checkpoint(weights, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the job's 1-CPU actor: same kernels, same float sums
    try:
        return {u: pred([decode_image(read_object(u))])[0] for u in uris}
    finally:
        torch.set_num_threads(threads)


def _label_counts(results):
    c = Counter()
    for r in results.values():
        for label, score in zip(r["labels"], r["scores"]):
            if score > 0.5:
                c[int(label)] += 1
    return dict(c)


def test_job_matches_predictor_readers_agree_and_incremental(ray_cluster, weights, s3_bucket, capsys, tmp_path,
                                                            monkeypatch):
    inp, out = _make_input(s3_bucket)
    args = ["--input", inp, "--output", out, "--weights", weights, "--images-per-shard", "4"]
    s = _job(capsys, *args, "--batch-size", "1")
    assert (s["listed"], s["processed"], s["ok"], s["error"], s["rows"]) == (12, 12, 9, 3, 12)
    rows = _rows(out)
    assert len(rows) == 12 and len({r["image_uri"] for r in rows}) == 12
    by_uri = {r["image_uri"]: r for r in rows}
    for name, hint in BROKEN.items():
        r = by_uri[f"{inp}/{name}"]
        assert r["status"] == "error" and r["error"] and hint in r["error"] and r["instances"] is None
    ok = {u: r for u, r in by_uri.items() if r["status"] == "ok"}
    assert len(ok) == 9

    # Same instances as the Predictor run directly on the same decoded images.
    direct = _direct(weights, sorted(ok))
    compared = 0
    for uri, res in direct.items():
        inst = ok[uri]["instances"]
        assert len(inst) == len(res["labels"]) > 0
        assert [i["label"] for i in inst] == res["labels"].tolist()
        assert [i["label_name"] for i in inst] == list(res["label_names"])
        np.testing.assert_allclose([i["score"] for i in inst], res["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([i["bbox"] for i in inst], res["boxes"], rtol=1e-5, atol=1e-3)
        h, w = ok[uri]["height"], ok[uri]["width"]
        got = mask_utils.decode([{"size": [h, w], "counts": i["mask_rle"].encode()} for i in inst])
        want = mask_utils.decode([{"size": m["size"], "counts": m["counts"].encode() if isinstance(m["counts"], str) else m["counts"]} for m in res["masks"]])
        assert np.array_equal(got, want)
        compared += 1
    assert compared == 9
    expected = _label_counts(direct)
    assert sum(expected.values()) > 0

    # The same query in pyarrow.dataset, DuckDB (on S3 via s3fs) and Spark (local copy).
    got_pa = Counter(i["label"] for r in ok.values() for i in r["instances"] if i["score"] > 0.5)
    assert dict(got_pa) == expected
    import duckdb

    fs, root = resolve(out)
    con = duckdb.connect()
    con.register_filesystem(fs)
    q = ("SELECT i.label, count(*) FROM (SELECT unnest(instances) AS i FROM read_parquet('{}')) "
         "WHERE i.score > 0.5 GROUP BY ALL")
    assert dict(con.sql(q.format(f"{out}/{VISIBLE_GLOB}")).fetchall()) == expected
    local = tmp_path / "copy"
    fs.get(root, str(local), recursive=True)
    from pyspark.sql import SparkSession, functions as F

    spark = (SparkSession.builder.master("local[1]").appName("t").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "1").getOrCreate())
    try:
        df = spark.read.parquet(str(local)).select(F.explode("instances").alias("i"))
        got_spark = {r["label"]: r["count"] for r in df.filter("i.score > 0.5").groupBy("i.label").count().collect()}
    finally:
        spark.stop()
    assert got_spark == expected

    # Incremental rerun: nothing new.
    s2 = _job(capsys, *args, "--batch-size", "3")
    assert s2["run_id"] != s["run_id"] and (s2["processed"], s2["skipped_unchanged"], s2["rows"]) == (0, 12, 0)

    # Two new images and one changed: only those three are processed (batched 3 per call). The
    # buckets are planned and folded in Ray tasks of a few buckets each, as a large archive's are
    # (a run this small is otherwise planned in the driver).
    from jobs.infer import tasks

    monkeypatch.setattr(tasks, "ROWS_PER_TASK", 4)
    assert 1 < len(tasks.task_groups(64, 14)) < 64
    _put_images(s3_bucket, ["new1.jpg", "new2.png"], seed=7)
    _put_images(s3_bucket, ["img03.png"], seed=8)
    s3 = _job(capsys, *args, "--batch-size", "3")
    processed = {r["image_uri"] for r in _rows(out, s3["run_id"])}
    assert processed == {f"{inp}/new1.jpg", f"{inp}/new2.png", f"{inp}/img03.png"}
    assert (s3["processed"], s3["ok"], s3["skipped_unchanged"]) == (3, 3, 11)

    # --full reprocesses everything.
    s4 = _job(capsys, *args, "--batch-size", "3", "--full")
    assert (s4["processed"], s4["rows"]) == (14, 14)
    assert len({r["image_uri"] for r in _rows(out, s4["run_id"])}) == 14


_RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|[^)]*pid=\d+)")


def _cli_stderr(capsys):
    """What the CLI wrote to stderr, without the lines Ray's own processes print there
    (a raylet's disk-space warning, for one, can land in any test)."""
    err = capsys.readouterr().err
    return "\n".join(line for line in err.splitlines() if not _RAY_LOG_LINE.match(line)).strip()


def test_infrastructure_errors_fail_fast(ray_cluster, weights, s3_bucket, tmp_path, capsys):
    inp, out = _make_input(s3_bucket)
    missing = str(tmp_path / "nope.pt")
    assert main(["--input", inp, "--output", out, "--weights", missing]) == 2
    err = _cli_stderr(capsys)
    assert err.count("\n") == 0 and "checkpoint not found" in err and missing in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--input", inp, "--output", out, "--weights", str(bad)]) == 2
    err = _cli_stderr(capsys)
    assert err.count("\n") == 0 and "cannot load checkpoint" in err
    assert main(["--input", f"s3://{s3_bucket}-missing/in", "--output", out, "--weights", weights]) == 2
    err = _cli_stderr(capsys)
    assert err.count("\n") == 0 and "input not found" in err
    fs, root = resolve(out)
    assert not fs.exists(root)  # nothing written by failed starts

    # another live run holds the output's writer lease: refused with a one-line reason, nothing written
    from jobs.infer.commit.lock import WriterLease

    with WriterLease(out, "the nightly run", heartbeat_s=0.2):
        assert main(["--input", inp, "--output", out, "--weights", weights]) == 2
    err = _cli_stderr(capsys)
    assert err.count("\n") == 0 and "being written by another run (the nightly run" in err
    fs.invalidate_cache()
    assert fs.find(root) == []  # the lease was the only file, and it is gone


def test_a_gpu_actor_that_cannot_run_fails_the_run_in_one_line(ray_cluster, weights, s3_bucket, capsys):
    # Ray schedules the actor on the logical GPU, but torch finds no CUDA device (as on a GPU
    # node whose driver or extension lacks CUDA): one line with the cause, exit 2, no error rows.
    assert not torch.cuda.is_available()
    inp, out = _make_input(s3_bucket)
    assert main(["--input", inp, "--output", out, "--weights", weights, "--num-gpus-per-actor", "1"]) == 2
    errors = [line for line in _cli_stderr(capsys).splitlines() if line.startswith("jobs.infer: error:")]
    assert len(errors) == 1 and "the model actors could not start" in errors[0], errors
    assert "sees no CUDA GPU" in errors[0], errors
    fs, root = resolve(out)
    fs.invalidate_cache()
    assert not fs.glob(f"{root}/run_id=*/*.parquet")  # nothing committed: no image became an error row


def _timed_actor_class(log_path: str, delay_s: float):
    """The job's model actor with a slow stand-in forward and slow host work (sleeps beside the
    real ones), logging when each ran: ``forward|finish <start> <end>`` lines."""
    import threading

    from jobs.infer.execute.stages import PredictorActor

    class TimedActor(PredictorActor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            lock = threading.Lock()

            def timed(what, fn):
                def run(*a, **k):
                    t0 = time.monotonic()
                    out = fn(*a, **k)
                    time.sleep(delay_s)
                    with lock, open(log_path, "a") as f:
                        f.write(f"{what} {t0} {time.monotonic()}\n")
                    return out
                return run

            self.predictor.model.forward = timed("forward", self.predictor.model.forward)
            self.predictor.finish = timed("finish", self.predictor.finish)

    return TimedActor


def test_a_gpu_actor_runs_one_calls_host_work_during_the_next_forward(ray_cluster, tmp_path):
    # As the job runs GPU actors (model_actor_options(overlap=True)), on CPU with a stand-in
    # forward and host work of 0.4 s each: the forwards never overlap one another (one device),
    # and host work of one call runs while another call's forward runs.
    import ray

    from jobs.infer.execute.stages import decode_batch, plan_batch
    from jobs.infer.execution import model_actor_options

    rng = np.random.default_rng(3)
    uris = []
    for i in range(8):
        path = tmp_path / f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    plan = {k: pa.array(list(v), pa.int64() if k == "source_size" else pa.string()) for k, v in plan_batch(uris).items()}
    plan = pa.table(plan)
    log = tmp_path / "timeline.txt"
    blocks = [plan.slice(i, 2) for i in range(0, len(uris), 2)]  # four blocks: four actor tasks
    ds = ray.data.from_arrow(blocks).map_batches(decode_batch, batch_size=2, batch_format="numpy")
    weights = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")  # the shipped model: a fast forward
    ds = ds.map_batches(_timed_actor_class(str(log), 0.4), fn_constructor_args=(weights,),
                        fn_constructor_kwargs={"model_name": "m", "checkpoint_sha256": "x", "run_id": "r",
                                               "device": "cpu", "micro_batch": 2, "num_threads": 1, "overlap": True},
                        batch_size=2, batch_format="numpy", num_cpus=1, **model_actor_options(1, overlap=True))
    out = ds.take_all()
    assert sorted(r["image_uri"] for r in out) == sorted(uris) and {r["status"] for r in out} == {"ok"}
    events = [line.split() for line in log.read_text().splitlines()]
    forwards = sorted((float(a), float(b)) for what, a, b in events if what == "forward")
    finishes = sorted((float(a), float(b)) for what, a, b in events if what == "finish")
    assert len(forwards) == len(finishes) == 4  # one micro-batch per call, four calls
    assert all(b[0] >= a[1] for a, b in zip(forwards, forwards[1:])), f"forwards ran at once: {forwards}"
    overlapping = [f for f in finishes if any(min(f[1], w[1]) - max(f[0], w[0]) > 0.2 for w in forwards)]
    assert len(overlapping) >= 2, f"host work never ran during a forward: forwards {forwards}, finishes {finishes}"


_SLOW_COMMITS = """
import functools, sys, time
from jobs.infer import __main__ as cli
cli.run_job = functools.partial(cli.run_job, on_step=lambda step, detail: time.sleep(2.0) if step == "committed" else None)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_cli_kill_and_rerun_exactly_one_row_per_image(weights, s3_bucket, moto_server):
    inp, out = _make_input(s3_bucket)
    args = ["--input", inp, "--output", out, "--weights", weights, "--images-per-shard", "2", "--batch-size", "2"]
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": moto_server, "PYTHONPATH": ROOT, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    # The real entry point with a 2 s pause after each commit, so the kill lands mid-run.
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMMITS, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    fs, root = resolve(out)
    deadline = time.time() + 150
    parts = []
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        parts = fs.glob(f"{root}/run_id=*/part-*.parquet")
        if parts:
            break
        time.sleep(0.2)
    assert parts, f"no shard committed in time:\n{proc.stdout.read().decode()[-3000:] if proc.poll() is not None else ''}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    run_id = parts[0].split("run_id=")[1].split("/")[0]
    assert not fs.exists(f"{root}/_runs/{run_id}/_SUCCESS")
    before = {r["image_uri"] for r in _rows(out, run_id)}
    assert 0 < len(before) < 12

    # The rerun also asks for the run report: not a run parameter, so the run still resumes.
    res = subprocess.run([sys.executable, "-m", "jobs.infer", *args, "--report"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["run_id"] == run_id and s["resumed"]
    assert s["skipped_done_in_run"] == len(before) and s["processed"] == 12 - len(before)
    rows = _rows(out, run_id)
    assert len(rows) == 12 and Counter(r["image_uri"] for r in rows).most_common(1)[0][1] == 1
    assert fs.exists(f"{root}/_runs/{run_id}/_SUCCESS")
    with fs.open(f"{root}/_runs/{run_id}/report.html", "rb") as f:
        report = f.read().decode()
    assert f"<h1>Run {run_id}</h1>" in report and "12 committed rows" in report


def test_pool_size_follows_the_cluster_unless_given():
    from jobs.infer.config import JobConfig
    from jobs.infer.execution import pool_size

    cfg = dict(input="in", output="out", weights="w.pt")
    # CPU actors: one per CPU after the decode stage's share
    assert pool_size(JobConfig(**cfg), {"CPU": 3.0}) == 2
    assert pool_size(JobConfig(**cfg), {"CPU": 2.0}) == 1
    assert pool_size(JobConfig(**cfg, num_cpus_per_actor=4), {"CPU": 64.0}) == 15
    assert pool_size(JobConfig(**cfg), {"CPU": 0.5}) == 1  # never an empty pool
    # GPU actors: one per GPU share; CPUs do not matter
    assert pool_size(JobConfig(**cfg, num_gpus_per_actor=1), {"CPU": 64.0, "GPU": 8.0}) == 8
    assert pool_size(JobConfig(**cfg, num_gpus_per_actor=0.5), {"CPU": 8.0, "GPU": 2.0}) == 4
    # no GPU node yet (an autoscaling cluster starts one for the first actor)
    assert pool_size(JobConfig(**cfg, num_gpus_per_actor=1), {"CPU": 8.0}) == 1
    # an explicit --num-actors wins
    assert pool_size(JobConfig(**cfg, num_actors=3), {"CPU": 64.0}) == 3


def test_blocks_are_large_for_ray_and_small_enough_to_give_every_actor_work():
    from jobs.infer.execution import BLOCK_BATCHES, BLOCKS_PER_ACTOR, block_rows

    assert block_rows(4, 2400, 2) == 4 * BLOCK_BATCHES  # a large pass: the largest blocks
    assert block_rows(4, 10**7, 64) == 4 * BLOCK_BATCHES
    assert block_rows(4, 10, 2) == 4 and block_rows(4, 0, 1) == 4  # never below one model batch
    for images, actors in ((192, 2), (50, 2), (50, 1), (1000, 16), (300, 3)):
        rows = block_rows(4, images, actors)
        blocks = -(-images // rows)  # each actor gets BLOCKS_PER_ACTOR blocks, or the pass is one batch a block
        assert 4 <= rows < 4 * BLOCK_BATCHES and blocks >= min(actors * BLOCKS_PER_ACTOR, -(-images // 4)), (images, actors)
        assert rows % 4 == 0  # whole model batches: a block of 6 would make batches of 4 and 2


def test_a_detectron2_checkpoint_and_config_from_s3(ray_cluster, s3_bucket, capsys, tmp_path):
    """A Detectron2 model zoo .pkl and its YAML config (with _BASE_ files beside it) on S3: the
    rows equal Detectron2's own DefaultPredictor, and label names are COCO's, queryable by name."""
    import s3fs

    import _detectron2_fixture as fx

    fs = s3fs.S3FileSystem()
    weights = fx.write_checkpoint(fx.detectron2_state_dict("R50-FPN"), str(tmp_path), "pkl")
    fs.put_file(weights, f"{s3_bucket}/models/model_final.pkl")
    for name in ("mask_rcnn_R_50_FPN.yaml", "Base-RCNN-FPN.yaml", "small-test-size.yaml"):
        fs.put_file(os.path.join(fx.HERE, name), f"{s3_bucket}/models/{name}")
    files = {}
    for name, rgb in fx.images().items():
        if name == "portrait":  # the photo's own JPEG bytes: the job decodes what Detectron2 was given
            with open(fx.PHOTO, "rb") as f:
                data, key = f.read(), f"{name}.jpg"
        else:
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            data, key = buf.getvalue(), f"{name}.png"
        fs.pipe_file(f"{s3_bucket}/in/{key}", data)
        files[key] = name
    out = f"s3://{s3_bucket}/out"
    s = _job(capsys, "--input", f"s3://{s3_bucket}/in", "--output", out, "--weights",
             f"s3://{s3_bucket}/models/model_final.pkl", "--model-config",
             f"s3://{s3_bucket}/models/mask_rcnn_R_50_FPN.yaml", "--decode", "full", "--batch-size", "1")
    assert (s["processed"], s["ok"], s["error"]) == (3, 3, 0)
    rows = {files[r["image_uri"].rsplit("/", 1)[1]]: r for r in _rows(out, s["run_id"])}
    by_image = {name: {"labels": [i["label"] for i in r["instances"]],
                       "label_names": [i["label_name"] for i in r["instances"]],
                       "boxes": [i["bbox"] for i in r["instances"]], "scores": [i["score"] for i in r["instances"]],
                       "masks": [i["mask_rle"] for i in r["instances"]]} for name, r in rows.items()}
    # channels-last CPU actors: equal up to float rounding
    assert fx.assert_rows_equal_detectron2(by_image, "R50-FPN") == 300

    import duckdb

    fs_, root = resolve(out)
    con = duckdb.connect()
    con.register_filesystem(fs_)
    q = "SELECT i.label_name, count(*) FROM (SELECT unnest(instances) AS i FROM read_parquet('{}')) GROUP BY ALL"
    ref = fx.reference("R50-FPN")["images"]
    from mrcnn import COCO_CATEGORY_NAMES
    from mrcnn.detectron2 import coco_label_ids

    expected = Counter(COCO_CATEGORY_NAMES[coco_label_ids()[c]] for r in ref.values() for c in r["classes"])
    assert dict(con.sql(q.format(f"{out}/{VISIBLE_GLOB}")).fetchall()) == dict(expected)
    with fs_.open(f"{root}/_runs/{s['run_id']}/manifest.json") as f:
        manifest = json.load(f)
    assert manifest["class_names_source"] == "coco"
    assert manifest["params"]["model_config"].endswith("mask_rcnn_R_50_FPN.yaml")
