"""The output location has one owner (jobs/infer/output.py): its filesystem is resolved once per
process whatever the number of shards, a pickled handle travels without it, and the layout
under OUT is spelled there."""

from __future__ import annotations

import os
import pickle

import pytest

from jobs.infer import output as output_module
from jobs.infer.commit import protocol
from jobs.infer.config import JobConfig
from jobs.infer.output import Output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")


@pytest.fixture
def resolves(monkeypatch):
    """The URIs Output resolves, from a clean per-process cache."""
    calls = []
    real = output_module.resolve
    monkeypatch.setattr(output_module, "_RESOLVED", {})
    monkeypatch.setattr(output_module, "resolve", lambda uri, *a: calls.append(uri) or real(uri, *a))
    return calls


@pytest.mark.parametrize("images,per_shard", [(6, 6), (12, 2)])
def test_the_output_is_resolved_once_per_process_whatever_the_shards(tmp_path, resolves, run_in_process, images,
                                                                     per_shard):
    from jobs.synthetic import generate

    generate(str(tmp_path / "in"), images, seed=3, size="64/80")
    out = str(tmp_path / "out")
    summary, manifest = run_in_process(JobConfig(input=str(tmp_path / "in"), output=out, weights=WEIGHTS,
                                                 images_per_shard=per_shard, batch_size=4))
    assert manifest["rows"] == images and len(manifest["files"]) >= images // (2 * per_shard)
    assert resolves.count(out) == 1  # the driver's one, through the run, state, plan, lease, summary


def test_a_pickled_run_carries_its_output_without_the_filesystem(tmp_path, resolves):
    out = str(tmp_path / "out")
    run = protocol.Run(out, "r1")
    assert isinstance(run.output, Output) and run.output.uri == out
    assert run.staged_path("S").startswith(run.output.root) and resolves == [out]
    data = pickle.dumps(run)
    assert b"LocalFileSystem" not in data and len(data) < 1000
    again = pickle.loads(data)
    assert again == run and again.visible_path("S") == run.visible_path("S")
    assert resolves == [out]  # the same process: resolved already
    assert repr(Output("s3://b/out", {"key": "AKIA-secret", "secret": "x"})) == "Output('s3://b/out')"


def test_the_layout_under_the_output():
    o = Output("/data/out")
    assert o.visible_path("r1", "S") == "/data/out/run_id=r1/part-S.parquet"
    assert o.staged_path("r1", "S") == "/data/out/_staging/r1/part-S.parquet"
    assert o.part_path("r1", "S", "p1-x") == "/data/out/_staging/r1/parts/S/p1-x.parquet"
    assert o.run_path("r1", "_SUCCESS") == "/data/out/_runs/r1/_SUCCESS"
    assert o.state_path("current.json") == "/data/out/_state/current.json"
    assert o.lock_path() == "/data/out/_writer.json"
