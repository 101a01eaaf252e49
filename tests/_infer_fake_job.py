"""A model-free driver of the batch job's pipeline, for the commit-protocol tests.

It wires the real pieces (state fold, listing and planning by bucket, content-defined shards,
decode, schema rows, staging, commit, finish) exactly as the Ray job does, with a fake predictor
in place of Mask R-CNN. Run as a script it does one run and can kill itself with SIGKILL
at a chosen protocol step: ``python tests/_infer_fake_job.py IN OUT CKPT [--full]`` with
``CRASH_AT=step:n`` (the n-th time ``step`` is reached, counting from 0).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
from pycocotools import mask as mask_utils

from jobs.infer import schema
from jobs.infer.commit import protocol
from jobs.infer.summary import RunSummary
from jobs.infer.execute.decode import DecodeError, decode_image
from jobs.infer.commit import state
from jobs.infer.plan import planner
from jobs.infer.schema import PLAN_SCHEMA, SourceObject
from jobs.storage import ReadError, read_object, resolve

MODEL = "fake-maskrcnn"


def fake_predict(img: np.ndarray) -> dict:
    """One instance: the top-left quarter of the image."""
    h, w = img.shape[:2]
    m = np.zeros((h, w, 1), np.uint8, order="F")
    m[: max(1, h // 2), : max(1, w // 2)] = 1
    rle = mask_utils.encode(m)[0]
    return {
        "boxes": np.array([[0, 0, max(1, w // 2), max(1, h // 2)]], np.float32),
        "labels": np.array([1], np.int64),
        "scores": np.array([0.9], np.float32),
        "label_names": ["thing"],
        "areas": np.array([int(mask_utils.area(rle))], np.int64),
        "masks": [{"size": [h, w], "counts": rle["counts"]}],
    }


def run_job(input_uri, output_uri, ckpt, *, full=False, shard_size=4, calls=None, stats=None, on_step=None):
    """One run of the job; returns (run, manifest). ``calls`` collects processed URIs; ``on_step``:
    the run's crash points (``protocol.Run.on_step``)."""
    params = {"input": input_uri, "checkpoint_sha256": ckpt, "model": MODEL, "full": full}
    run = protocol.begin_run(output_uri, params, on_step=on_step)
    summary = RunSummary(run.run_id, resumed=run.resumed)
    version = state.fold(output_uri, check_run=run.run_id, on_step=on_step)
    work = planner.make_plan(run, input_uri, version, checkpoint_sha256=ckpt, full=full, target_size=shard_size,
                          list_tasks=0)
    if stats is not None:
        stats.add(work.stats)
    for shard_id, counts in work.staged.items():
        summary.add_shard(counts, reused=True)
        run.commit(shard_id)
    for shard in _plan_shards(output_uri, work.files):
        rows = []
        for obj in shard.items:
            if calls is not None:
                calls.append(obj.image_uri)
            meta = dict(image_uri=obj.image_uri, source_etag=obj.source_etag, source_size=obj.source_size,
                        model_name=MODEL, checkpoint_sha256=ckpt, run_id=run.run_id)
            try:
                if obj.error:
                    raise ReadError(obj.error, obj.error_kind or "read")
                img = decode_image(read_object(obj.image_uri), max_pixels=10_000_000, max_aspect=20)
                rows.append(schema.ok_row(fake_predict(img), width=img.shape[1], height=img.shape[0], **meta))
            except (ReadError, DecodeError) as e:
                rows.append(schema.error_row(reason=e.reason, kind=e.kind, **meta))
        table = schema.rows_to_table(rows)
        run.stage(shard, table)
        summary.add_shard(schema.shard_counts(table))
        run.commit(shard.shard_id)
    summary.add_plan(work.stats)
    summary.finish().write(output_uri)
    print(summary.format())
    return run, state.finish_run(run)


def _plan_shards(output_uri, files):
    """The shards of plan files, in their order (as the pipeline reads them, without Ray)."""
    fs, _ = resolve(output_uri)
    for path in files:
        table = state.read_table(fs, path)
        items: dict[str, list] = {}
        for uri, etag, size, error, kind, shard_id in zip(*(table.column(c).to_pylist() for c in PLAN_SCHEMA.names)):
            items.setdefault(shard_id, []).append(SourceObject(uri, etag, None if size == -1 else size, error, kind))
        for shard_id, objs in items.items():
            yield protocol.Shard(shard_id, tuple(objs))


def _crash_hook(spec: str, delay: float):
    """A hook that kills this process at the n-th ``step`` (``spec``: "step:n"), after ``delay`` s a step."""
    step, n = spec.split(":")
    seen = {"n": 0}

    def hook(name, detail):
        if delay:
            time.sleep(delay)
        if name == step:
            if seen["n"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            seen["n"] += 1

    return hook


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    hook = None
    if os.environ.get("CRASH_AT") or os.environ.get("STEP_DELAY"):
        hook = _crash_hook(os.environ.get("CRASH_AT", "never:0"), float(os.environ.get("STEP_DELAY", "0")))
    run_job(args[0], args[1], args[2], full="--full" in sys.argv, on_step=hook)
    print("finished")
