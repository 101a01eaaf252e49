"""Keypoint R-CNN through the product: synthetic stick figures, training targets and flips,
keypoint AP in jobs.evaluate, the batch job's ``instances.keypoints`` in Parquet (named in the
files' metadata, readable by DuckDB), skeleton overlays in jobs.render, jobs.train's checks."""
import datetime as dt
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mrcnn
from jobs import evaluate, render, synthetic
from jobs.coco_data import CocoDetection, hflip, keypoint_flip_indices
from jobs.infer import pipeline, schema
from jobs.infer.commit import protocol
from jobs.infer.output import Output

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
META = dict(source_etag=None, source_size=None, model_name="test", checkpoint_sha256="0" * 64, run_id="r1")
K = len(synthetic.FIGURE_KEYPOINTS)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    synthetic.generate(str(root), 12, seed=3, size="96/128", val_fraction=0.5, kind="figures", max_objects=3)
    return root


def test_figures_are_coco_keypoint_annotations(figures):
    doc = json.loads((figures / "val" / "annotations.json").read_text())
    (cat,) = doc["categories"]
    assert cat["keypoints"] == synthetic.FIGURE_KEYPOINTS and len(cat["keypoint_sigmas"]) == K
    assert cat["skeleton"] == [[a + 1, b + 1] for a, b in synthetic.FIGURE_SKELETON]
    anns = doc["annotations"]
    assert len(anns) >= 6
    for a in anns:
        kp = np.array(a["keypoints"]).reshape(K, 3)
        x, y, w, h = a["bbox"]
        assert a["num_keypoints"] == K and (kp[:, 2] == 2).all()
        # every keypoint lies on the figure: inside its mask's box (a pixel's slack for line ends)
        assert (kp[:, 0] >= x - 1).all() and (kp[:, 0] <= x + w + 1).all()
        assert (kp[:, 1] >= y - 1).all() and (kp[:, 1] <= y + h + 1).all()
        assert kp[3, 0] <= kp[4, 0] and kp[5, 0] <= kp[6, 0]  # left is nearer the left edge



def test_figures_are_deterministic(figures, tmp_path):
    synthetic.generate(str(tmp_path), 12, seed=3, size="96/128", val_fraction=0.5, kind="figures", max_objects=3)
    assert (tmp_path / "val" / "annotations.json").read_bytes() == (figures / "val" / "annotations.json").read_bytes()
    assert (tmp_path / "images" / "000001.png").read_bytes() == (figures / "images" / "000001.png").read_bytes()


def test_targets_hold_keypoints_and_a_flip_swaps_left_and_right(figures):
    ds = CocoDetection(str(figures))
    assert ds.keypoint_names == synthetic.FIGURE_KEYPOINTS and ds.num_keypoints == K
    assert ds.keypoint_skeleton == [list(p) for p in synthetic.FIGURE_SKELETON]
    assert ds.keypoint_flip == [0, 1, 2, 4, 3, 6, 5]
    image, target = ds[0]
    kp = target["keypoints"]
    assert kp.dtype == torch.float32 and kp.shape == (len(target["boxes"]), K, 3)
    flipped_image, flipped = hflip(image, target, ds.keypoint_flip)
    w = image.shape[-1]
    fk = flipped["keypoints"]
    torch.testing.assert_close(fk[:, 3, 0], w - kp[:, 4, 0])  # the new left hand is the old right one
    torch.testing.assert_close(fk[:, 0, 0], w - kp[:, 0, 0])
    torch.testing.assert_close(fk[..., 1], kp[:, ds.keypoint_flip, 1])
    assert (fk[:, 3, 0] <= fk[:, 4, 0]).all()  # still nearer the left edge
    # COCO's person keypoints flip as torchvision's reference flips them
    assert keypoint_flip_indices(list(mrcnn.COCO_PERSON_KEYPOINT_NAMES)) == [
        0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert target["masks"].shape[0] == len(kp)  # the figures' masks are there too


def _rows_from_gt(gt, *, shift=0.0, order=None):
    """Rows repeating the GT boxes and keypoints (score 1), keypoints in ``order`` (default the GT's)."""
    order = order or list(range(K))
    rows = []
    for img in gt.dataset["images"]:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=img["id"]))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32).reshape(-1, 4)
        kps = np.array([np.array(a["keypoints"]).reshape(K, 3)[order] for a in anns], np.float32).reshape(-1, K, 3)
        kps[..., 0] += shift
        kps[..., 2] = 1.0  # the keypoint score
        result = dict(boxes=boxes, labels=[1] * len(anns), scores=[1.0] * len(anns),
                      label_names=["figure"] * len(anns), keypoints=kps)
        rows.append(schema.ok_row(result, image_uri="s3://b/" + img["file_name"], width=img["width"],
                                  height=img["height"], processed_at=T0, **META))
    return rows


