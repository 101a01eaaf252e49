"""Batch inference: RGB uint8 images in, numpy detections with pasted masks (or keypoints) out.

The Predictor runs one model call per batch under ``torch.inference_mode``; on CUDA it
uses channels-last weights and bf16 autocast. With our model it asks for the raw 28 x 28
mask probabilities (``model.mask_output = "raw"``) and pastes them itself with
:mod:`mrcnn.paste`, thresholded at 0.5, so no N x H x W float tensor is ever built. A
torchvision Mask R-CNN (which always pastes float masks) is accepted too.

No Ray here, and pycocotools is imported only for ``mask_format="rle"``.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .coco_categories import COCO_CATEGORY_NAMES, default_keypoint_names, label_names
from .paste import (paste_masks, paste_masks_grid, paste_masks_grid_to_rle, paste_masks_to_rle, rle_area,
                    rle_chunk_size)

__all__ = ["Predictor", "Started", "MASK_FORMATS", "native_bf16_cpu"]

MASK_FORMATS = ("rle", "bool")
MASK_THRESHOLD = 0.5
# (to RLE, to bool) pastes of a model's convention: torchvision's resize (> threshold) or
# Detectron2's grid_sample (>= threshold)
PASTES = {"torchvision": (paste_masks_to_rle, paste_masks), "detectron2": (paste_masks_grid_to_rle, paste_masks_grid)}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


class Predictor:
    """Run a Mask R-CNN (or Keypoint R-CNN) over batches of images.

    Args:
        model: our ``mrcnn`` Mask R-CNN or a torchvision one.
        device: where to run; default CUDA when available, else CPU.
        class_names: one name per label index (index 0 = background). Default: the
            model's ``class_names`` attribute, else COCO's names for a 91-class model,
            else ``str(label)``.
        score_thresh: when given, replaces the model's box score threshold
            (``model.roi_heads.score_thresh``: detections need score > score_thresh).
        max_detections: when given, replaces the model's detections kept per image
            (``model.roi_heads.detections_per_img``, the highest scores).
        mask_format: "rle" (COCO compressed RLE dicts) or "bool" (N x H x W ndarray).
        precision: "fp32", "bf16" or "fp16" (autocast); default bf16 on CUDA, fp32 on CPU.
        channels_last: run the convolutions channels-last (default on). Faster on CUDA and
            on CPU (oneDNN: about 1.7x for ResNet-50-FPN here, see bench/RESULTS.md), and
            RoIAlign then reads the FPN maps without a transpose. Results equal the NCHW
            model's up to float rounding; pass False for results bit-identical to it.
            The model passed in is converted in place.

    ``predictor(images)`` takes H x W x 3 uint8 RGB arrays or 3 x H x W uint8 tensors (sizes
    may differ) and returns, per image, ``boxes`` float32 (N, 4) x0 y0 x1 y1 in pixels, ``labels`` int64 (N,),
    ``scores`` float32 (N,), ``label_names`` list[str], and for a mask model ``areas`` int64
    (N,) mask pixel counts and ``masks`` (RLE dicts or bool (N, H, W)), masks being
    probability > 0.5 (>= 0.5 for a Detectron2 model, as Detectron2 pastes); for a keypoint
    model (Keypoint R-CNN) ``keypoints`` float32 (N, K, 3):
    x, y in pixels and the keypoint's score, in the order of ``predictor.keypoint_names``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: Optional[Any] = None,
        class_names: Optional[Sequence[str]] = None,
        score_thresh: Optional[float] = None,
        max_detections: Optional[int] = None,
        mask_format: str = "rle",
        precision: Optional[str] = None,
        channels_last: bool = True,
    ):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        _check_device(self.device, model)
        self.mask_format = mask_format
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if score_thresh is not None:
            if not hasattr(getattr(model, "roi_heads", None), "score_thresh"):
                raise ValueError("score_thresh given, but the model has no roi_heads.score_thresh to set")
            model.roi_heads.score_thresh = float(score_thresh)
        if max_detections is not None:
            if int(max_detections) < 1 or not hasattr(getattr(model, "roi_heads", None), "detections_per_img"):
                raise ValueError("max_detections must be >= 1 and the model must have roi_heads.detections_per_img")
            model.roi_heads.detections_per_img = int(max_detections)
        self.model = model
        self.convention = getattr(model, "convention", "torchvision")  # whose mask paste (PASTES)
        self.num_classes = _num_classes(model)
        if class_names is None:
            class_names = getattr(model, "class_names", None)
        if class_names is None and self.num_classes == len(COCO_CATEGORY_NAMES):
            class_names = COCO_CATEGORY_NAMES
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if self.num_classes is not None and len(class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(class_names)} names but the model has {self.num_classes} classes")
        self.class_names = class_names
        self.keypoint_names = _keypoint_names(model)
        # pairs of keypoint indices a drawing joins (the checkpoint's; None when it gives none)
        self.keypoint_skeleton = getattr(model, "keypoint_skeleton", None) if self.keypoint_names else None
        self._forward_lock = threading.Lock()  # one forward on the device at a time (see start)
        self._threads = threading.local()

    @classmethod
    def from_checkpoint(cls, path_or_uri, device=None, *, config=None, model_overrides: Optional[dict] = None,
                        **kwargs) -> "Predictor":
        """Load a checkpoint (local path or fsspec URI) with :func:`mrcnn.checkpoint.load_model`.

        Class names and the score threshold come from the checkpoint's metadata unless
        given in ``kwargs``; ``config`` is a Detectron2 checkpoint's YAML config;
        ``model_overrides`` go to the model builder (e.g. ``min_size``).
        """
        from .checkpoint import load_model

        model = load_model(path_or_uri, config, **(model_overrides or {}))
        kwargs.setdefault("class_names", getattr(model, "class_names", None))
        return cls(model, device=device, **kwargs)

    @property
    def input_size(self) -> Optional[tuple[int, int]]:
        """(min_size, max_size) the model resizes images to at inference (torchvision's
        GeneralizedRCNNTransform), or None when it has no such transform."""
        t = getattr(self.model, "transform", None)
        if t is None or not hasattr(t, "min_size") or not hasattr(t, "max_size"):
            return None
        return int(t.min_size[-1]), int(t.max_size)

    def __call__(self, images: Sequence[np.ndarray], output_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict]:
        """Detections per image. ``output_sizes`` (h, w) per image, when given, are the sizes
        the results are for: an image decoded downscaled (``jobs.infer.execute.decode.decode_for_model``)
        gets boxes scaled to its full size and masks pasted at full resolution."""
        return self.finish(self.start(images, output_sizes))

    def _to_tensor(self, i: int, img: Any) -> Tensor:
        if isinstance(img, Tensor) and img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3:
            # 3 x H x W uint8 (torchvision.io's decoders, e.g. decode_jpeg on the device)
            if img.shape[1] < 1 or img.shape[2] < 1:
                raise ValueError(f"image {i}: empty image of shape {tuple(img.shape)}")
            return img.to(self.device, non_blocking=True).float().div_(255.0)
        if not isinstance(img, np.ndarray):
            raise TypeError(f"image {i}: expected a numpy H x W x 3 uint8 RGB array, got {type(img).__name__}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected an H x W x 3 RGB array, got shape {img.shape} "
                "(convert grayscale, palette or RGBA images to RGB before the Predictor)"
            )
        if img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected dtype uint8, got {img.dtype}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: empty image of shape {img.shape}")
        # Move uint8 (4x smaller than float) and convert on the device.
        t = torch.from_numpy(np.ascontiguousarray(img)).to(self.device, non_blocking=True)
        return t.permute(2, 0, 1).float().div_(255.0)

    def predict_tensors(self, images: Sequence[Tensor], output_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict]:
        """Like ``__call__`` for CHW float tensors in 0..1 (already on any device)."""
        return self.finish(self._start(images, output_sizes))

    def start(self, images: Sequence[Any], output_sizes: Optional[Sequence[tuple[int, int]]] = None) -> Optional["Started"]:
        """First half of ``predictor(images, output_sizes)``: the images to the device and the
        model's forward. Forwards are serialised (one at a time on the device, whichever thread
        calls), so that threads calling ``start`` then :meth:`finish` keep the device busy: one
        thread's host work runs while another's forward does. None for no images."""
        return self._start([self._to_tensor(i, img) for i, img in enumerate(images)], output_sizes)

    def finish(self, started: Optional["Started"]) -> list[dict]:
        """Second half: the host work of a started call (mask paste and RLE, copies to numpy).
        On CUDA it runs on a stream of the calling thread's own, after the forward's event, so
        it does not queue behind a forward another thread started meanwhile."""
        if started is None:
            return []
        stream = self._own_stream() if self.device.type == "cuda" else None
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if stream is not None:
                stack.enter_context(torch.cuda.stream(stream))
                stream.wait_event(started.ready)
                for out in started.outputs:  # made on the forward's stream, used on this one
                    for t in out.values():
                        if isinstance(t, Tensor) and t.is_cuda:
                            t.record_stream(stream)
            return [self._finish(out, image_size, size, started.raw)
                    for out, image_size, size in zip(started.outputs, started.image_sizes, started.output_sizes)]

    def predict_batches(self, batches: Iterable[tuple[Sequence[np.ndarray], Optional[Sequence[tuple[int, int]]]]],
                        *, overlap: Optional[bool] = None) -> Iterator[Union[list[dict], Exception]]:
        """Results of ``predictor(images, output_sizes)`` for each ``(images, output_sizes)`` of
        ``batches``, in order; a batch that fails yields its exception instead.

        With ``overlap`` (default: on CUDA) batch k's :meth:`finish` runs in a worker thread
        while batch k+1's forward runs: the GPU is not left waiting for the host. Results are
        the same either way.
        """
        overlap = self.device.type == "cuda" if overlap is None else overlap
        if not overlap:
            for images, sizes in batches:
                try:
                    yield self(images, sizes)
                except Exception as e:  # noqa: BLE001  (the caller decides what a failed batch becomes)
                    yield e
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="mrcnn-finish")
        pending = None
        try:
            for images, sizes in batches:
                try:
                    job = pool.submit(self.finish, self.start(images, sizes))
                except Exception as e:  # noqa: BLE001
                    job = e
                if pending is not None:
                    yield _outcome(pending)
                pending = job
            if pending is not None:
                yield _outcome(pending)
        finally:
            pool.shutdown(wait=True)

    def _start(self, images: Sequence[Tensor], output_sizes) -> Optional["Started"]:
        """Checks the inputs and runs the model (None for no images); the host work is left to
        :meth:`finish`."""
        images = [img.to(self.device) for img in images]
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
                raise ValueError(f"image {i}: expected a 3 x H x W float tensor, got {img.dtype} {tuple(img.shape)}")
        raw = hasattr(self.model, "mask_output")
        image_sizes = [tuple(img.shape[-2:]) for img in images]
        sizes = image_sizes if output_sizes is None else _check_output_sizes(output_sizes, images, raw)
        if not images:
            return None
        with self._forward_lock, torch.inference_mode(), self._autocast(), \
                _mask_output(self.model, "raw" if raw else None):
            outputs = self.model(list(images))
            ready = None
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
        return Started(outputs, image_sizes, sizes, raw, ready)

    def _own_stream(self):
        """The calling thread's CUDA stream for host work (made once per thread)."""
        stream = getattr(self._threads, "stream", None)
        if stream is None:
            stream = self._threads.stream = torch.cuda.Stream(self.device)
        return stream

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _finish(self, out: dict, image_size: tuple[int, int], output_size: tuple[int, int], raw: bool) -> dict:
        boxes = out["boxes"].float().reshape(-1, 4)
        ry, rx = output_size[0] / image_size[0], output_size[1] / image_size[1]
        if output_size != image_size:
            # The image was decoded downscaled: boxes (and keypoints) to full-size pixels, masks
            # pasted there. Python scalars: no host-to-device copy (which would wait), same bits.
            boxes = torch.stack((boxes[:, 0] * rx, boxes[:, 1] * ry, boxes[:, 2] * rx, boxes[:, 3] * ry), 1)
        # boxes, scores and labels in one copy to the host (labels < 2**24 are exact in float32)
        host = torch.cat((boxes, out["scores"].float().reshape(-1, 1), out["labels"].float().reshape(-1, 1)), 1)
        host = host.cpu().numpy()
        labels_np = host[:, 5].astype(np.int64)
        if self.class_names is not None:
            names = label_names(labels_np, self.class_names)
        else:
            names = [str(int(v)) for v in labels_np]
        result = {
            "boxes": np.ascontiguousarray(host[:, :4]),
            "labels": labels_np,
            "scores": np.ascontiguousarray(host[:, 4]),
            "label_names": names,
        }
        if "keypoints" in out:
            result["keypoints"] = self._keypoints(out, rx, ry)
        if "masks" in out:
            result["masks"], result["areas"] = self._masks(out["masks"], boxes, output_size, raw)
        return result

    @staticmethod
    def _keypoints(out: dict, rx: float, ry: float) -> np.ndarray:
        """(N, K, 3) float32: x, y in output-size pixels (the model's times rx, ry) and the keypoint's score."""
        xy = out["keypoints"][..., :2].float()
        if (rx, ry) != (1.0, 1.0):
            xy = torch.stack((xy[..., 0] * rx, xy[..., 1] * ry), -1)  # scalars: no copy to the device
        return torch.cat([xy, out["keypoints_scores"].float()[..., None]], dim=-1).cpu().numpy()

    def _masks(self, masks: Tensor, boxes: Tensor, image_size, raw: bool):
        """(masks as ``mask_format`` says, pixel areas) of probabilities ``masks``."""
        with torch.autocast(self.device.type, enabled=False):
            if raw:
                # N x 1 x 28 x 28 probabilities and boxes in image pixels: paste them here.
                to_rle, to_bool = PASTES[self.convention]
                if self.mask_format == "rle":
                    mask_out, areas = to_rle(masks.float(), boxes, image_size, threshold=MASK_THRESHOLD, return_areas=True)
                else:
                    mask_out = to_bool(masks.float(), boxes, image_size, threshold=MASK_THRESHOLD)[:, 0].cpu().numpy()
                    areas = mask_out.sum(axis=(1, 2), dtype=np.int64)
            else:
                # torchvision already pasted float probabilities N x 1 x H x W.
                binary = masks[:, 0] > MASK_THRESHOLD
                if self.mask_format == "rle":
                    mask_out = _encode(binary, image_size)
                    areas = rle_area(mask_out)
                else:
                    mask_out = binary.cpu().numpy()
                    areas = mask_out.sum(axis=(1, 2), dtype=np.int64)
        return mask_out, np.asarray(areas, dtype=np.int64)


