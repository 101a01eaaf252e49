"""Decode sized to the model: large JPEGs decoded DCT-downscaled, results mapped back to full size."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from pycocotools import mask as mask_util

from jobs.infer import pipeline, schema
from jobs.infer.__main__ import parse_args
from jobs.infer.output import Output
from jobs.infer.execute.decode import (DecodeError, decode_for_model, decode_image, decode_jpegs_on_device,
                                       draft_request, inspect_jpeg)
from jobs.infer.execute.stages import PredictorActor, decode_batch, plan_batch
from jobs.synthetic import render_image
from mrcnn.predictor import Predictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "models", "shapes_r18_fpn3.pt")
SHIPPED_INPUT = (160, 240)  # the shipped model's (min_size, max_size)


def _jpeg(arr, **save):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def _smooth(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (w + h))], -1).astype(np.uint8)


def test_draft_request_is_what_the_model_resizes_to_when_at_most_half():
    # 12 MP for a COCO model: short side 3024 -> 800, so at least 1067 x 800 is decoded
    assert draft_request((4032, 3024), (800, 1333)) == (1067, 800)
    assert draft_request((1000, 800), (800, 1333)) is None  # the model would upscale: nothing to gain
    assert draft_request((1500, 1000), (800, 1333)) is None  # less than 2x the model's input
    assert draft_request((640, 480), SHIPPED_INPUT) == (214, 160)
    assert draft_request((5000, 500), (800, 1333)) == (1333, 134)  # the long side binds


def test_large_jpeg_decodes_downscaled_with_its_full_size():
    full = _smooth(1200, 1600)
    data = _jpeg(full)
    rgb, size = decode_for_model(data, SHIPPED_INPUT)
    assert size == (1600, 1200)
    assert rgb.shape == (300, 400, 3) and rgb.dtype == np.uint8  # 1/4: the smallest scale >= 214 x 160
    want = draft_request(size, SHIPPED_INPUT)
    assert rgb.shape[1] >= want[0] and rgb.shape[0] >= want[1]
    # the same picture: the full decode shrunk by 4 differs by a few levels at most
    shrunk = np.asarray(Image.fromarray(decode_image(data)).resize((400, 300), Image.BOX), dtype=np.int16)
    assert np.abs(shrunk - rgb.astype(np.int16)).mean() < 2.0
    # None, a PNG, a small JPEG: full size
    assert decode_for_model(data, None)[0].shape == (1200, 1600, 3)
    png = io.BytesIO()
    Image.fromarray(full).save(png, format="PNG")
    assert decode_for_model(png.getvalue(), SHIPPED_INPUT)[0].shape == (1200, 1600, 3)
    assert decode_for_model(_jpeg(full[:300, :400]), SHIPPED_INPUT)[0].shape == (300, 400, 3)


def test_exif_rotation_turns_the_full_size_too():
    im = Image.fromarray(_smooth(1000, 1600))
    exif = im.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _jpeg(np.asarray(im), exif=exif)
    rgb, size = decode_for_model(data, SHIPPED_INPUT)
    assert decode_image(data).shape == (1600, 1000, 3)
    assert size == (1000, 1600) and rgb.shape == (400, 250, 3)


def test_limits_are_checked_on_the_full_size():
    data = _jpeg(_smooth(1200, 1600))
    with pytest.raises(DecodeError, match="exceeds the limit") as e:
        decode_for_model(data, SHIPPED_INPUT, max_pixels=1_000_000)
    assert e.value.kind == "limit"


def _scene(seed, h, w):
    return render_image(np.random.default_rng([seed, 0]), h, w, min_objects=3, max_objects=5)[0]


def test_predictor_maps_results_of_a_smaller_decode_to_the_full_size():
    predictor = Predictor.from_checkpoint(WEIGHTS)
    img = _scene(1, 256, 320)
    (small,) = predictor([img])
    (mapped,) = predictor([img], output_sizes=[(768, 960)])  # as if decoded at 1/3
    assert len(small["boxes"]) == len(mapped["boxes"]) >= 3
    assert np.array_equal(mapped["boxes"], small["boxes"] * np.float32(3))
    assert np.array_equal(mapped["scores"], small["scores"]) and np.array_equal(mapped["labels"], small["labels"])
    assert all(m["size"] == [768, 960] for m in mapped["masks"])
    assert np.array_equal(mapped["areas"], mask_util.area([{"size": m["size"], "counts": m["counts"].encode()}
                                                            for m in mapped["masks"]]))
    ratio = mapped["areas"].sum() / small["areas"].sum()
    assert 8.0 < ratio < 10.0  # 3 x 3 the pixels
    with pytest.raises(ValueError, match="one positive"):
        predictor([img], output_sizes=[(768, 960), (1, 1)])


def _box_iou(a, b):
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _rows(batch_images, **decode_kw):
    uris = [f"mem://{i}.jpg" for i in range(len(batch_images))]
    actor = PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r", micro_batch=2)
    store = dict(zip(uris, batch_images))
    from jobs.infer.execute import stages

    original = stages.read_object
    stages.read_object = lambda uri, retry=None: store[uri]
    try:
        decoded = decode_batch(plan_batch(uris), **decode_kw)
    finally:
        stages.read_object = original
    return decoded, actor(decoded).to_pylist()


def test_sized_decode_finds_what_the_full_decode_finds():
    # 960 x 768 JPEG scenes for a model that resizes them to 200 x 160: decoded at 1/4 (240 x 192).
    images = [_jpeg(_scene(seed, 768, 960)) for seed in range(4)]
    decoded, sized = _rows(images, model_input=SHIPPED_INPUT)
    assert [im.shape for im in decoded["image"]] == [(192, 240, 3)] * 4
    _, full = _rows(images, model_input=None)
    ious, mask_ious, compared = [], [], 0
    for s, f in zip(sized, full):
        assert s["status"] == f["status"] == "ok" and (s["width"], s["height"]) == (f["width"], f["height"]) == (960, 768)
        sb = np.array([i["bbox"] for i in s["instances"] if i["score"] > 0.5], np.float32).reshape(-1, 4)
        fb = np.array([i["bbox"] for i in f["instances"] if i["score"] > 0.5], np.float32).reshape(-1, 4)
        assert len(fb) >= 3 and abs(len(sb) - len(fb)) <= 1
        iou = _box_iou(fb, sb)
        best = iou.argmax(1)
        ious += list(iou.max(1))
        for k, j in enumerate(best):
            fm = [i for i in f["instances"] if i["score"] > 0.5][k]["mask_rle"]
            sm = [i for i in s["instances"] if i["score"] > 0.5][j]["mask_rle"]
            rle = lambda counts: {"size": [768, 960], "counts": counts.encode()}  # noqa: E731
            mask_ious.append(float(mask_util.iou([rle(sm)], [rle(fm)], [0])[0, 0]))
            compared += 1
    assert compared >= 12
    print(f"{compared} detections: median box IoU {np.median(ious):.3f}, mask IoU {np.median(mask_ious):.3f}")
    assert np.median(ious) > 0.9 and np.median(mask_ious) > 0.9


def test_the_decode_mode_is_an_output_setting(tmp_path, run_in_process):
    assert json.loads(schema.settings_key(decode="full")) == {"decode": "full"}
    assert schema.settings_key(decode="sized") is None
    assert parse_args(["--input", "x", "--output", "y", "--weights", "z", "--decode", "full"]).decode == "full"
    inp = tmp_path / "in"
    inp.mkdir()
    for seed in range(2):
        (inp / f"{seed}.jpg").write_bytes(_jpeg(_scene(seed, 512, 640)))
    out = tmp_path / "out"

    def run(**kw):
        cfg = pipeline.JobConfig(input=str(inp), output=str(out), weights=WEIGHTS, batch_size=2, **kw)
        summary, _ = run_in_process(cfg)
        rows = [r for f in Output(str(out)).committed_files() for r in pq.read_table(f).to_pylist()
                if r["run_id"] == summary.run_id]
        return summary, rows

    s1, rows1 = run()
    assert s1.planned == 2 and {r["settings"] for r in rows1} == {None}
    assert {(r["width"], r["height"]) for r in rows1} == {(640, 512)}
    s2, rows2 = run(decode="full")  # another result for every image: all planned again
    assert s2.planned == 2 and {r["settings"] for r in rows2} == {'{"decode": "full"}'}
    assert {(r["width"], r["height"]) for r in rows2} == {(640, 512)}
    assert run(decode="full")[0].planned == 0


# ---------------------------------------------------------------- --decode device

def test_jpegs_decoded_by_the_actor_give_the_rows_of_the_cpu_decode(tmp_path):
    # decode_jpeg(device="cpu") is the code path of nvJPEG on a GPU actor.
    scene = _scene(3, 240, 320)
    im = Image.fromarray(scene)
    exif = im.getexif()
    exif[0x0112] = 6
    files = {"plain.jpg": _jpeg(scene), "turned.jpg": _jpeg(scene, exif=exif),
             "cmyk.jpg": _jpeg_cmyk(scene), "truncated.jpg": _jpeg(scene)[:3000]}
    png = io.BytesIO()
    im.save(png, format="PNG")
    files["scene.png"] = png.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in files]
    on_device = decode_batch(plan_batch(uris), jpeg_on_device=True)
    # CMYK, PNG, and the truncated JPEG (no end marker) are decoded here
    assert [len(b) > 0 for b in on_device["jpeg"]] == [True, True, False, False, False]
    assert [im.shape[0] for im in on_device["image"]] == [0, 0, 240, 0, 240]
    assert list(zip(on_device["width"], on_device["height"]))[:2] == [(320, 240), (240, 320)]
    actor = PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r", micro_batch=2,
                           settings=schema.settings_key(decode="device"))
    device_rows = actor(on_device).to_pylist()
    assert actor.jpeg_fallbacks == 0  # both JPEGs sent to the actor were decoded by decode_jpeg
    cpu_rows = actor(decode_batch(plan_batch(uris))).to_pylist()
    assert [r["status"] for r in device_rows] == ["ok", "ok", "ok", "error", "ok"]
    bad = device_rows[3]
    assert bad["error_kind"] == "decode" and "truncated" in bad["error"]
    assert bad["error"] == cpu_rows[3]["error"]  # the CPU decoder's reason
    assert {r["settings"] for r in device_rows} == {'{"decode": "device"}'}
    compared = 0
    for d, c in zip(device_rows, cpu_rows):
        if d["status"] != "ok":
            continue
        assert (d["width"], d["height"]) == (c["width"], c["height"])
        assert [i["mask_rle"] for i in d["instances"]] == [i["mask_rle"] for i in c["instances"]]
        assert [i["bbox"] for i in d["instances"]] == [i["bbox"] for i in c["instances"]]
        compared += len(d["instances"])
    assert compared >= 8


def _jpeg_cmyk(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_device_decode_through_the_job(tmp_path, run_in_process):
    inp = tmp_path / "in"
    inp.mkdir()
    for seed in range(3):
        (inp / f"{seed}.jpg").write_bytes(_jpeg(_scene(seed, 240, 320)))
    cfg = pipeline.JobConfig(input=str(inp), output=str(tmp_path / "out"), weights=WEIGHTS, batch_size=2,
                             decode="device")
    summary, _ = run_in_process(cfg)
    rows = [r for f in Output(str(tmp_path / "out")).committed_files() for r in pq.read_table(f).to_pylist()]
    assert summary.planned == 3 and [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["instances"] for r in rows) and {r["settings"] for r in rows} == {'{"decode": "device"}'}
    with pytest.raises(SystemExit):
        parse_args(["--input", "x", "--output", "y", "--weights", "z", "--decode", "gpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_nvjpeg_on_a_gpu_actor_finds_what_the_cpu_decode_finds(tmp_path):
    scenes = [_scene(seed, 480, 640) for seed in range(4)]
    uris = []
    for k, scene in enumerate(scenes):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg(scene))
        uris.append(str(tmp_path / f"{k}.jpg"))
    (tmp_path / "cut.jpg").write_bytes(_jpeg(scenes[0])[:5000])
    uris.append(str(tmp_path / "cut.jpg"))
    actor = PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r", micro_batch=2,
                           device="cuda", precision="fp32", settings=schema.settings_key(decode="device"))
    gpu = actor(decode_batch(plan_batch(uris), jpeg_on_device=True)).to_pylist()
    cpu = actor(decode_batch(plan_batch(uris), model_input=None)).to_pylist()
    assert [r["status"] for r in gpu] == ["ok"] * 4 + ["error"] and gpu[4]["error"] == cpu[4]["error"]
    ious = []
    for g, c in zip(gpu[:4], cpu[:4]):
        gb = np.array([i["bbox"] for i in g["instances"] if i["score"] > 0.5]).reshape(-1, 4)
        cb = np.array([i["bbox"] for i in c["instances"] if i["score"] > 0.5]).reshape(-1, 4)
        assert len(cb) >= 2 and abs(len(gb) - len(cb)) <= 1
        ious += list(_box_iou(cb, gb).max(1))
    assert len(ious) >= 8 and np.median(ious) > 0.95


def _with_orientation(arr, orientation):
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    return _jpeg(arr, exif=exif)


@pytest.fixture
def decoder_without_orientation(monkeypatch):
    """decode_jpeg as on CUDA, where nvJPEG ignores apply_exif_orientation."""
    real = torchvision.io.decode_jpeg

    def like_nvjpeg(x, **kw):
        return real(x, **{**kw, "apply_exif_orientation": False})

    monkeypatch.setattr(torchvision.io, "decode_jpeg", like_nvjpeg)


def test_every_exif_orientation_decoded_on_the_device_gives_the_rows_of_the_cpu_decode(
        tmp_path, decoder_without_orientation):
    scene = _scene(5, 240, 320)  # landscape, shapes at random places: every turn changes the rows
    uris = []
    for o in range(1, 9):
        (tmp_path / f"o{o}.jpg").write_bytes(_with_orientation(scene, o))
        uris.append(str(tmp_path / f"o{o}.jpg"))
    datas = [open(u, "rb").read() for u in uris]
    # pixels: what Pillow's exif_transpose shows
    sizes = [inspect_jpeg(d)[::-1] for d in datas]
    assert sizes == [(240, 320)] * 4 + [(320, 240)] * 4
    for o, data, img in zip(range(1, 9), datas, decode_jpegs_on_device(datas, sizes, torch.device("cpu"))):
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert isinstance(img, torch.Tensor) and np.array_equal(img.permute(1, 2, 0).numpy(), want), o
    # rows: those of --decode full, with no image left to Pillow in the actor
    on_device = decode_batch(plan_batch(uris), jpeg_on_device=True)
    assert all(len(b) > 0 for b in on_device["jpeg"])
    actor = PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r", micro_batch=4,
                           settings=schema.settings_key(decode="device"))
    device_rows = actor(on_device).to_pylist()
    assert actor.jpeg_fallbacks == 0
    cpu_rows = actor(decode_batch(plan_batch(uris))).to_pylist()
    compared = 0
    for d, c in zip(device_rows, cpu_rows):
        assert d["status"] == c["status"] == "ok" and d["instances"]
        assert (d["width"], d["height"]) == (c["width"], c["height"])
        assert [i["mask_rle"] for i in d["instances"]] == [i["mask_rle"] for i in c["instances"]]
        assert [i["bbox"] for i in d["instances"]] == [i["bbox"] for i in c["instances"]]
        compared += 1
    assert compared == 8
    assert len({json.dumps([i["bbox"] for i in r["instances"]]) for r in device_rows}) == 8  # all turned apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_nvjpeg_turns_every_exif_orientation():
    scene = _scene(5, 240, 320)
    datas = [_with_orientation(scene, o) for o in range(1, 9)]
    shown = [np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(d))).convert("RGB"), np.float32) for d in datas]
    out = decode_jpegs_on_device(datas, [s.shape[:2] for s in shown], torch.device("cuda"))
    for o, img in zip(range(1, 9), out):
        assert isinstance(img, torch.Tensor) and img.is_cuda, o
        got = img.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        # nvJPEG's pixels differ from libjpeg's by a level here and there: the nearest turn is right
        dist = {k: np.abs(got - s).mean() for k, s in zip(range(1, 9), shown) if s.shape == got.shape}
        assert min(dist, key=dist.get) == o, (o, dist)


def test_a_truncated_jpeg_is_an_error_row_on_the_device_path_too(tmp_path):
    full = _jpeg(_scene(3, 240, 320))
    # an EOI in a segment before the scan (an EXIF thumbnail's, here a comment's) does not count
    comment = b"thumbnail \xff\xd8 ... \xff\xd9"
    with_eoi_before_scan = full[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + full[2:]
    files = {
        "cut.jpg": full[:3000],
        "cut_zero_padded.jpg": full[:3000] + bytes(4096),
        "cut_after_a_comment.jpg": with_eoi_before_scan[:3000],
        "no_eoi_zero_padded.jpg": full[:-2] + bytes(100),  # all the scan: Pillow decodes it
        "zero_padded.jpg": full + bytes(100),
        "trailer.jpg": full + b"ftypmp42" * 64,  # a phone's motion photo appends its video
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in files]
    on_device = decode_batch(plan_batch(uris), jpeg_on_device=True)
    assert [len(b) > 0 for b in on_device["jpeg"]] == [False] * 4 + [True] * 2
    actor = PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r", micro_batch=4,
                           settings=schema.settings_key(decode="device"))
    device_rows = actor(on_device).to_pylist()
    full_rows = actor(decode_batch(plan_batch(uris), model_input=None)).to_pylist()
    assert actor.jpeg_fallbacks == 0
    assert [r["status"] for r in device_rows] == ["error"] * 3 + ["ok"] * 3
    for d, f in zip(device_rows, full_rows):
        assert (d["status"], d["error"], d["error_kind"]) == (f["status"], f["error"], f["error_kind"])
        assert [i["bbox"] for i in d["instances"] or []] == [i["bbox"] for i in f["instances"] or []]
    assert all("truncated" in r["error"] and r["error_kind"] == "decode" for r in device_rows[:3])


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_pillow(tmp_path, monkeypatch):
    datas = [_with_orientation(_scene(seed, 240, 320), 6) for seed in range(3)]
    uris = []
    for k, data in enumerate(datas):
        (tmp_path / f"{k}.jpg").write_bytes(data)
        uris.append(str(tmp_path / f"{k}.jpg"))
    real = torchvision.io.decode_jpeg

    def refuses_the_second(x, **kw):
        if isinstance(x, list) or torch.equal(x, torch.frombuffer(bytearray(datas[1]), dtype=torch.uint8)):
            raise RuntimeError("nvjpeg says no")
        return real(x, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_the_second)
    out = decode_jpegs_on_device(datas, [(320, 240)] * 3, torch.device("cpu"))
    assert [type(x) for x in out] == [torch.Tensor, np.ndarray, torch.Tensor]
    for img, data in zip(out, datas):
        pixels = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img
        assert np.array_equal(pixels, decode_image(data))
    actor = PredictorActor(WEIGHTS, model_name="m", checkpoint_sha256="0" * 64, run_id="r", micro_batch=4,
                           settings=schema.settings_key(decode="device"))
    device_rows = actor(decode_batch(plan_batch(uris), jpeg_on_device=True)).to_pylist()
    assert actor.jpeg_fallbacks == 1
    cpu_rows = actor(decode_batch(plan_batch(uris))).to_pylist()
    assert [r["status"] for r in device_rows] == ["ok"] * 3
    assert [[i["bbox"] for i in r["instances"]] for r in device_rows] == \
        [[i["bbox"] for i in r["instances"]] for r in cpu_rows]
