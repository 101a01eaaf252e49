"""The synthetic shapes dataset: deterministic bytes, exact visible masks, overlaps, S3 output."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs import synthetic

SMALL = dict(size="64/96", min_objects=3, max_objects=6)


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _coco(path):
    coco = COCO()
    coco.dataset = json.load(open(path))
    coco.createIndex()
    return coco


def test_same_seed_same_bytes(tmp_path):
    synthetic.generate(str(tmp_path / "a"), 6, seed=7, val_fraction=0.34, **SMALL)
    synthetic.generate(str(tmp_path / "b"), 6, seed=7, val_fraction=0.34, **SMALL)
    synthetic.generate(str(tmp_path / "c"), 6, seed=8, val_fraction=0.34, **SMALL)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    # 2 annotation files + 6 images, identical byte for byte; another seed differs.
    assert len(a) == 8 and sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a)
    assert a["annotations.json"] != c["annotations.json"]


def test_layout_and_splits(tmp_path):
    summary = synthetic.generate(str(tmp_path), 10, seed=1, val_fraction=0.2, **SMALL)
    assert summary["train"]["images"] == 8 and summary["val"]["images"] == 2
    train, val = _coco(tmp_path / "annotations.json"), _coco(tmp_path / "val" / "annotations.json")
    assert {c["name"]: c["id"] for c in train.dataset["categories"]} == {"circle": 1, "square": 2, "triangle": 3}
    assert not set(train.getImgIds()) & set(val.getImgIds())
    assert not set(train.getAnnIds()) & set(val.getAnnIds())
    for root, coco in ((tmp_path, train), (tmp_path / "val", val)):
        for img in coco.dataset["images"]:
            with Image.open(root / img["file_name"]) as im:  # names resolve from the json's folder
                assert im.size == (img["width"], img["height"])
                assert 64 <= im.width <= 96 and 64 <= im.height <= 96
    with pytest.raises(FileExistsError):
        synthetic.generate(str(tmp_path), 2, seed=1, **SMALL)


def _dilate(m):
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    return d


def test_masks_are_the_painted_pixels(tmp_path):
    synthetic.generate(str(tmp_path), 16, seed=3, val_fraction=0.25, crowd_prob=0.5, **SMALL)
    checked = {"polygon": 0, "rle": 0, "crowd": 0}
    touching_pairs = 0
    for root in (tmp_path, tmp_path / "val"):
        coco = _coco(root / "annotations.json")
        for img in coco.dataset["images"]:
            pixels = np.asarray(Image.open(root / img["file_name"]).convert("RGB"))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=None))
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            union = np.zeros(pixels.shape[:2], int)
            for a, m in zip(anns, masks):
                union += m
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                assert a["area"] == m.sum() > 0
                np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle))
                colours = np.unique(pixels[m], axis=0)
                if a["iscrowd"]:
                    assert isinstance(a["segmentation"]["counts"], list)  # COCO's uncompressed crowd RLE
                    assert 1 <= len(colours) <= 8
                    checked["crowd"] += 1
                    continue
                # A flat-coloured object: every mask pixel has its colour ...
                assert len(colours) == 1, f"annotation {a['id']} covers {len(colours)} colours"
                # ... and no pixel next to the mask (outside other objects) has it: nothing left out.
                others = np.zeros_like(m)
                for b, mb in zip(anns, masks):
                    if b is not a:
                        others |= mb
                ring = _dilate(m) & ~m & ~others
                assert not (pixels[ring] == colours[0]).all(axis=1).any(), f"annotation {a['id']} misses pixels"
                checked["polygon" if isinstance(a["segmentation"], list) else "rle"] += 1
            # Visible masks never overlap; objects that overlapped touch each other.
            assert union.max() <= 1
            plain = [m for a, m in zip(anns, masks) if not a["iscrowd"]]
            touching_pairs += sum(bool((_dilate(p) & q).any()) for i, p in enumerate(plain) for q in plain[i + 1:])
    assert checked["polygon"] >= 10 and checked["rle"] >= 10 and checked["crowd"] >= 2, checked
    assert touching_pairs >= 5


def test_occluded_shapes_are_rle(tmp_path):
    # Squares/triangles are polygons only when nothing covers them; covered ones are RLE of what shows.
    rng = np.random.default_rng(0)
    seen_covered = 0
    for _ in range(20):
        image, objects = synthetic.render_image(rng, 80, 80, min_objects=4, max_objects=6, overlap=0.9, crowd_prob=0)
        for k, o in enumerate(objects):
            later = np.zeros((80, 80), bool)
            for o2 in objects[k + 1:]:
                later |= o2["mask"].astype(bool)
            if o["polygon"] is not None:
                full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([o["polygon"]], 80, 80)))
                assert (full == o["mask"]).all()
            elif o["category"] != "circle":
                seen_covered += 1
            assert (image[o["mask"].astype(bool)] == o["colours"][0]).all()
    assert seen_covered >= 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--size"):
        synthetic.generate(str(tmp_path), 2, size="big")
    with pytest.raises(ValueError, match="val_fraction"):
        synthetic.generate(str(tmp_path), 2, val_fraction=1.0)


@pytest.mark.slow  # starts an S3 server (about 1 s here)
def test_writes_to_s3(s3_bucket, tmp_path):
    import s3fs

    uri = f"s3://{s3_bucket}/shapes"
    summary = synthetic.generate(uri, 4, seed=5, val_fraction=0.25, image_format="jpg", **SMALL)
    assert summary["val"]["annotations"] == f"s3://{s3_bucket}/shapes/val/annotations.json"
    fs = s3fs.S3FileSystem()
    remote = {p[len(f"{s3_bucket}/shapes/"):]: fs.cat_file(p) for p in fs.find(f"{s3_bucket}/shapes")}
    synthetic.generate(str(tmp_path), 4, seed=5, val_fraction=0.25, image_format="jpg", **SMALL)
    local = _files(tmp_path)
    assert len(remote) == 6 and remote == local
    doc = json.loads(remote["val/annotations.json"])
    with Image.open(io.BytesIO(remote["val/" + doc["images"][0]["file_name"]])) as im:
        assert im.format == "JPEG"
