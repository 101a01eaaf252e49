"""COCO-format instance-segmentation data for training, read from any fsspec filesystem.

    ds = CocoDetection("s3://bucket/shapes", transforms=RandomHorizontalFlip(0.5))
    image, target = ds[0]   # image: float [3,H,W] in 0..1; target: boxes, labels, masks, ...
    ds.class_names          # ["__background__", "circle", "square", "triangle"]: index = label

The dataset root is the folder holding ``annotations.json`` (or pass the JSON's URI); image
``file_name`` entries resolve relative to that folder, as ``jobs.synthetic`` writes them.

Targets follow torchvision's detection reference (references/detection/coco_utils.py,
``ConvertCocoPolysToMask``): crowd annotations are dropped, boxes are [x0, y0, x1, y1]
clipped to the image, and boxes with no width or height are removed with their masks.
Unlike the reference, labels are contiguous 1..K (K categories, sorted by COCO category id,
or in the order of ``class_names`` when given), so the model needs K+1 classes and a
checkpoint stores ``class_names`` to map predictions back to category names. Like the
reference's training set, images without a usable annotation are skipped
(``_coco_remove_images_without_annotations``) unless ``remove_images_without_annotations=False``.

This lives in ``jobs/`` rather than ``mrcnn/``: it is storage and file-format plumbing
(fsspec, pycocotools, PIL), while the model package takes tensors and stays I/O-free.

Keypoints: when the categories name keypoints (COCO's ``keypoints`` list, as person keypoints
or ``jobs.synthetic --kind figures``), targets also hold ``keypoints`` float [G, K, 3] (x, y,
visibility; an annotation without keypoints gets zeros, i.e. not labelled), what Keypoint
R-CNN trains on, and images need a labelled keypoint to count as usable for training
(torchvision's reference asks for 10, COCO's people having 17). The horizontal flip mirrors
keypoints and swaps each ``left_*`` keypoint with its ``right_*`` one
(``RandomHorizontalFlip(p, keypoint_flip=dataset.keypoint_flip)``).

Multi-scale resizing is the model transform's job (``min_size`` tuple); the only augmentation
here is the horizontal flip.
"""

import io
import json
import os
import posixpath

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from jobs.storage import resolve


# ------------------------------------------------------------------------- annotations
def segmentation_to_rle(segm, height, width):
    """An annotation's ``segmentation`` as compressed RLE (COCO.annToRLE semantics)."""
    if isinstance(segm, list):  # polygons: one object may have several parts
        if not segm:
            return mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"segmentation must be a polygon list or an RLE dict with counts and size, got {type(segm).__name__}")
    if list(segm["size"]) != [height, width]:
        raise ValueError(f"RLE size {segm['size']} does not match the image's height, width [{height}, {width}]")
    if isinstance(segm["counts"], list):  # uncompressed RLE (COCO's crowd format)
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def segmentation_to_mask(segm, height, width):
    """An annotation's ``segmentation`` as a uint8 HxW mask (COCO.annToMask semantics)."""
    return mask_utils.decode(segmentation_to_rle(segm, height, width))


def _has_valid_annotation(anns, keypoints=False):
    # torchvision reference: an image is usable for training when some annotation
    # (crowd ones included) has a box wider and taller than one pixel (and, for keypoints,
    # has labelled keypoints)
    if not any(all(v > 1 for v in a["bbox"][2:]) for a in anns):
        return False
    return not keypoints or any(v > 0 for a in anns for v in (a.get("keypoints") or [])[2::3])