def test_keypoint_ap_scores_truth_one_and_matches_keypoints_by_name(figures):
    gt = evaluate.load_gt(str(figures / "val" / "annotations.json"))
    n = len(gt.getAnnIds())
    perfect = evaluate.evaluate_predictions(gt, _rows_from_gt(gt))
    assert perfect["keypoints"]["AP"] == 1.0 and perfect["bbox"]["AP"] == 1.0
    assert list(perfect["keypoints"]) == evaluate.KEYPOINT_STAT_NAMES and "segm" not in perfect
    assert perfect["counts"]["detections_with_keypoints"] == n and n >= 6
    shifted = evaluate.evaluate_predictions(gt, _rows_from_gt(gt, shift=3.0))
    assert shifted["keypoints"]["AP"] < 0.7 and shifted["bbox"]["AP"] == 1.0
    # keypoints stored in another order are put back by name; unnamed they would be wrong
    order = [0, 2, 1, 4, 3, 6, 5]
    names = [synthetic.FIGURE_KEYPOINTS[i] for i in order]
    rows = _rows_from_gt(gt, order=order)
    assert evaluate.evaluate_predictions(gt, rows, keypoint_names=names)["keypoints"]["AP"] == 1.0
    assert evaluate.evaluate_predictions(gt, rows)["keypoints"]["AP"] < 0.5
    with pytest.raises(ValueError, match=r"GT keypoint\(s\) \['hip'\] are not among"):
        evaluate.evaluate_predictions(gt, rows, keypoint_names=[n if n != "hip" else "pelvis" for n in names])


# ---- the batch job ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keypoint_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mrcnn.keypointrcnn_resnet18_fpn_small(num_keypoints=K, min_size=96, max_size=128, box_score_thresh=0.0,
                                                  box_detections_per_img=4)
    path = tmp_path_factory.mktemp("kp") / "figures.pt"
    mrcnn.save_checkpoint(model, path, class_names=["__background__", "figure"],
                          keypoint_names=synthetic.FIGURE_KEYPOINTS, keypoint_skeleton=synthetic.FIGURE_SKELETON)
    return str(path)


def test_the_job_writes_keypoints_that_readers_and_render_use(figures, keypoint_checkpoint, tmp_path, run_in_process):
    out = tmp_path / "out"
    cfg = pipeline.JobConfig(input=str(figures / "val" / "images"), output=str(out), weights=keypoint_checkpoint,
                             images_per_shard=4, batch_size=2)
    summary, manifest = run_in_process(cfg)
    files = Output(str(out)).committed_files()
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert summary.planned == len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    for f in files:
        table = pq.read_table(f)
        schema.validate_table(table)
        kv = table.schema.metadata
        assert json.loads(kv[schema.KEYPOINT_NAMES_KEY]) == synthetic.FIGURE_KEYPOINTS
        assert json.loads(kv[schema.KEYPOINT_SKELETON_KEY]) == [list(p) for p in synthetic.FIGURE_SKELETON]
    assert manifest["keypoint_names"] == synthetic.FIGURE_KEYPOINTS
    instances = [i for r in rows for i in r["instances"]]
    assert len(instances) == 4 * 6
    assert all(i["mask_rle"] is None and i["area"] is None and len(i["keypoints"]) == K for i in instances)

    # the same keypoints as the Predictor run directly
    from jobs.infer.execute.decode import decode_image

    predictor = mrcnn.Predictor.from_checkpoint(keypoint_checkpoint, device="cpu")
    compared = 0
    for r in rows:
        with open(r["image_uri"].removeprefix("file://"), "rb") as fh:
            direct = predictor([decode_image(fh.read())])[0]
        got = np.array([[[k["x"], k["y"], k["score"]] for k in i["keypoints"]] for i in r["instances"]], np.float32)
        np.testing.assert_allclose(got, direct["keypoints"], rtol=1e-4, atol=1e-3)
        compared += len(got)
    assert compared == 24

    # DuckDB reads the nested keypoints
    import duckdb

    glob = str(out / "run_id=*" / "*.parquet")
    n, x = duckdb.sql(f"SELECT count(*), min(k.x) FROM (SELECT unnest(i.keypoints) AS k FROM "
                      f"(SELECT unnest(instances) AS i FROM read_parquet('{glob}')))").fetchall()[0]
    assert n == 24 * K and x >= 0

    # render draws the skeleton the files name, where the keypoints are
    table = render.read_latest(str(out))
    assert render.keypoint_skeleton(table) == [list(p) for p in synthetic.FIGURE_SKELETON]
    result, images = render.render_table(table, None, min_score=0.0, keep_images=True)
    assert len(images) == 6 and not result.failures
    row = table.to_pylist()[0]
    source = decode_image(open(row["image_uri"].removeprefix("file://"), "rb").read())
    changed = np.asarray(images[0]).astype(int) != source.astype(int)
    visible = [(k["x"], k["y"]) for i in row["instances"] for k in i["keypoints"] if k["score"] > 0]
    assert visible and all(changed[min(int(y), source.shape[0] - 1), min(int(x), source.shape[1] - 1)].any()
                           for x, y in visible)

    # and jobs.evaluate scores the files, keypoints named by their metadata
    metrics = evaluate.evaluate_parquet(str(figures / "val" / "annotations.json"), str(out))
    assert "keypoints" in metrics and "segm" not in metrics and metrics["counts"]["detections_with_keypoints"] == 24


