"""The host work a GPU would wait on: the job's CPU per image with a model that costs nothing.

    python bench/host_budget.py [--images 2400] [--size 640x480] [--detections 100] [--decode sized]

The model actors get a stand-in forward (``Predictor.start`` patched in every Ray worker by a
worker setup hook, and here): no model compute, and per image ``--detections`` detections with
28 x 28 mask probabilities (smooth blobs, about half above 0.5), so paste, RLE, row building and
writing cost what they cost with a real model. JPEGs of ``--size`` (smooth noise, compressing
like photos) on local disk are then run three ways, in this order:

* stages: ``decode_batch`` + ``PredictorActor`` + a Parquet write of its table, in this process,
  one thread (the job's own work per image, no Ray);
* job: ``jobs.infer.pipeline.run_job`` as ``python -m jobs.infer`` runs it on an embedded Ray;
* plain: the plain Ray Data pattern: ``read_binary_files`` -> ``map_batches`` decode (CPU
  tasks, the job's decode) -> an actor pool calling the same Predictor (masks pasted at full
  size) and building the same rows -> ``write_parquet``.

For the two Ray runs a sampler reads every process's CPU time and title from /proc ten times a
second and charges each interval to what the process was doing then (Ray names its workers
``ray::<task or actor>``; a task shorter than a sample shows as ``ray::IDLE``), so CPU ms per image
come out by process kind: driver (less the sampler), Ray's own
services, Data's coordinator actors, idle workers, listing/reading, decode tasks, model actors,
write and finalize tasks. Wall time excludes ``ray.init``; the actors' start is included.
Prints images/s, CPU ms per image by kind, and the ratios job / plain (speed) and job CPU /
stages CPU (the issue's goals: >= 1 and <= 2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes_r18_fpn3.pt")
TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the stand-in model
def install_stand_in(detections: int) -> None:
    """Replaces ``Predictor.start`` by a forward that costs nothing and returns ``detections``
    detections per image with 28 x 28 mask probabilities (in this process)."""
    import torch

    from mrcnn.predictor import Predictor, Started

    g = torch.Generator().manual_seed(0)
    unit = torch.rand(detections, 4, generator=g)
    x0, y0 = unit[:, 0] * 0.8, unit[:, 1] * 0.8
    unit = torch.stack((x0, y0, x0 + 0.05 + unit[:, 2] * 0.15, y0 + 0.05 + unit[:, 3] * 0.15), 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    centre = torch.rand(detections, 2, generator=g) * 0.6 - 0.3
    radius = torch.rand(detections, 1, 1, generator=g) * 0.4 + 0.5
    dist = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2).sqrt()
    masks = torch.sigmoid((radius - dist) * 8)[:, None]  # smooth blobs, about half above 0.5
    scores = torch.linspace(0.99, 0.5, detections)
    labels = torch.randint(1, 4, (detections,), generator=g)

    def start(self, images, output_sizes=None):
        sizes = [tuple(int(v) for v in (img.shape[:2] if isinstance(img, np.ndarray) else img.shape[-2:]))
                 for img in images]
        if not sizes:
            return None
        outputs = [{"boxes": unit * torch.tensor([w, h, w, h], dtype=torch.float32), "labels": labels,
                    "scores": scores, "masks": masks} for h, w in sizes]
        return Started(outputs, sizes, [tuple(s) for s in output_sizes] if output_sizes else sizes, True)

    Predictor.start = start


def install_stand_in_on_import(detections: int) -> None:
    """:func:`install_stand_in` once ``mrcnn.predictor`` is imported: a worker that never loads
    the model (decode, listing, write tasks) does not import torch for it, as in the real job."""
    import importlib.abc
    import importlib.machinery

    if "mrcnn.predictor" in sys.modules:
        install_stand_in(detections)
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mrcnn.predictor":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                install_stand_in(detections)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Finder())


# ------------------------------------------------------------------ CPU by process kind
KINDS = [  # (kind, pattern on a process's title or command line), first match wins
    ("model actors", r"PredictorActor|MapBatches\(_PlainModel"),
    ("decode tasks", r"decode_batch|MapBatches\(_plain_decode"),
    ("write and finalize tasks", r"write_parts|finalize|[Ww]rite"),
    ("listing and reading", r"[Rr]ead|[Ll]ist|plan|fold|[Pp]artition|bucket|scatter"),
    ("idle workers", r"ray::IDLE"),
    ("Data coordinator actors", r"ray::_?[A-Z]\w*(Actor|Tracker|Coordinator|Requester|Manager)|ray::_StatsActor"),
    ("other Ray tasks", r"ray::"),
    ("Ray services", r"raylet|gcs_server|dashboard|log_monitor|monitor\.py|runtime_env|ray/_private|default_worker"),
]


def _kind(title: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, title):
            return kind
    return "other"


def _procs() -> dict[int, tuple[str, int]]:
    """{pid: (title, utime + stime in ticks)} of every process we may read."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (title, int(fields[11]) + int(fields[12]))
    return out