@dataclass
class Started:
    """A model call's outputs (on the model's device), waiting for :meth:`Predictor.finish`."""

    outputs: list
    image_sizes: list
    output_sizes: list
    raw: bool
    ready: Any = None  # CUDA event recorded after the forward, for the finishing thread's stream


def _outcome(job) -> Union[list[dict], Exception]:
    if isinstance(job, (list, Exception)):
        return job
    try:
        return job.result()
    except Exception as e:  # noqa: BLE001
        return e


def _check_output_sizes(output_sizes, images, raw: bool) -> list[tuple[int, int]]:
    sizes = [tuple(int(v) for v in s) for s in output_sizes]
    if len(sizes) != len(images) or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"output_sizes must give one positive (h, w) per image ({len(images)}), got {output_sizes!r}")
    if not raw and any(s != tuple(img.shape[-2:]) for s, img in zip(sizes, images)):
        raise ValueError("output_sizes other than the images' own need our Mask R-CNN (mrcnn): "
                         "a torchvision model pastes its masks at the input size")
    return sizes


def _encode(binary: Tensor, image_size: tuple[int, int]) -> list[dict]:
    """COCO RLE of bool N x H x W masks, a bounded chunk at a time."""
    from pycocotools import mask as mask_util

    rles = []
    step = rle_chunk_size(image_size)
    for c0 in range(0, binary.shape[0], step):
        # (K, W, H) C-contiguous is (H, W, K) in Fortran order, what pycocotools encodes.
        chunk = binary[c0 : c0 + step].to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy()
        for rle in mask_util.encode(chunk.transpose(2, 1, 0)):
            rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return rles