def keypoint_flip_indices(names):
    """For each keypoint, the one it becomes in a mirrored image: ``left_x`` <-> ``right_x``."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for n in names:
        for a, b in (("left_", "right_"), ("right_", "left_")):
            if n.startswith(a) and b + n[len(a):] in index:
                out.append(index[b + n[len(a):]])
                break
        else:
            out.append(index[n])
    return out


def convert_annotations(anns, height, width, category_to_label, num_keypoints=0):
    """COCO annotations of one image -> (boxes, labels, masks, area, iscrowd[, keypoints]) tensors.

    Mirrors ConvertCocoPolysToMask: drops crowd regions and boxes with no area. With
    ``num_keypoints``, ``keypoints`` [G, K, 3] too (zeros for an annotation without them).
    """
    anns = [a for a in anns if not a.get("iscrowd", 0)]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    try:
        labels = torch.tensor([category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
    except KeyError as e:
        raise ValueError(f"annotation has category_id {e.args[0]}, which is not among the dataset's categories") from None
    if anns:
        masks = np.stack([segmentation_to_mask(a["segmentation"], height, width) for a in anns])
    else:
        masks = np.zeros((0, height, width), np.uint8)
    masks = torch.from_numpy(masks)
    area = torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    target = {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "masks": masks[keep],
        "area": area[keep],
        "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
    }
    if num_keypoints:
        rows = []
        for a in anns:
            kp = a.get("keypoints") or [0.0] * (3 * num_keypoints)
            if len(kp) != 3 * num_keypoints:
                raise ValueError(f"annotation {a.get('id')} has {len(kp) // 3} keypoints, its category names {num_keypoints}")
            rows.append(kp)
        target["keypoints"] = torch.tensor(rows, dtype=torch.float32).reshape(-1, num_keypoints, 3)[keep]
    return target


# ----------------------------------------------------------------------------- dataset
class CocoDetection(torch.utils.data.Dataset):
    """Images and Mask R-CNN training targets from a COCO annotation file on any fsspec filesystem.

    Args:
        root: dataset root (folder holding annotations.json) or the annotation JSON's URI.
        images_root: folder that image file_names are relative to (default: the JSON's folder).
        transforms: callable (image, target) -> (image, target), e.g. RandomHorizontalFlip.
        class_names: fix the label order by category name (e.g. from a checkpoint); labels are
            1 + position in this list. Default: categories sorted by COCO id.
        remove_images_without_annotations: skip images with no usable box (training default).
        storage_options: passed to fsspec (e.g. s3 credentials).
    """

    def __init__(self, root, *, images_root=None, transforms=None, class_names=None,
                 remove_images_without_annotations=True, storage_options=None):
        self._root, self._storage_options = root, dict(storage_options or {})
        self._fs, path = resolve(root, self._storage_options)
        self._fs_pid = os.getpid()
        path = path.rstrip("/")
        ann_path = path if path.endswith(".json") else posixpath.join(path, "annotations.json")
        if not self.fs.exists(ann_path):
            raise FileNotFoundError(f"no COCO annotation file at {self.fs.unstrip_protocol(ann_path)}")
        with self.fs.open(ann_path, "rb") as f:
            doc = json.load(f)
        for key in ("images", "annotations", "categories"):
            if key not in doc:
                raise ValueError(f"{self.fs.unstrip_protocol(ann_path)} is not a COCO detection file: no '{key}'")
        if images_root is None:
            self.images_root = posixpath.dirname(ann_path)
        else:
            self.images_root = resolve(images_root, storage_options)[1].rstrip("/")
        self.transforms = transforms

        cats = sorted(doc["categories"], key=lambda c: c["id"])
        if class_names is None:
            order = cats
        else:
            by_name = {c["name"]: c for c in cats}
            missing = [n for n in class_names if n not in by_name]
            if missing:
                raise ValueError(f"class_names {missing} are not categories of this dataset ({sorted(by_name)})")
            order = [by_name[n] for n in class_names]
        self.category_ids = [c["id"] for c in order]  # label k (1-based) -> COCO id category_ids[k-1]
        self.class_names = ["__background__"] + [c["name"] for c in order]
        self.category_to_label = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        named = {tuple(c["keypoints"]) for c in order if c.get("keypoints")}
        if len(named) > 1:
            raise ValueError("categories name different keypoints; a keypoint model predicts one set for all")
        self.keypoint_names = list(named.pop()) if named else None  # what a keypoint model predicts
        skeletons = [c.get("skeleton") for c in order if c.get("keypoints") and c.get("skeleton")]
        # COCO's skeleton is 1-based pairs; kept 0-based, as checkpoints record it
        self.keypoint_skeleton = [[int(a) - 1, int(b) - 1] for a, b in skeletons[0]] if skeletons else None

        known = {c["id"] for c in cats}
        self.images = {img["id"]: img for img in doc["images"]}
        self.anns_by_image = {img_id: [] for img_id in self.images}
        for a in doc["annotations"]:
            if a["image_id"] not in self.anns_by_image:
                raise ValueError(f"annotation {a.get('id')} refers to image_id {a['image_id']}, which is not in 'images'")
            if a["category_id"] not in known:
                raise ValueError(f"annotation {a.get('id')} has category_id {a['category_id']}, which is not in 'categories'")
            if a["category_id"] in self.category_to_label:  # classes left out of class_names are ignored
                self.anns_by_image[a["image_id"]].append(a)
        ids = sorted(self.images)
        if remove_images_without_annotations:
            ids = [i for i in ids if _has_valid_annotation(self.anns_by_image[i], self.keypoint_names is not None)]
        self.ids = ids

    @property
    def num_keypoints(self):
        return len(self.keypoint_names) if self.keypoint_names else 0

    @property
    def keypoint_flip(self):
        """The keypoint permutation of a horizontal flip (None without keypoints)."""
        return keypoint_flip_indices(self.keypoint_names) if self.keypoint_names else None

    @property
    def num_classes(self):
        """Classes the model predicts, background included."""
        return len(self.class_names)

    def __len__(self):
        return len(self.ids)

    def image_uri(self, index):
        return self.fs.unstrip_protocol(posixpath.join(self.images_root, self.images[self.ids[index]]["file_name"]))

    @property
    def fs(self):
        """The dataset's filesystem; a new instance in each process, as fsspec filesystems
        (s3fs in particular) must not be used across fork, e.g. in DataLoader workers."""
        if self._fs_pid != os.getpid():
            self._fs = resolve(self._root, {"skip_instance_cache": True, **self._storage_options})[0]
            self._fs_pid = os.getpid()
        return self._fs

    def __getitem__(self, index):
        info = self.images[self.ids[index]]
        path = posixpath.join(self.images_root, info["file_name"])
        with Image.open(io.BytesIO(self.fs.cat_file(path))) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        if (w, h) != (info["width"], info["height"]):
            raise ValueError(f"{path} is {w}x{h} but annotations say {info['width']}x{info['height']}")
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)
        target = convert_annotations(self.anns_by_image[info["id"]], h, w, self.category_to_label, self.num_keypoints)
        target["image_id"] = info["id"]
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch):
    """Lists of images and targets, as torchvision detection models take them."""
    return tuple(zip(*batch))


# -------------------------------------------------------------------------- transforms
def hflip(image, target, keypoint_flip=None):
    """Mirror an image [C,H,W] and its boxes, masks and keypoints left-right (``keypoint_flip``:
    the keypoint each one becomes, e.g. left hand <-> right hand; see keypoint_flip_indices)."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        # torchvision's reference: x -> width - x, the labelled ones only
        keypoints = target["keypoints"].clone()
        if keypoint_flip is not None:
            keypoints = keypoints[:, keypoint_flip]
        labelled = keypoints[..., 2] > 0
        keypoints[..., 0] = torch.where(labelled, width - keypoints[..., 0], keypoints[..., 0])
        target["keypoints"] = keypoints
    return image, target


class RandomHorizontalFlip:
    """hflip with probability p (torch RNG, so DataLoader workers get distinct draws)."""

    def __init__(self, p=0.5, keypoint_flip=None):
        self.p = p
        self.keypoint_flip = keypoint_flip

    def __call__(self, image, target):
        if torch.rand(1).item() < self.p:
            return hflip(image, target, self.keypoint_flip)
        return image, target


# ---------------------------------------------------------------------------- sharding
def shard_indices(n, rank, world_size, *, seed=None, epoch=0, pad=False):
    """Indices of n items that worker ``rank`` of ``world_size`` reads.

    Without ``pad`` the shards partition range(n) exactly (sizes differ by at most one).
    With ``seed``, items are shuffled first by a permutation that all ranks compute alike
    (seeded by seed + epoch), so the partition still holds. ``pad=True`` repeats items from
    the start so every rank gets ceil(n / world_size), as DistributedSampler does: DDP ranks
    must run the same number of steps.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed is None:
        order = list(range(n))
    else:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    if pad and n:
        total = -(-n // world_size) * world_size
        order = (order * (total // n + 1))[:total]
    return order[rank::world_size]


def shard(dataset, rank, world_size, **kwargs):
    """The Subset of ``dataset`` that worker ``rank`` reads (see shard_indices)."""
    return torch.utils.data.Subset(dataset, shard_indices(len(dataset), rank, world_size, **kwargs))
