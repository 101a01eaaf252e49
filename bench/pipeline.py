"""Throughput of the inference job vs a bare loop (read + decode + Predictor), same weights.

    python bench/pipeline.py [--images 480] [--size 160x120] [--batch-size 4] [--weights W]
    python bench/pipeline.py --no-ray [--device cuda]    # the actor's batch function alone

Default: writes N random JPEGs to a temp dir and a seeded tiny ResNet-50 Mask R-CNN
(4 classes, min_size 128 / max_size 192) unless ``--weights`` is given, then times

* bare: ``read_object`` + ``decode_image`` + ``Predictor`` in this process, batches of B;
* job: ``jobs.infer.pipeline.run_job`` as ``python -m jobs.infer`` runs it by default on an
  embedded Ray (pool sized from the cluster: one single-threaded model actor per core; Ray
  Data decode tasks; per-shard stage + commit, manifest), end to end including the actors'
  start and model load, excluding ``ray.init``. ``--num-actors 1 --num-cpus-per-actor 2``
  times one actor using both cores instead;
* ``--no-ray``: ``decode_batch`` + ``PredictorActor.__call__`` (row building included) in
  this process, vs the bare loop (what a GPU machine without Ray can measure). On CUDA it
  also times the actor as the job calls a GPU actor (two calls at once, one micro-batch each,
  host work beside the other call's forward) against one call at a time without overlap, and
  reports the GPU busy fraction of each: the union of the kernels' intervals (torch.profiler)
  over the wall time.

The bare loop runs before and after the job and the ratio uses their mean (this VM's speed
drifts by several percent from minute to minute). Prints images/s and the ratio job / bare
(goal >= 0.85).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.infer.execute.decode import decode_image  # noqa: E402
from jobs.infer.plan.listing import list_inputs  # noqa: E402
from jobs.storage import read_object  # noqa: E402


def make_inputs(d: str, n: int, h: int, w: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        # smooth noise: compresses like a photo, not like white noise
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(os.path.join(d, f"im{i:05d}.jpg"), quality=90)
    return sorted(o.image_uri for o in list_inputs(d))


def make_weights(path: str) -> str:
    import mrcnn
    from mrcnn.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=4, min_size=128, max_size=192)
    save_checkpoint(model, path, class_names=["__background__", "a", "b", "c"])
    return path


def bare_loop(weights: str, uris: list[str], batch: int, device: str) -> float:
    from mrcnn.predictor import Predictor

    pred = Predictor.from_checkpoint(weights, device=device)
    pred([decode_image(read_object(uris[0]))])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(uris), batch):
        pred([decode_image(read_object(u)) for u in uris[i : i + batch]])
    return len(uris) / (time.perf_counter() - t0)


def actor_fn_alone(weights: str, uris: list[str], batch: int, device: str) -> float:
    from jobs.infer.execute.stages import PredictorActor, decode_batch, plan_batch

    actor = PredictorActor(weights, model_name="bench", checkpoint_sha256="0" * 64, run_id="bench",
                           device=device, micro_batch=batch)
    actor(decode_batch(plan_batch(uris[:1])))  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(uris), batch):
        actor(decode_batch(plan_batch(uris[i : i + batch])))
    return len(uris) / (time.perf_counter() - t0)


def _busy_fraction(prof, wall_us: float) -> float:
    """Union of the CUDA kernels' [start, end) intervals over the wall time."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / wall_us if wall_us > 0 else float("nan")


