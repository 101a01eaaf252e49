"""jobs.train: the lr schedule and metrics log (fast), then end to end: Ray Train with two Gloo workers on CPU over tiny synthetic shapes.

Slow (each run starts Ray and a 2-worker DDP group, about 30-90 s on a loaded 2-core machine):
tiny images (128-160 px), batch 1, a handful of steps. ResNet-50 from scratch is the smallest
model the builders make; what these tests check is the plumbing (sharding, DDP, checkpoints,
resume, final model), not accuracy.
"""
import glob
import json
import os
import tempfile
import time

import fsspec
import pytest

from jobs.train.__main__ import main, parse_args, run
from jobs.train.checkpoint import MetricsLog, check_same_model
from jobs.train.loop import lr_factor
from jobs.synthetic import generate

CLASSES = ["__background__", "circle", "square", "triangle"]


@pytest.fixture
def ray4():
    """Local Ray with 4 logical CPUs (2 workers + the Train controller); started after any env set-up."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _args(data, output, max_iters, *extra):
    return parse_args([
        "--data", data, "--output", output, "--num-workers", "2", "--max-iters", str(max_iters),
        "--batch-size", "1", "--checkpoint-every", "2", "--log-every", "1", "--eval-every", "0",
        "--min-size", "128", "--max-size", "160", "--loader-workers", "0", "--seed", "0", *extra,
    ])


def _metrics(output):
    with fsspec.open(f"{output}/metrics.jsonl", "rt") as f:
        return [json.loads(line) for line in f]


def _checkpoints(output):
    fs, path = fsspec.core.url_to_fs(f"{output}/train")
    return sorted(e["name"] for e in fs.ls(path, detail=True)
                  if e["type"] == "directory" and os.path.basename(e["name"]).startswith("checkpoint_"))


@pytest.mark.slow
def test_train_local_two_workers_then_finished_run_is_not_retrained(tmp_path, ray4):
    from mrcnn.checkpoint import load_model

    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    generate(data, 10, seed=0, size="128/160", val_fraction=0.2)
    small_objects = ("--anchor-sizes", "16", "32", "64", "128", "256", "--box-batch-size-per-image", "64")
    result = run(_args(data, out, 4, *small_objects))
    assert result == {"step": 4, "model": f"{out}/model_final.pt", "skipped": False}

    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(m["start_step"] == 0 and m["loss"] > 0 for m in lines)
    # the val split exists: the final step carries COCO AP from rank 0's evaluation
    assert 0.0 <= lines[-1]["segm_AP50"] <= 1.0 and 0.0 <= lines[-1]["bbox_AP"] <= 1.0
    assert "segm_AP" not in lines[0]
    ckpts = _checkpoints(out)
    assert len(ckpts) == 2  # steps 2 and 4 (num_to_keep=2)
    for c in ckpts:
        assert {"model.pt", "train_state.pt", "meta.json"} <= set(os.listdir(c))
    with open(os.path.join(ckpts[-1], "meta.json")) as f:
        assert json.load(f) == {"step": 4, "class_names": CLASSES}

    model = load_model(result["model"])
    assert model.class_names == CLASSES
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.checkpoint_metadata["extra"]["step"] == 4
    assert model.transform.min_size == (128,)
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64

    # the same command again: nothing retrained, no new metrics
    t0 = time.perf_counter()
    again = run(_args(data, out, 4, *small_objects))
    assert again["skipped"] is True and again["step"] == 4
    assert time.perf_counter() - t0 < 10
    assert _metrics(out) == lines
    assert _checkpoints(out) == ckpts


@pytest.mark.slow
def test_train_from_s3_to_s3(s3_bucket, ray4):
    from mrcnn.checkpoint import load_model

    data, out = f"s3://{s3_bucket}/shapes", f"s3://{s3_bucket}/runs/shapes"
    generate(data, 6, seed=1, size="128/160")
    # the shipped model's architecture: no layer4, four FPN levels
    result = run(_args(data, out, 2, "--arch", "resnet18_fpn_small", "--returned-layers", "1", "2", "3",
                             "--anchor-sizes", "16", "32", "64", "128"))
    assert result["step"] == 2 and result["model"] == f"{out}/model_final.pt"

    assert [m["step"] for m in _metrics(out)] == [1, 2]
    ckpts = _checkpoints(out)
    assert len(ckpts) == 1
    fs = fsspec.filesystem("s3")
    assert {"model.pt", "train_state.pt", "meta.json"} <= {os.path.basename(p) for p in fs.ls(ckpts[0])}
    model = load_model(result["model"])
    assert model.class_names == CLASSES and model.architecture == "maskrcnn_resnet18_fpn_small"
    assert not hasattr(model.backbone.body, "layer4") and model.rpn.anchor_generator.sizes[-1] == (128,)


def _checkpoint_copies():
    """Local copies of Ray Train checkpoints (Checkpoint.to_directory's temporary folders)."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "checkpoint_tmp_*")))


@pytest.mark.slow
def test_lost_worker_resumes_from_last_checkpoint(tmp_path, ray4):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    generate(data, 8, seed=2, size="128/160")
    copies_before = _checkpoint_copies()
    # rank 1 dies (os._exit) at step 3, once: the group restarts from the step-2 checkpoint
    result = run(_args(data, out, 6, "--fail-once-at", "3", "--max-failures", "2"))
    assert result["step"] == 6 and not result["skipped"]
    assert os.path.exists(os.path.join(out, "_fail_once_marker"))

    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    # steps 1-2 come from the first attempt; 3-6 from the attempt that resumed at step 2, not at 0
    assert [m["start_step"] for m in lines] == [0, 0, 2, 2, 2, 2]
    with open(os.path.join(_checkpoints(out)[-1], "meta.json")) as f:
        assert json.load(f)["step"] == 6
    assert _checkpoint_copies() == copies_before  # resuming read the checkpoint in place: no copy left behind


# ---------------------------------------------------------------------------------- fast checks
def test_lr_factor_matches_torch_linear_warmup_then_multistep():
    import torch

    # torchvision's reference: LinearLR warm-up chained with MultiStepLR, stepped every iteration
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    chained = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=10),
        torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 45], gamma=0.1),
    ])
    compared = 0
    for step in range(60):
        assert lr_factor(step, 10, 1e-3, [30, 45], 0.1) * 0.1 == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        compared += 1
        opt.step()
        chained.step()
    assert compared == 60


