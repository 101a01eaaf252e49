"""The batch job's driver with a stand-in model, for the commit-protocol tests.

:func:`run_job` is ``pipeline.run_job`` with ``execution.InProcess``: the real listing, planning,
shards, decoding, rows, part files, shard assembly, staging and commits, in this process. The
model's identity is a real checkpoint file's (``WEIGHTS`` or another one), but its forward costs
nothing: one instance per image, its top-left quarter. Run as a script it does one run and can kill
itself with SIGKILL at a protocol step: ``python tests/_stand_in_job.py IN OUT`` with
``CRASH_AT=step:n`` (the n-th time ``step`` is reached, counting from 0).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.infer import execution, pipeline  # noqa: E402
from jobs.infer.config import JobConfig  # noqa: E402
from mrcnn.predictor import Predictor, Started  # noqa: E402

WEIGHTS = str(REPO / "models" / "shapes_r18_fpn3.pt")
_real_from_checkpoint = Predictor.from_checkpoint.__func__


def _quarter(self, images, output_sizes=None):
    """``Predictor.start`` without the model: one instance, the top-left quarter of each image."""
    sizes = [tuple(int(v) for v in (img.shape[:2] if isinstance(img, np.ndarray) else img.shape[-2:])) for img in images]
    if not sizes:
        return None
    outputs = [{"boxes": torch.tensor([[0.0, 0.0, max(1, w // 2), max(1, h // 2)]]),
                "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
                "masks": torch.ones(1, 1, 28, 28)} for h, w in sizes]
    return Started(outputs, sizes, [tuple(s) for s in output_sizes] if output_sizes else sizes, True)


@functools.lru_cache(maxsize=4)
def _loaded(path, device, items):
    return _real_from_checkpoint(Predictor, path, device, **dict(items))


@contextlib.contextmanager
def stand_in_model(calls: list | None = None):
    """In this block the job's model is the stand-in (the checkpoint loaded once per process);
    ``calls`` collects the URI of every image the decode stage is given."""
    real_decode = execution.decode_batch

    def decode_batch(batch, **kw):
        if calls is not None:
            calls.extend(str(u) for u in batch["image_uri"])
        return real_decode(batch, **kw)

    def from_checkpoint(cls, path, device=None, **kw):
        return _loaded(path, device, tuple(sorted(kw.items())))

    with mock.patch.object(Predictor, "start", _quarter), \
            mock.patch.object(Predictor, "from_checkpoint", classmethod(from_checkpoint)), \
            mock.patch.object(execution, "decode_batch", decode_batch):
        yield


def run_job(input_uri: str, output_uri: str, weights: str = WEIGHTS, *, full: bool = False, shard_size: int = 4,
            calls: list | None = None, on_step=None):
    """One run of the job with the stand-in model; returns (summary, manifest)."""
    cfg = JobConfig(input=input_uri, output=output_uri, weights=weights, full=full, images_per_shard=shard_size,
                    batch_size=4, list_tasks=0)
    with stand_in_model(calls):
        return pipeline.run_job(cfg, execution=execution.InProcess(), on_step=on_step)


def _crash_hook(spec: str):
    """Kills this process the n-th time ``step`` is reached (``spec``: "step:n")."""
    step, n = spec.split(":")
    seen = {"n": 0}

    def hook(name, detail):
        if name == step:
            if seen["n"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            seen["n"] += 1

    return hook


if __name__ == "__main__":
    crash = os.environ.get("CRASH_AT")
    run_job(sys.argv[1], sys.argv[2], on_step=_crash_hook(crash) if crash else None)
    print("finished")
