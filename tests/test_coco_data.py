"""COCO reader: polygon/RLE/crowd parsing, label mapping, flips, DDP sharding, S3 reads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from jobs import coco_data, synthetic

H, W = 30, 40


def _write_dataset(root):
    """A hand-made COCO file whose masks are known: category ids 7 ('b') and 3 ('a')."""
    (root / "imgs").mkdir(parents=True)
    for name in ("one.png", "two.png", "three.png"):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "imgs" / name)
    square = np.zeros((H, W), np.uint8)
    square[5:15, 10:20] = 1  # polygon (10,5)-(20,15) covers exactly these pixel centres
    blob = np.zeros((H, W), np.uint8)
    blob[20:28, 2:9] = 1
    blob[22:25, 9:30] = 1
    crowd = np.zeros((H, W), np.uint8)
    crowd[0:4, 30:40] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    flat = crowd.flatten(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 100.0, "bbox": [10, 5, 10, 10],
         "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]]},
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": float(blob.sum()),
         "bbox": [float(v) for v in mask_utils.toBbox(rle)],
         "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 40.0, "bbox": [30, 0, 10, 4],
         "segmentation": {"size": [H, W], "counts": runs}},  # crowd: uncompressed RLE
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 0.0, "bbox": [3, 3, 0, 5],
         "segmentation": [[3, 3, 3, 3, 3, 8]]},  # degenerate box: removed
        {"id": 5, "image_id": 2, "category_id": 7, "iscrowd": 0, "area": 1.0, "bbox": [1, 1, 1, 1],
         "segmentation": [[1, 1, 2, 1, 2, 2, 1, 2]]},  # only a <=1 px box: image 2 unusable for training
    ]
    doc = {
        "images": [{"id": i, "file_name": f"imgs/{n}.png", "width": W, "height": H}
                   for i, n in ((1, "one"), (2, "two"), (3, "three"))],
        "annotations": anns,
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
    }
    (root / "annotations.json").write_text(json.dumps(doc))
    return square, blob


def test_polygon_rle_and_crowd_targets(tmp_path):
    square, blob = _write_dataset(tmp_path)
    ds = coco_data.CocoDetection(str(tmp_path))
    assert ds.class_names == ["__background__", "a", "b"] and ds.num_classes == 3
    assert ds.category_ids == [3, 7]
    assert ds.ids == [1]  # image 2 has only a 1-px box, image 3 nothing
    image, t = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 90 / 255))
    assert t["image_id"] == 1
    # Crowd and the zero-width box are gone; the polygon and the RLE remain, in file order.
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[10, 5, 20, 15], [2, 20, 30, 28]]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, H, W)
    assert (t["masks"][0].numpy() == square).all()
    assert (t["masks"][1].numpy() == blob).all()
    assert t["iscrowd"].tolist() == [0, 0] and t["area"].tolist() == [100.0, float(blob.sum())]


def test_crowd_rle_and_kept_empty_images(tmp_path):
    _write_dataset(tmp_path)
    ds = coco_data.CocoDetection(str(tmp_path / "annotations.json"), remove_images_without_annotations=False)
    assert ds.ids == [1, 2, 3]
    _, t3 = ds[2]
    assert t3["boxes"].shape == (0, 4) and t3["masks"].shape == (0, H, W) and t3["labels"].shape == (0,)
    # The crowd region's uncompressed RLE decodes to its rectangle.
    crowd = json.loads((tmp_path / "annotations.json").read_text())["annotations"][2]
    m = coco_data.segmentation_to_mask(crowd["segmentation"], H, W)
    assert m.sum() == 40 and m[0:4, 30:40].all()


def test_class_names_fix_label_order(tmp_path):
    _write_dataset(tmp_path)
    ds = coco_data.CocoDetection(str(tmp_path), class_names=["b", "a"])
    assert ds[0][1]["labels"].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"\['c'\]"):
        coco_data.CocoDetection(str(tmp_path), class_names=["a", "c"])


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation"):
        coco_data.CocoDetection(str(tmp_path))
    _write_dataset(tmp_path)
    doc = json.loads((tmp_path / "annotations.json").read_text())
    doc["images"][0]["width"] = W + 1
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="annotations say"):
        coco_data.CocoDetection(str(tmp_path))[0]
    doc["annotations"][0]["category_id"] = 99
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="category_id 99"):
        coco_data.CocoDetection(str(tmp_path))


def _mask_boxes(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_flip_moves_boxes_with_masks(tmp_path):
    synthetic.generate(str(tmp_path), 4, seed=2, size="64/96", min_objects=3, max_objects=5, crowd_prob=0)
    ds = coco_data.CocoDetection(str(tmp_path))
    n = 0
    for i in range(len(ds)):
        image, t = ds[i]
        # On this data boxes are the masks' tight boxes; they must stay so after flipping.
        assert torch.equal(t["boxes"], _mask_boxes(t["masks"]))
        fi, ft = coco_data.hflip(image, t)
        assert torch.equal(fi, image.flip(-1)) and torch.equal(ft["masks"], t["masks"].flip(-1))
        assert torch.equal(ft["boxes"], _mask_boxes(ft["masks"]))
        assert not torch.equal(ft["boxes"], t["boxes"])
        bi, bt = coco_data.hflip(fi, ft)
        assert torch.equal(bi, image) and torch.equal(bt["boxes"], t["boxes"])
        n += len(t["boxes"])
    assert n >= 12
    torch.manual_seed(0)
    flips = [not torch.equal(coco_data.RandomHorizontalFlip(0.5)(image, t)[0], image) for _ in range(40)]
    assert 5 < sum(flips) < 35


@pytest.mark.parametrize("n,world", [(10, 3), (7, 7), (2, 4), (12, 4)])
def test_shards_cover_every_item_once(n, world):
    for seed in (None, 5):
        shards = [coco_data.shard_indices(n, r, world, seed=seed) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # Another epoch reshuffles but still partitions.
    e0 = coco_data.shard_indices(n, 0, world, seed=5, epoch=0)
    e1 = coco_data.shard_indices(n, 0, world, seed=5, epoch=1)
    assert sorted(i for r in range(world) for i in coco_data.shard_indices(n, r, world, seed=5, epoch=1)) == list(range(n))
    if n >= 10:
        assert e0 != e1
    padded = [coco_data.shard_indices(n, r, world, pad=True) for r in range(world)]
    assert len({len(s) for s in padded}) == 1 and set().union(*padded) == set(range(n))
    with pytest.raises(ValueError, match="rank"):
        coco_data.shard_indices(n, world, world)


def test_shard_subsets_dataset(tmp_path):
    synthetic.generate(str(tmp_path), 5, seed=1, size="64/64", crowd_prob=0)
    ds = coco_data.CocoDetection(str(tmp_path))
    got = sorted(t["image_id"] for r in range(2) for _, t in coco_data.shard(ds, r, 2))
    assert got == sorted(ds.ids) and len(got) == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=coco_data.collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == 2 and len(targets) == 2


@pytest.mark.slow  # starts an S3 server (about 1 s here)
def test_reads_from_s3(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/shapes"
    synthetic.generate(uri, 3, seed=4, size="64/80", crowd_prob=0.5)
    synthetic.generate(str(tmp_path), 3, seed=4, size="64/80", crowd_prob=0.5)
    remote, local = coco_data.CocoDetection(uri), coco_data.CocoDetection(str(tmp_path))
    assert len(remote) == len(local) == 3
    assert remote.image_uri(0).startswith(f"s3://{s3_bucket}/shapes/images/")
    for i in range(3):
        (ri, rt), (li, lt) = remote[i], local[i]
        assert torch.equal(ri, li)
        assert all(torch.equal(rt[k], lt[k]) for k in ("boxes", "labels", "masks"))


def test_s3_dataset_in_forked_dataloader_workers(s3_bucket):
    # s3fs instances are not fork-safe: after the parent has used the filesystem, each
    # DataLoader worker must get its own (this failed in the demo's training job).
    uri = f"s3://{s3_bucket}/forked"
    synthetic.generate(uri, 4, seed=5, size="64/80")
    ds = coco_data.CocoDetection(uri)
    parent = [ds[i][0] for i in range(len(ds))]  # use the filesystem in the parent first
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=coco_data.collate_fn,
                                         multiprocessing_context="fork")
    images = [batch[0][0] for batch in loader]
    assert len(images) == len(parent) == 4
    assert all(torch.equal(a, b) for a, b in zip(images, parent))