def actor_overlap(weights: str, uris: list[str], batch: int, device: str) -> None:
    """The actor as the job calls a GPU actor (``execution.model_actor_options``): Ray-sized
    batches of one micro-batch, from OVERLAPPED_CALLS threads at once (Ray's threaded actor),
    against one call at a time without overlap; images/s and the GPU busy fraction."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.profiler import ProfilerActivity, profile

    from jobs.infer.execute.stages import PredictorActor, decode_batch, plan_batch
    from jobs.infer.execution import OVERLAPPED_CALLS

    actor = PredictorActor(weights, model_name="bench", checkpoint_sha256="0" * 64, run_id="bench",
                           device=device, micro_batch=batch)
    n = len(uris)
    batches = [decode_batch(plan_batch(uris[i:i + batch])) for i in range(0, n, batch)]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for overlap, calls in ((False, 1), (True, OVERLAPPED_CALLS)):
        actor.overlap = overlap
        actor(batches[0])  # warm-up
        sync()
        with ThreadPoolExecutor(calls) as pool, \
                profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            list(pool.map(actor, batches))
            sync()
            wall = time.perf_counter() - t0
        busy = f"GPU busy {_busy_fraction(prof, wall * 1e6):.2f}" if cuda else "no GPU"
        print(f"actor, {calls} call(s) at once, overlap {'on ' if overlap else 'off'}: {n / wall:8.2f} images/s, {busy}")


def job(weights: str, inp: str, out: str, batch: int, num_actors, cpus_per_actor) -> tuple[float, dict, int]:
    import ray

    from jobs.infer.__main__ import embedded_num_cpus
    from jobs.infer.config import JobConfig
    from jobs.infer.execution import pool_size
    from jobs.infer.pipeline import run_job

    # the embedded cluster of `python -m jobs.infer`
    ray.init(num_cpus=embedded_num_cpus(), include_dashboard=False, log_to_driver=False)
    try:
        cfg = JobConfig(input=inp, output=out, weights=weights, batch_size=batch, num_actors=num_actors,
                        num_cpus_per_actor=cpus_per_actor, images_per_shard=max(8, batch * 4))
        actors = pool_size(cfg, ray.cluster_resources())
        t0 = time.perf_counter()
        summary, _ = run_job(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return summary.processed / wall, summary.to_dict(), actors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=480, help="the job's fixed start (~20 s) weighs on small runs")
    p.add_argument("--size", default="160x120", help="WxH of the generated images")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--weights", default=None)
    p.add_argument("--num-actors", type=int, default=None, help="job only; default: the job's (from the cluster)")
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="job only; default: the job's")
    p.add_argument("--no-ray", action="store_true", help="time the actor's batch function alone vs the bare loop")
    p.add_argument("--device", default=None, help="--no-ray only; default cuda if available")
    a = p.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        weights = a.weights or make_weights(os.path.join(tmp, "w.pt"))
        uris = make_inputs(os.path.join(tmp, "in"), a.images, h, w)
        print(f"{len(uris)} images {w}x{h}, batch {a.batch_size}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        bare = bare_loop(weights, uris, a.batch_size, "cpu" if not a.no_ray else device)
        print(f"bare loop (read+decode+Predictor):  {bare:8.2f} images/s")
        if a.no_ray:
            alone = actor_fn_alone(weights, uris, a.batch_size, device)
            print(f"decode_batch + PredictorActor:      {alone:8.2f} images/s  ratio {alone / bare:.3f} ({device})")
            if device.startswith("cuda"):
                actor_overlap(weights, uris, a.batch_size, device)
            return
        rate, summary, actors = job(weights, os.path.join(tmp, "in"), os.path.join(tmp, "out"), a.batch_size,
                                    a.num_actors, a.num_cpus_per_actor)
        print(f"job end to end (incl. actor start): {rate:8.2f} images/s  "
              f"({actors} actors x {a.num_cpus_per_actor:g} CPU)")
        print(f"  summary: {summary['processed']} processed, wall {summary['wall_s']:.1f} s")
        bare_after = bare_loop(weights, uris, a.batch_size, "cpu")
        mean = (bare + bare_after) / 2
        print(f"bare loop again:                    {bare_after:8.2f} images/s")
        print(f"ratio job / mean bare: {rate / mean:.3f}")


if __name__ == "__main__":
    main()
