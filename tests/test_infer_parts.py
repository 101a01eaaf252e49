"""Result rows written by the workers (jobs/infer/execute/parts.py) in the batch job's real driver loop
(``pipeline.run_job`` with the Ray dataset replaced by the same stages in this process): the
driver sees one small row per part file and no result row; a retried write replaces its part.
A run killed after any part file, staged shard or commit is tests/test_infer_commit.py's
crash-at-every-step test, on the same driver loop."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.infer import execution, pipeline
from jobs.infer.commit import protocol
from jobs.infer.output import Output
from jobs.infer.summary import read_summary
from jobs.infer.execute import parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")


def _inputs(root, n):
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40 + i % 3, 56, 3), dtype=np.uint8)).save(os.path.join(root, f"i{i:02d}.png"))
    with open(os.path.join(root, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    return n + 1


def _config(tmp_path, **kw):
    return pipeline.JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), weights=WEIGHTS,
                              images_per_shard=4, batch_size=2, **kw)


def _rows(out):
    return [r for f in Output(str(out)).committed_files() for r in pq.read_table(f, columns=["image_uri", "run_id"]).to_pylist()]


def test_the_driver_sees_part_rows_only(tmp_path, run_in_process, monkeypatch):
    n = _inputs(tmp_path / "in", 10)
    seen = []
    real = pipeline.commit_parts

    def spy(run, batches, *args, **kwargs):
        def watched():
            for batch in batches:
                seen.append(batch)
                yield batch
        return real(run, watched(), *args, **kwargs)

    written = []
    monkeypatch.setattr(pipeline, "commit_parts", spy)
    summary, manifest = run_in_process(
        _config(tmp_path), on_step=lambda name, detail: written.append(detail) if name == "part written" else None)
    assert manifest["rows"] == n and summary.ok + summary.error == n
    assert seen and all(b.schema.equals(parts.PART_SCHEMA) for b in seen)  # no result column reaches it
    part_rows = sum(b.num_rows for b in seen)
    # one per shard in each batch of two images: a row per part file, fewer than the images
    assert part_rows == summary.part_rows == len(written) and n / 2 <= part_rows < n
    assert read_summary(str(tmp_path / "out"), summary.run_id)["part_rows"] == part_rows
    rows = _rows(tmp_path / "out")
    assert len(rows) == n == len({r["image_uri"] for r in rows})


def test_a_retried_write_replaces_its_part_and_a_shard_keeps_one_row_per_image(tmp_path, run_in_process):
    _inputs(tmp_path / "in", 4)
    cfg = _config(tmp_path)
    run = protocol.begin_run(cfg.output, {"test": 1})
    ckpt = pipeline.checkpoint_identity(cfg.weights)
    from jobs.infer.execute.stages import PredictorActor, decode_batch, plan_batch

    uris = sorted(str(p) for p in (tmp_path / "in").glob("i*.png"))
    actor = PredictorActor(cfg.weights, model_name=ckpt.model_name, checkpoint_sha256=ckpt.sha256, run_id=run.run_id)
    rows = actor(decode_batch(plan_batch(uris, shard_id="S"), **execution.decode_kwargs(cfg, ckpt)))
    first = parts.write_parts(rows, run=run, pass_no=1)
    again = parts.write_parts(rows, run=run, pass_no=1)  # a retried or re-executed task
    assert first.equals(again) and first.num_rows == 1
    assert len(os.listdir(os.path.dirname(first.column("part")[0].as_py()))) == 1
    # the same rows split otherwise by a re-executed block: overlapping parts, one row per image
    halves = [parts.write_parts(rows.slice(0, 3), run=run, pass_no=1), parts.write_parts(rows.slice(2), run=run, pass_no=1)]
    paths = [t.column("part")[0].as_py() for t in halves]
    assert parts.finalize_shard(run, "S", paths[:1], 4, final=True, pass_no=1) == parts.Incomplete(missing=1)
    result = parts.finalize_shard(run, "S", paths + paths[:1], 4, final=True, pass_no=1)
    assert isinstance(result, parts.Staged) and result.counts["rows"] == 4
    staged = pq.read_table(run.staged_path("S"))
    assert Counter(staged.column("image_uri").to_pylist()) == Counter(uris)
    with pytest.raises(RuntimeError, match="4 images in its parts, 3 planned"):
        parts.finalize_shard(run, "S", paths + [first.column("part")[0].as_py()], 3, final=True, pass_no=1)