def test_metrics_log_drops_steps_after_the_resumed_checkpoint(tmp_path):
    uri = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(uri, start_step=0)
    for step in (1, 2, 3, 4):
        log.log({"step": step, "start_step": 0})
    # a restart from the step-2 checkpoint redoes steps 3-4: their old lines go
    resumed = MetricsLog(uri, start_step=2)
    resumed.log({"step": 3, "start_step": 2})
    assert [(m["step"], m["start_step"]) for m in _metrics(str(tmp_path))] == [(1, 0), (2, 0), (3, 2)]


def test_bad_arguments_are_named(capsys):
    for argv, message in ((["--num-workers", "0"], "--num-workers must be >= 1"),
                          (["--lr-steps", "50", "10"], "--lr-steps must be increasing"),
                          (["--trainable-backbone-layers", "6"], "--trainable-backbone-layers must be in 0..5"),
                          (["--weights", "a.pt", "--weights-backbone", "b.pt"], "not both"),
                          (["--anchor-sizes", "16", "32"], "one size per FPN level (5), got 2"),
                          (["--returned-layers", "1", "2", "3", "--anchor-sizes", "16", "32", "64", "128", "256"],
                           "one size per FPN level (4), got 5"),
                          (["--returned-layers", "0", "1"], "--returned-layers: returned_layers should be distinct"),
                          (["--box-batch-size-per-image", "0"], "--box-batch-size-per-image must be >= 1")):
        with pytest.raises(SystemExit):
            parse_args(["--data", "d", "--output", "o", *argv])
        assert message in capsys.readouterr().err


def test_missing_dataset_fails_before_starting_ray(tmp_path):
    with pytest.raises(FileNotFoundError, match="no COCO annotation file"):
        run(parse_args(["--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "run")]))


def test_resuming_with_other_model_flags_is_refused(tmp_path, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    generate(data, 2, seed=0, size="128/160")
    args = _args(data, out, 4, "--arch", "resnet18_fpn_small")
    check_same_model(args)  # a new run records its model flags
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["arch"] == "resnet18_fpn_small"
    check_same_model(_args(data, out, 8, "--arch", "resnet18_fpn_small", "--lr", "0.1"))  # continuing is fine
    # a finished run re-submitted with another model: named, before Ray starts
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump({"step": 4, "model": "m.pt"}, f)
    argv = ["--data", data, "--output", out, "--max-iters", "4", "--arch", "resnet50_fpn", "--min-size", "128",
            "--max-size", "160"]
    with pytest.raises(SystemExit, match=r"holds a run of another model: --arch resnet18_fpn_small \(now resnet50_fpn\)"):
        main(argv)
