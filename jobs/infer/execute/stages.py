"""The per-batch work of the inference job, as plain functions and classes (no Ray import).

Ray Data calls :func:`decode_batch` in a CPU task pool and :class:`PredictorActor` in an
actor pool (see ``pipeline.py``); both take and return column batches, so they run the
same way without Ray (the GPU benchmark and tests call them directly).

Input rows (the plan manifest): ``image_uri, source_etag, source_size, error, error_kind,
shard_id``, the output's names for the same fields; ``source_size`` -1 and ``source_etag`` null
mean unknown, ``error`` is set when the object could not be stat'ed.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from jobs.infer import schema
from jobs.infer.execute.decode import (DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DecodeError, decode_for_model,
                                       decode_jpegs_on_device, inspect_jpeg)
from jobs.infer.schema import PLAN_ITEM_COLUMNS, SHARD_COLUMN
from jobs.storage import NO_RETRIES, ReadError, RetryPolicy, read_object

# Stand-in image for rows that failed before the model: keeps the column a 3-d uint8 tensor.
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)


def _opt_str(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _opt_size(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    v = int(v)
    return None if v < 0 else v


def plan_batch(uris: list[str], shard_id: str = "s") -> dict[str, np.ndarray]:
    """Plan rows for ``uris`` with nothing known about them (no etag, size or stat error): the
    input :func:`decode_batch` takes, for callers without a plan (benchmarks, tests)."""
    n = len(uris)
    none = np.array([None] * n, dtype=object)
    return {"image_uri": np.array(uris, dtype=object), "source_etag": none, "source_size": np.full(n, -1), "error": none.copy(),
            "error_kind": none.copy(), SHARD_COLUMN: np.array([shard_id] * n, dtype=object)}


def decode_batch(
    batch: Mapping[str, np.ndarray],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    retry: RetryPolicy = RetryPolicy(),
    model_input: tuple[int, int] | None = None,
    jpeg_on_device: bool = False,
) -> dict[str, np.ndarray]:
    """Read and decode each row's object; failures become ``decode_error`` strings with their
    ``error_kind``.

    With ``model_input`` = the model's (min_size, max_size), large JPEGs are decoded
    DCT-downscaled (:func:`decode.decode_for_model`); ``width`` and ``height`` are always the
    full image's (0 when it was not decoded). With ``jpeg_on_device`` a plain JPEG is only
    checked (:func:`decode.inspect_jpeg`) and its bytes go to the actor in the ``jpeg`` column,
    which decodes it on the model's device; other images are decoded here as usual.

    Reads are retried as ``retry`` says; once one read of the batch has failed as
    ``unavailable`` with every retry spent, the batch's later reads get one try each (the
    store is struggling: the job's next pass retries them instead of this task waiting out
    a backoff per image).
    """
    n = len(batch["image_uri"])
    images = np.empty(n, dtype=object)
    errors = np.empty(n, dtype=object)
    kinds = np.empty(n, dtype=object)
    sizes = np.zeros((n, 2), dtype=np.int64)
    jpegs = np.full(n, b"", dtype=object)
    for i in range(n):
        stat_error = _opt_str(batch["error"][i])
        stat_kind = _opt_str(batch["error_kind"][i])
        try:
            if stat_error and stat_kind not in schema.RETRYABLE_ERROR_KINDS:
                raise ReadError(stat_error, stat_kind or "read")
            # a stat that failed in the store (not a missing object) is worth a read of its own
            data = read_object(str(batch["image_uri"][i]), retry=retry)
            size = inspect_jpeg(data, max_pixels=max_pixels, max_aspect=max_aspect) if jpeg_on_device else None
            if size is not None:
                images[i], sizes[i], jpegs[i] = _NO_IMAGE, size, data
            else:
                images[i], sizes[i] = decode_for_model(data, model_input, max_pixels=max_pixels, max_aspect=max_aspect)
            errors[i], kinds[i] = "", ""
        except (ReadError, DecodeError) as e:
            images[i] = _NO_IMAGE
            errors[i] = schema.one_line(e.reason) or type(e).__name__
            kinds[i] = e.kind
            if e.kind == "unavailable":
                retry = NO_RETRIES
    out = {k: batch[k] for k in (*PLAN_ITEM_COLUMNS, SHARD_COLUMN)}
    out["decode_error"] = errors.astype(str)
    out["error_kind"] = kinds.astype(str)
    out["image"] = images
    out["width"], out["height"] = sizes[:, 0], sizes[:, 1]
    if jpeg_on_device:
        out["jpeg"] = jpegs
    return out


class PredictorActor:
    """Loads the checkpoint once; turns decoded batches into output rows (a pyarrow Table).

    The returned table has the output schema (:data:`schema.SCHEMA`) plus ``shard_id``.
    ``micro_batch`` bounds how many images go through one model call; ``score_thresh``,
    ``max_instances`` and ``precision`` override the checkpoint's (see ``Predictor``); every row
    records the run's ``settings`` as the driver computed them (``JobConfig.settings``: those
    three and the decode mode). With ``--decode device`` the batches carry the JPEG bytes in a
    ``jpeg`` column, which the actor decodes on its device. On CPU,
    ``num_threads`` sets torch's intra-op threads (Ray sets OMP_NUM_THREADS=1 in workers
    unless told otherwise, which would waste the CPUs the actor reserved). With ``overlap``
    (default: on a GPU) micro-batches' host work runs beside the next forward, within a call
    and across the calls Ray Data runs at once (``execution.model_actor_options``).
    """

    def __init__(
        self,
        weights: str,
        *,
        model_config: str | None = None,
        class_names: list[str] | None = None,
        model_name: str,
        checkpoint_sha256: str,
        run_id: str,
        device: str | None = None,
        micro_batch: int = 4,
        num_threads: int | None = None,
        score_thresh: float | None = None,
        max_instances: int | None = None,
        precision: str | None = None,
        settings: str | None = None,
        overlap: bool | None = None,
    ):
        import torch

        from mrcnn.predictor import Predictor, native_bf16_cpu

        if precision == "bf16" and (device or "cpu") == "cpu" and native_bf16_cpu() is None:
            raise RuntimeError("--precision bf16 on CPU actors needs a CPU with AVX512_BF16 or AMX (this one has "
                               "neither: bf16 would be emulated, slower than fp32); use fp32")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        extra = {"class_names": class_names} if class_names else {}
        self.predictor = Predictor.from_checkpoint(weights, device=device, config=model_config, score_thresh=score_thresh,
                                                   max_detections=max_instances, precision=precision, **extra)
        self.meta = dict(model_name=model_name, checkpoint_sha256=checkpoint_sha256, run_id=run_id, settings=settings)
        self.micro_batch = max(1, int(micro_batch))
        # GPU actors run two calls at once (execution.model_actor_options): the Predictor
        # serialises forwards, so one call's host work runs during the other's forward.
        self.overlap = self.predictor.device.type == "cuda" if overlap is None else bool(overlap)
        self.jpeg_fallbacks = 0  # JPEGs the device decoder refused or got wrong, decoded by Pillow

    def _decode_jpegs(self, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[Any]:
        """JPEG bytes decoded on the model's device (nvJPEG on CUDA) as 3 x H x W uint8 tensors,
        EXIF orientation applied (:func:`decode.decode_jpegs_on_device`). One that the device
        decoder refuses, or decodes to another size than its header's, is decoded by Pillow here
        instead: the result is an array, or the DecodeError of the CPU path."""
        import torch

        out = decode_jpegs_on_device(datas, sizes, self.predictor.device)
        self.jpeg_fallbacks += sum(not isinstance(img, torch.Tensor) for img in out)
        return out

    def _one_by_one(self, images: list[np.ndarray], sizes: list[tuple[int, int]], error: Exception) -> list[dict | str]:
        """After a failed model call: each image alone, so one bad image becomes one error row
        (its message) instead of failing the batch."""
        if len(images) == 1:
            return [_model_failed(error)]
        out: list[dict | str] = []
        for img, size in zip(images, sizes):
            try:
                out.append(self.predictor([img], output_sizes=[size])[0])
            except Exception as e:  # noqa: BLE001
                out.append(_model_failed(e))
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_uri"])
        now = _dt.datetime.now(_dt.timezone.utc)
        rows: list[dict] = [None] * n  # type: ignore[list-item]
        todo = [i for i in range(n) if not batch["decode_error"][i]]
        for i in range(n):
            if batch["decode_error"][i]:
                rows[i] = self._error(batch, i, str(batch["decode_error"][i]), str(batch["error_kind"][i]), now)
        # zero_copy batches are read-only views: the Predictor copies them to tensors.
        images = {i: np.asarray(batch["image"][i]) for i in todo}
        sizes = {i: _full_size(batch, i, images[i]) for i in todo}
        on_device = [i for i in todo if "jpeg" in batch and len(batch["jpeg"][i])]
        for i, img in zip(on_device, self._decode_jpegs([batch["jpeg"][i] for i in on_device],
                                                        [sizes[i] for i in on_device])):
            if isinstance(img, DecodeError):
                rows[i] = self._error(batch, i, img.reason, img.kind, now, sizes[i])
                todo.remove(i)
            else:
                images[i] = img
        chunks = []
        for c0 in range(0, len(todo), self.micro_batch):
            idx = todo[c0 : c0 + self.micro_batch]
            chunks.append((idx, [images[i] for i in idx], [sizes[i] for i in idx]))
        # with overlap, a chunk's host work also overlaps this call's next chunk's forward
        outcomes = self.predictor.predict_batches(((images, sizes) for _, images, sizes in chunks), overlap=self.overlap)
        for (idx, images, sizes), results in zip(chunks, outcomes):
            if isinstance(results, Exception):
                results = self._one_by_one(images, sizes, results)
            for i, (h, w), res in zip(idx, sizes, results):
                if isinstance(res, str):
                    rows[i] = self._error(batch, i, res, "model", now, (h, w))
                else:
                    rows[i] = schema.ok_row(res, width=w, height=h, processed_at=now, **self._ids(batch, i))
        table = schema.rows_to_table(rows)
        return table.append_column(SHARD_COLUMN, pa.array([str(s) for s in batch[SHARD_COLUMN]], pa.string()))

    def _ids(self, batch, i: int) -> dict:
        return dict(
            image_uri=str(batch["image_uri"][i]),
            source_etag=_opt_str(batch["source_etag"][i]),
            source_size=_opt_size(batch["source_size"][i]),
            **self.meta,
        )

    def _error(self, batch, i: int, reason: str, kind: str, now, size: tuple[int, int] | None = None) -> dict:
        wh = {} if size is None else {"width": size[1], "height": size[0]}
        return schema.error_row(reason=reason, kind=kind, processed_at=now, **wh, **self._ids(batch, i))


def _model_failed(e: Exception) -> str:
    return f"model failed: {type(e).__name__}: {schema.one_line(str(e))}"


def _full_size(batch, i: int, img: np.ndarray) -> tuple[int, int]:
    """(h, w) of the full image: the decode stage's, or the array's (batches made without it)."""
    if "width" in batch and int(batch["width"][i]) > 0:
        return int(batch["height"][i]), int(batch["width"][i])
    return img.shape[0], img.shape[1]