class CpuSampler:
    """Charges every process's CPU time, interval by interval, to what its title said then."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.me = interval, os.getpid()
        self.ticks: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._last = _procs()
        self.started: set[int] = set()  # Ray worker processes started during the run
        self.ran: dict[int, str] = {}  # what each started worker was first seen running
        self.idle_by_pid: dict[int, int] = defaultdict(int)
        self.own_cpu = 0.0  # the sampler's own CPU seconds, taken off the driver's
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = _procs()
        for pid, (title, t) in now.items():
            before = self._last.get(pid)
            if before is None and ("ray::" in title or "default_worker" in title):
                self.started.add(pid)
            if pid in self.started and pid not in self.ran and "IDLE" not in title and "ray::" in title:
                self.ran[pid] = re.sub(r"[.(\[].*", "", title.split("ray::", 1)[1])
            delta = t - (before[1] if before else 0)
            if delta > 0 and (before is not None or "ray" in title or pid == self.me):
                kind = "driver" if pid == self.me else _kind(title)
                self.ticks[kind] += delta
                if kind == "idle workers":
                    self.idle_by_pid[pid] += delta
        self._last = now

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self._sample()
        self.own_cpu = time.thread_time() - t0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def ms_per_image(self, images: int) -> dict[str, float]:
        ms = {k: v * 1000 / TICK for k, v in self.ticks.items()}
        ms["driver"] = max(0.0, ms.get("driver", 0.0) - self.own_cpu * 1000)
        return {k: v / images for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}


def _print_started(cpu: CpuSampler) -> None:
    ran = [cpu.ran.get(pid, "(idle only)") for pid in cpu.started]
    print("workers started, by what they first ran: " + ", ".join(f"{k} {n}" for k, n in Counter(ran).most_common()))


# ------------------------------------------------------------------ the three runs
def make_images(d: str, n: int, w: int, h: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    distinct = [Image.fromarray(rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8))
                .resize((w, h), Image.BILINEAR) for _ in range(8)]
    paths = []
    for i in range(n):
        p = os.path.join(d, f"im{i:05d}.jpg")
        distinct[i % len(distinct)].save(p, quality=90)
        paths.append(p)
    return paths


def stages(paths: list[str], batch: int, decode: str, detections: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the job's stages in this process, one thread."""
    import pyarrow.parquet as pq
    import torch

    from jobs.infer import schema
    from jobs.infer.execute.stages import PredictorActor, decode_batch, plan_batch
    from jobs.infer.pipeline import model_input_size
    from mrcnn.checkpoint import read_metadata

    torch.set_num_threads(1)
    install_stand_in(detections)
    actor = PredictorActor(WEIGHTS, model_name="bench", checkpoint_sha256="0" * 64, run_id="bench",
                           device="cpu", micro_batch=batch, num_threads=1,
                           settings=schema.settings_key(decode=decode))
    model_input = model_input_size(read_metadata(WEIGHTS)) if decode == "sized" else None
    kw = {"model_input": model_input, "jpeg_on_device": decode == "device"}
    with tempfile.TemporaryDirectory() as out:
        actor(decode_batch(plan_batch(paths[:batch]), **kw))  # warm-up
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(0, len(paths), batch):
            table = actor(decode_batch(plan_batch(paths[i:i + batch]), **kw))
            pq.write_table(table, os.path.join(out, f"{i}.parquet"))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(paths) / wall, cpu * 1000 / len(paths)


def _init_ray(detections: int) -> None:
    import ray

    from jobs.infer.__main__ import embedded_num_cpus

    def setup():  # in every Ray worker at start: the stand-in model once mrcnn.predictor loads
        install_stand_in_on_import(detections)

    # this file is no package the workers can import: ship its functions and classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    ray.init(num_cpus=embedded_num_cpus(), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", runtime_env={"worker_process_setup_hook": setup})


def job(image_dir: str, out: str, batch: int, decode: str, detections: int) -> tuple[float, dict, int]:
    import ray

    from jobs.infer.config import JobConfig
    from jobs.infer.pipeline import run_job

    _init_ray(detections)
    try:
        cfg = JobConfig(input=image_dir, output=out, weights=WEIGHTS, batch_size=batch, decode=decode)
        with CpuSampler() as cpu:
            t0 = time.perf_counter()
            summary, _ = run_job(cfg)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    stream = summary.wall_s - summary.plan_s
    print(f"job phases: planning {summary.plan_s:.1f} s, images {stream:.1f} s, the rest (model identity, lease, "
          f"finishing) {wall - summary.wall_s:.1f} s of {wall:.1f} s")
    _print_started(cpu)
    return summary.processed / wall, cpu.ms_per_image(summary.processed), summary.processed, len(cpu.started)