def test_keypoint_tags_and_skeletons_stay_inside_small_images():
    image = np.zeros((80, 120, 3), np.uint8)
    person = {"label": 1, "label_name": "p", "score": 0.9, "bbox": [10.0, 10.0, 110.0, 70.0],
              "mask_rle": None, "area": None,
              "keypoints": [{"x": 60.0, "y": 50.0, "score": 1.0}, {"x": 100.0, "y": 50.0, "score": 2.0},
                            {"x": 30.0, "y": 60.0, "score": -1.0}]}
    edge = {"label": 2, "label_name": "a very long class name", "score": 0.8, "bbox": [112.0, 2.0, 119.0, 8.0],
            "mask_rle": None, "area": None, "keypoints": None}
    out = np.asarray(render.render_overlay(image, [person, edge], skeleton=[(0, 1), (1, 2)]))
    assert out[50, 60].any() and out[50, 100].any() and out[50, 80].any()  # the keypoints and their limb
    assert not out[60, 30].any() and not out[55, 65].any()  # a keypoint scoring <= 0 is not drawn, nor its limb
    assert out[2:8, 60:112].any()  # the right-edge tag moved left to stay inside the image


def test_jobs_train_refuses_a_keypoint_arch_without_keypoints(tmp_path):
    from jobs.train.__main__ import parse_args, run

    synthetic.generate(str(tmp_path / "shapes"), 4, seed=1, size="64/64")
    args = parse_args(["--data", str(tmp_path / "shapes"), "--output", str(tmp_path / "run"),
                       "--arch", "keypointrcnn_resnet18_fpn_small", "--max-iters", "1"])
    with pytest.raises(ValueError, match="learns keypoints, but no category .* names any"):
        run(args)
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--output", "o", "--arch", "keypointrcnn_resnet18_fpn_small",
                    "--mask-loss", "softmax"])


def test_the_keypoint_head_learns_the_figures(figures):
    """A few dozen steps on four stick-figure images (flips on): the keypoint loss falls well
    below its start, ln(56 * 56) = 8.05 for a heatmap that knows nothing."""
    from jobs.coco_data import RandomHorizontalFlip

    torch.manual_seed(0)
    ds = CocoDetection(str(figures))
    ds.transforms = RandomHorizontalFlip(0.5, keypoint_flip=ds.keypoint_flip)
    model = mrcnn.keypointrcnn_resnet18_fpn_small(num_keypoints=K, min_size=96, max_size=128,
                                                  rpn_anchor_sizes=[[16], [32], [64], [128], [256]],
                                                  rpn_post_nms_top_n_train=500, box_batch_size_per_image=128)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    samples = [ds[i] for i in range(4)]
    history = []
    for step in range(60):
        images, targets = zip(*[samples[(2 * step + j) % 4] for j in range(2)])
        losses = model(list(images), list(targets))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        history.append(losses["loss_keypoint"].item())
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert first > 7.0 and last < 0.75 * first, (first, last)
