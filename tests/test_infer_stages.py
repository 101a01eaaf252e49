"""jobs.infer.execute.stages without Ray: decode errors become error rows, ok rows equal the Predictor."""


import numpy as np
import pytest
import torch
from PIL import Image

from jobs.infer import schema
from jobs.infer.execute.stages import PredictorActor, decode_batch


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import mrcnn
    from mrcnn.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=3, min_size=64, max_size=96, box_detections_per_img=20)
    path = str(tmp_path_factory.mktemp("w") / "tiny.pt")
    save_checkpoint(model, path, class_names=["__background__", "a", "b"])
    return path


def test_stages_do_not_import_ray():
    # The GPU test machine has no Ray: the batch functions must not need it.
    import subprocess
    import sys

    code = "import sys, jobs.infer.execute.stages, jobs.infer.pipeline; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])


def test_decode_batch_and_actor_rows(tmp_path, weights):
    rng = np.random.default_rng(0)
    good = []
    for i, (h, w) in enumerate([(64, 80), (72, 64)]):
        p = tmp_path / f"g{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        good.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"")
    uris = good + [str(tmp_path / "bad.jpg"), str(tmp_path / "missing.jpg")]
    batch = {
        "image_uri": np.array(uris, dtype=object),
        "source_etag": np.array(["e0", None, "e2", None], dtype=object),
        "source_size": np.array([10, -1, 0, -1]),
        "error": np.array([None, None, None, "source not found: missing.jpg"], dtype=object),
        "error_kind": np.array([None, None, None, "not_found"], dtype=object),
        "shard_id": np.array(["s1", "s1", "s2", "s2"], dtype=object),
    }
    decoded = decode_batch(batch)
    assert list(decoded["decode_error"][:2]) == ["", ""]
    assert "empty file" in decoded["decode_error"][2] and "source not found" in decoded["decode_error"][3]
    assert list(decoded["error_kind"]) == ["", "", "decode", "not_found"]

    actor = PredictorActor(weights, model_name="m", checkpoint_sha256="c" * 64, run_id="r1", micro_batch=1)
    table = actor(decoded)
    assert table.num_rows == 4 and table.column("shard_id").to_pylist() == ["s1", "s1", "s2", "s2"]
    out = table.drop_columns(["shard_id"])
    schema.validate_table(out)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert [r["error_kind"] for r in rows] == [None, None, "decode", "not_found"]
    assert (rows[0]["source_etag"], rows[0]["source_size"], rows[1]["source_etag"], rows[1]["source_size"]) == ("e0", 10, None, None)
    direct = [actor.predictor([decoded["image"][i]])[0] for i in range(2)]
    compared = 0
    for r, d in zip(rows[:2], direct):
        assert [i["label"] for i in r["instances"]] == d["labels"].tolist()
        assert [i["mask_rle"] for i in r["instances"]] == [m["counts"] for m in d["masks"]]
        np.testing.assert_allclose([i["score"] for i in r["instances"]], d["scores"], rtol=1e-6)
        compared += len(d["labels"])
    assert compared > 0


def test_decode_batch_reads_items_whose_stat_failed_in_storage(tmp_path):
    """A list-file entry whose stat failed in the store (not a missing object) gets a read of
    its own; a permanent stat error is the row's error as it is."""
    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    batch = {
        "image_uri": np.array([str(p), str(p)], dtype=object),
        "source_etag": np.array([None, None], dtype=object),
        "source_size": np.array([-1, -1]),
        "error": np.array(["cannot stat source: OSError: SlowDown", "not a file: x"], dtype=object),
        "error_kind": np.array(["unavailable", "not_found"], dtype=object),
        "shard_id": np.array(["s", "s"], dtype=object),
    }
    decoded = decode_batch(batch)
    assert list(decoded["decode_error"]) == ["", "not a file: x"]
    assert list(decoded["error_kind"]) == ["", "not_found"] and decoded["image"][0].shape == (8, 8, 3)


def _decoded(images):
    n = len(images)
    return {"image_uri": np.array([f"mem://{i}" for i in range(n)], dtype=object),
            "source_etag": np.array([None] * n, dtype=object), "source_size": np.array([-1] * n),
            "shard_id": np.array(["s"] * n, dtype=object), "decode_error": np.array([""] * n),
            "error_kind": np.array([""] * n), "image": np.array(images + [None], dtype=object)[:n]}


def _images(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64 + 8 * (i % 3), 80, 3), dtype=np.uint8) for i in range(n)]


def test_overlapped_batches_give_the_same_results_with_host_work_in_a_worker(weights, monkeypatch):
    import threading

    from mrcnn.predictor import Predictor

    predictor = Predictor.from_checkpoint(weights, device="cpu", score_thresh=0.0)
    images = _images(7)
    batches = [(images[i : i + 3], None) for i in range(0, 7, 3)]
    sequential = list(predictor.predict_batches(batches, overlap=False))
    threads = []
    original = Predictor._finish

    def recording(self, *args):
        threads.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(Predictor, "_finish", recording)
    overlapped = list(predictor.predict_batches(iter(batches), overlap=True))
    assert len(threads) == 7 and all(t.startswith("mrcnn-finish") for t in threads)
    assert [len(b) for b in overlapped] == [3, 3, 1]
    compared = 0
    for seq, ovl in zip(sequential, overlapped):
        for a, b in zip(seq, ovl):
            assert np.array_equal(a["boxes"], b["boxes"]) and np.array_equal(a["scores"], b["scores"])
            assert [m["counts"] for m in a["masks"]] == [m["counts"] for m in b["masks"]]
            compared += len(a["boxes"])
    assert compared > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_an_image_the_model_fails_on_is_one_error_row(weights, monkeypatch, overlap):
    from mrcnn.predictor import Predictor

    actor = PredictorActor(weights, model_name="m", checkpoint_sha256="c" * 64, run_id="r1", micro_batch=3)
    original_start = Predictor._start

    def failing_on_width_81(self, images, output_sizes):
        if any(img.shape[-1] == 81 for img in images):
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return original_start(self, images, output_sizes)

    monkeypatch.setattr(Predictor, "_start", failing_on_width_81)
    actor.overlap = overlap
    images = _images(5)
    images[1] = np.zeros((64, 81, 3), np.uint8)
    rows = actor(_decoded(images)).drop_columns(["shard_id"]).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok", "ok"]
    bad = rows[1]
    assert bad["error_kind"] == "model" and (bad["width"], bad["height"]) == (81, 64)
    assert bad["error"] == "model failed: RuntimeError: CUDA out of memory (simulated) second line"
