"""The batch job's output settings (--score-thresh, --max-instances, --precision): recorded in
every row's ``settings``, part of the run's parameters, and a change reprocesses every image."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from jobs.infer import pipeline, schema
from jobs.infer.__main__ import parse_args
from jobs.infer.output import Output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")


def test_settings_key_is_canonical_and_null_without_settings():
    assert schema.settings_key() is None
    key = schema.settings_key(score_thresh=0.3, max_instances=5, precision="fp16")
    assert key == '{"max_instances": 5, "precision": "fp16", "score_thresh": 0.3}'
    assert json.loads(schema.settings_key(max_instances=2)) == {"max_instances": 2}


@pytest.mark.parametrize("argv, message", [
    (["--score-thresh", "1.5"], "--score-thresh must be in"),
    (["--max-instances", "0"], "--max-instances must be >= 1"),
    (["--precision", "fp16"], "fp16 needs GPU actors"),
    (["--precision", "int8"], "invalid choice"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-aspect", "0.5"], "--max-aspect must be >= 1"),
    (["--list-tasks", "-1"], "--list-tasks must be >= 0"),
    (["--num-cpus-per-actor", "0"], "--num-cpus-per-actor must be > 0"),
    (["--read-backoff", "-1"], "--read-backoff must be >= 0"),
])
def test_bad_settings_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--input", "x", "--output", "y", "--weights", "z", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    cfg = parse_args(["--input", "x", "--output", "y", "--weights", "z", "--precision", "fp16", "--num-gpus-per-actor", "1"])
    assert cfg.precision == "fp16"
    cfg = parse_args(["--input", "x", "--output", "y", "--weights", "z", "--precision", "bf16"])  # CPU actors
    assert cfg.precision == "bf16"


def test_each_setting_is_declared_once_and_checked_from_python_too():
    """The command line is JobConfig's fields: a flag for each (with its default), nothing else
    but --report and --help; a config made in Python fails the same checks."""
    import dataclasses

    from jobs.infer.__main__ import build_parser
    from jobs.infer.config import JobConfig
    from jobs.infer.errors import UsageError

    fields = [f for f in dataclasses.fields(JobConfig) if f.metadata["flag"]]
    flags = {o for a in build_parser()._actions for o in a.option_strings}
    assert len(fields) >= 24 and flags == {"--" + f.name.replace("_", "-") for f in fields} | {"--report", "-h", "--help"}
    minimal = dict(input="x", output="y", weights="z")
    assert parse_args(["--input", "x", "--output", "y", "--weights", "z"]) == JobConfig(**minimal)
    with pytest.raises(UsageError, match="--images-per-shard must be >= 1, got 0"):
        JobConfig(**minimal, images_per_shard=0)
    with pytest.raises(UsageError, match="--decode must be one of sized, full, device"):
        JobConfig(**minimal, decode="gpu")
    assert JobConfig(**minimal, score_thresh=0.3, decode="full").settings == '{"decode": "full", "score_thresh": 0.3}'


def test_cpu_actors_take_bf16_where_the_cpu_has_native_bf16(monkeypatch):
    import mrcnn.predictor

    from jobs.infer.execute.stages import PredictorActor

    def actor():
        return PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="c" * 64, run_id="r", device="cpu",
                              precision="bf16")

    monkeypatch.setattr(mrcnn.predictor, "native_bf16_cpu", lambda: None)
    with pytest.raises(RuntimeError, match="needs a CPU with AVX512_BF16 or AMX"):
        actor()
    monkeypatch.setattr(mrcnn.predictor, "native_bf16_cpu", lambda: "avx512_bf16")
    assert actor().predictor.precision == "bf16"


def test_a_settings_change_reprocesses_every_image_and_rows_record_it(tmp_path, run_in_process):
    inp = tmp_path / "in"
    inp.mkdir()
    from jobs.synthetic import generate  # shapes the shipped model finds

    generate(str(inp / "archive"), 6, seed=7, size="128/160")
    images = sorted((inp / "archive").rglob("*.png"))
    assert len(images) == 6
    out = tmp_path / "out"

    def run(**kw):
        cfg = pipeline.JobConfig(input=str(inp), output=str(out), weights=WEIGHTS, images_per_shard=3, batch_size=2, **kw)
        summary, _ = run_in_process(cfg)
        rows = [r for f in Output(str(out)).committed_files() for r in pq.read_table(f).to_pylist()
                if r["run_id"] == summary.run_id]
        return summary, rows

    s1, rows1 = run()
    assert s1.planned == 6 and {r["settings"] for r in rows1} == {None}
    assert max(len(r["instances"]) for r in rows1) >= 2  # so that a cap of 1 changes something
    s2, rows2 = run(max_instances=1, score_thresh=0.5)
    assert s2.planned == 6 and len(rows2) == 6
    assert {r["settings"] for r in rows2} == {'{"max_instances": 1, "score_thresh": 0.5}'}
    assert all(len(r["instances"]) <= 1 and all(i["score"] > 0.5 for i in r["instances"]) for r in rows2)
    s3, _ = run(max_instances=1, score_thresh=0.5)  # the same settings: nothing new
    assert s3.planned == 0 and s3.skipped_unchanged == 6
    s4, _ = run()  # back to the checkpoint's own: every image again
    assert s4.planned == 6


def test_predictor_refuses_an_unknown_precision_and_records_the_default():
    from mrcnn.predictor import Predictor

    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor.from_checkpoint(WEIGHTS, device="cpu", precision="int8")
    p = Predictor.from_checkpoint(WEIGHTS, device="cpu", max_detections=3)
    assert p.precision == "fp32" and p.model.roi_heads.detections_per_img == 3


def test_only_the_jobs_own_errors_exit_2_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """JobError (usage, infrastructure, outage, lease, run mismatch, duplicates) is exit 2 and
    its message on one line, also when raised in a Ray task; anything else propagates (exit 1)."""
    from ray.exceptions import RayTaskError

    from jobs.infer import __main__ as cli
    from jobs.infer.errors import InfraError, RunMismatchError

    monkeypatch.setattr(cli, "init_ray", lambda: None)
    argv = ["--input", "x", "--output", "y", "--weights", "z"]

    def fails_with(error):
        def run_job(cfg, progress=None):
            raise error
        monkeypatch.setattr(cli, "run_job", run_job)

    fails_with(RunMismatchError("run r1 exists with different parameters:\n {...}"))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "jobs.infer: error: run r1 exists with different parameters: {...}\n"
    in_task = RayTaskError("plan_rows", "Traceback (most recent call last):\n  ...\n", InfraError("storage gone"))
    fails_with(in_task.as_instanceof_cause())
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "jobs.infer: error: storage gone\n"
    fails_with(ValueError("a bug"))  # a builtin error is a bug, not a usage error
    with pytest.raises(ValueError, match="a bug"):
        cli.main(argv)