class _PlainModel:
    """The plain pattern's actor: the Predictor and the output rows, nothing else."""

    def __init__(self, detections: int):
        from mrcnn.predictor import Predictor

        install_stand_in(detections)
        self.predictor = Predictor.from_checkpoint(WEIGHTS, device="cpu")

    def __call__(self, batch):
        import datetime as dt

        from jobs.infer import schema

        now = dt.datetime.now(dt.timezone.utc)
        sizes = [(int(h), int(w)) for h, w in zip(batch["height"], batch["width"])]
        results = self.predictor(list(batch["image"]), output_sizes=sizes)  # masks at full size, as the job's
        rows = [schema.ok_row(r, image_uri=str(u), source_etag=None, source_size=None, width=w, height=h,
                              model_name="plain", checkpoint_sha256="0" * 64, run_id="plain", processed_at=now)
                for u, (h, w), r in zip(batch["path"], sizes, results)]
        return schema.rows_to_table(rows)


def _plain_decode(batch, model_input=None):
    from jobs.infer.execute.decode import decode_for_model

    images = np.empty(len(batch["bytes"]), dtype=object)
    sizes = np.zeros((len(images), 2), dtype=np.int64)
    for i, data in enumerate(batch["bytes"]):
        images[i], (w, h) = decode_for_model(data, model_input)  # the job's decode: sized, full size kept
        sizes[i] = h, w
    return {"path": batch["path"], "image": images, "height": sizes[:, 0], "width": sizes[:, 1]}


def plain(image_dir: str, out: str, batch: int, decode: str, detections: int) -> tuple[float, dict, int]:
    import ray

    from jobs.infer.pipeline import model_input_size
    from mrcnn.checkpoint import read_metadata

    _init_ray(detections)
    try:
        model_input = model_input_size(read_metadata(WEIGHTS)) if decode == "sized" else None
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) - 0.5))
        with CpuSampler() as cpu:
            t0 = time.perf_counter()
            ds = ray.data.read_binary_files(image_dir, include_paths=True)
            ds = ds.map_batches(_plain_decode, fn_kwargs={"model_input": model_input}, batch_size=batch,
                                batch_format="numpy", num_cpus=0.5)
            ds = ds.map_batches(_PlainModel, fn_constructor_args=(detections,), batch_size=batch, batch_format="numpy",
                                num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors))
            ds.write_parquet(out)
            wall = time.perf_counter() - t0
        n = len([p for p in os.listdir(image_dir) if p.endswith(".jpg")])
    finally:
        ray.shutdown()
    _print_started(cpu)
    return n / wall, cpu.ms_per_image(n), n, len(cpu.started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--size", default="640x480", help="WxH of the JPEGs")
    p.add_argument("--detections", type=int, default=100, help="per image, from the stand-in model")
    p.add_argument("--batch-size", type=int, default=4, help="the job's default")
    p.add_argument("--decode", choices=("sized", "full", "device"), default="sized")
    p.add_argument("--runs", nargs="+", choices=("stages", "job", "plain"), default=["stages", "job", "plain"])
    a = p.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{a.images} JPEGs {w}x{h} on local disk, {a.detections} detections per image (stand-in model), "
          f"batch {a.batch_size}, --decode {a.decode}; {os.cpu_count()} CPUs ({cpu_name})")
    rates, cpus = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = os.path.join(tmp, "in")
        paths = make_images(image_dir, a.images, w, h)
        if "stages" in a.runs:
            rates["stages"], cpus["stages"] = stages(paths, a.batch_size, a.decode, a.detections)
            print(f"stages, one thread:   {rates['stages']:8.1f} images/s, {cpus['stages']:6.2f} CPU ms per image")
        for name, fn in (("job", job), ("plain", plain)):
            if name not in a.runs:
                continue
            rate, by_kind, n, workers = fn(image_dir, os.path.join(tmp, f"out-{name}"), a.batch_size, a.decode,
                                           a.detections)
            rates[name], cpus[name] = rate, sum(by_kind.values())
            print(f"{name + ':':21s} {rate:8.1f} images/s, {cpus[name]:6.2f} CPU ms per image ({n} images, "
                  f"{workers} Ray worker processes started)")
            for kind, ms in by_kind.items():
                print(f"    {kind:26s} {ms:7.2f} ms/image")
    if "job" in rates and "plain" in rates:
        print(f"job / plain, images/s: {rates['job'] / rates['plain']:.2f} (goal >= 1)")
    if "job" in cpus and "stages" in cpus:
        print(f"job CPU / stages CPU per image: {cpus['job'] / cpus['stages']:.1f} (goal <= 2)")


if __name__ == "__main__":
    main()