def _keypoint_names(model: nn.Module) -> Optional[list[str]]:
    """A keypoint model's keypoint names (its own, else COCO's for 17, else their indices); None
    for a model without keypoints."""
    predictor = getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None)
    if predictor is None:
        return None
    count = int(predictor.out_channels)
    names = getattr(model, "keypoint_names", None) or default_keypoint_names(count) or range(count)
    return [str(n) for n in names]


def _check_device(device: torch.device, model: nn.Module) -> None:
    """Refuses, in one line naming the cause, a device that cannot run ``model``: otherwise a
    GPU actor without a GPU, or with an extension built without CUDA kernels, fails every
    image instead of failing once at start."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for, but torch {torch.__version__} sees no CUDA GPU "
                           f"(torch built for CUDA {torch.version.cuda or 'none'})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device} asked for, but {torch.cuda.device_count()} CUDA GPU(s) are visible")
    from . import ops

    if not ops.WITH_CUDA and any(type(m).__module__.startswith("mrcnn.") for m in model.modules()):
        raise RuntimeError("mrcnn's RoIAlign extension was built without CUDA kernels, so this model cannot run "
                           "on a GPU: rebuild it where a CUDA toolkit is found (MRCNN_WITH_CUDA=1 bash scripts/bootstrap.sh)")


def native_bf16_cpu() -> Optional[str]:
    """This CPU's native bf16 matrix instructions ("amx_bf16" or "avx512_bf16"), which oneDNN's
    bf16 convolutions need to beat fp32; None without them (bf16 would be emulated, slower)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def _num_classes(model: nn.Module) -> Optional[int]:
    try:
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    except AttributeError:
        return None


@contextlib.contextmanager
def _mask_output(model: nn.Module, value: Optional[str]):
    """Temporarily set ``model.mask_output`` (our model only)."""
    if value is None:
        yield
        return
    previous = model.mask_output
    model.mask_output = value
    try:
        yield
    finally:
        model.mask_output = previous
