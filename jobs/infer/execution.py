"""How a run's images go through the stages: Ray Data on the cluster, or in this process.

``pipeline.run_job`` drives a run the same way whatever executes it; an execution turns a pass's
plan files into the part rows the workers write (``execute.parts.PART_SCHEMA``: shard, part
file, rows, storage failures) and says how a complete shard is assembled:

* :class:`RayData` (the product): plan files -> decode tasks -> model actors -> part files
  written by tasks, a lazy Ray Dataset streamed by the driver; shards assembled in Ray tasks.
* :class:`InProcess` (tests and benchmarks): the same stages called in this process, one batch
  at a time, one model actor per run and settings; shards assembled here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from jobs.infer.commit import protocol
from jobs.infer.config import JobConfig
from jobs.infer.execute.parts import finalize_shard, remote_finalize, write_parts
from jobs.infer.execute.stages import PredictorActor, decode_batch
from jobs.infer.output import Output

if TYPE_CHECKING:
    from jobs.infer.pipeline import CheckpointInfo

log = logging.getLogger(__name__)

# Rows per block between the plan and the model, and images per actor call (the model still
# sees --batch-size at a time): a plan file reads as one block, which would make one decode task
# feed every actor. Every block is a decode task and an actor call, each costing Ray CPU in the
# driver, the raylet and the worker: blocks of 16 batches took the job from 46 to 27 CPU ms per
# image against blocks of 4 (bench/host_budget.py, 640x480). A small pass gets smaller blocks, at
# least BLOCKS_PER_ACTOR per actor, so that every actor has work until the end.
BLOCK_BATCHES = 16
BLOCKS_PER_ACTOR = 8
# Fault tolerance, set here rather than left to Ray Data's defaults (which restart and retry
# forever): the tasks and actors of a lost node are retried and restarted elsewhere; a decode
# task that keeps killing its worker (say, a decoder crash on hostile bytes) fails the run
# after DECODE_TASK_RETRIES tries, and an actor that keeps dying after ACTOR_RESTARTS
# restarts, instead of looping; the same command then resumes the run. Actor tasks retry
# without a count of their own (-1): while a lost actor waits for a new node they fail fast as
# "unavailable" again and again, and a count would run out before the node arrives (measured:
# 4 retries failed the run in tests/test_infer_faults.py); the restart budget bounds them.
# Python exceptions are not retried: per-image failures are already rows.
DECODE_TASK_RETRIES = 4
ACTOR_RESTARTS = 8
ACTOR_TASK_RETRIES = -1
# Result rows a part file holds at most (a part holds one shard's rows of one batch), and the
# write tasks at once: parts of a few hundred rows keep the PUTs few and the shard merges cheap.
WRITE_BATCH_ROWS = 256
WRITE_TASKS = 4
# Calls a GPU model actor runs at once (model_actor_options).
OVERLAPPED_CALLS = 2


def pool_size(cfg: JobConfig, resources: dict[str, float]) -> int:
    """Model actors for ``cfg``: ``cfg.num_actors`` when given, else as many as the cluster holds.

    GPU actors: one per ``num_gpus_per_actor`` of the cluster's GPUs; one when the cluster has
    none yet (an autoscaling cluster adds a GPU node for it). CPU actors: one per
    ``num_cpus_per_actor`` CPUs after the decode stage's share (``decode_cpus``), so the
    decode tasks always find a CPU.
    """
    if cfg.num_actors is not None:
        return cfg.num_actors
    if cfg.num_gpus_per_actor > 0:
        gpus = resources.get("GPU", 0.0)
        if gpus < cfg.num_gpus_per_actor:
            log.warning("no GPU in the cluster yet: one model actor (the autoscaler, if any, adds a node "
                        "for it); pass --num-actors N for more")
            return 1
        return int(gpus // cfg.num_gpus_per_actor)
    cpus = resources.get("CPU", 0.0) - cfg.decode_cpus
    return max(1, int(cpus // cfg.num_cpus_per_actor))


def _pyarrow_fs(output: Output):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(output.fs))


def decode_kwargs(cfg: JobConfig, ckpt: CheckpointInfo) -> dict:
    """decode_batch's keyword arguments for this run."""
    return {"max_pixels": cfg.max_pixels, "max_aspect": cfg.max_aspect, "retry": cfg.read_retry,
            "model_input": ckpt.model_input if cfg.decode == "sized" else None,
            "jpeg_on_device": cfg.decode == "device"}


def actor_kwargs(cfg: JobConfig, ckpt: CheckpointInfo, run: protocol.Run) -> dict:
    """PredictorActor's keyword arguments for this run (the weights file is its one argument)."""
    use_gpu = cfg.num_gpus_per_actor > 0
    return {
        "model_config": cfg.model_config,
        "class_names": list(ckpt.class_names) if ckpt.class_names else None,
        "model_name": ckpt.model_name,
        "checkpoint_sha256": ckpt.sha256,
        "run_id": run.run_id,
        "device": "cuda" if use_gpu else "cpu",
        "micro_batch": cfg.batch_size,
        "num_threads": None if use_gpu else max(1, int(cfg.num_cpus_per_actor)),
        "score_thresh": cfg.score_thresh,
        "max_instances": cfg.max_instances,
        "precision": cfg.precision,
        "settings": cfg.settings,
        "overlap": use_gpu,
    }


def model_actor_options(size: int, *, overlap: bool) -> dict:
    """map_batches options of the model actor pool. With ``overlap`` (GPU actors) each actor runs
    two calls at once in two threads: the Predictor serialises their forwards, so one call's host
    work (paste, RLE, rows) runs while the other's forward keeps the GPU busy. CPU actors run
    one call at a time: their forward already uses the actor's CPUs."""
    import ray

    calls = OVERLAPPED_CALLS if overlap else 1
    return {"compute": ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2 * calls,
                                                  enable_true_multi_threading=overlap),
            "max_concurrency": calls}


def block_rows(batch_size: int, images: int, actors: int) -> int:
    """Rows per block (and images per actor call) for a pass of ``images`` over ``actors``: whole
    batches, so that the model's batches are full (a block of 6 would make batches of 4 and 2)."""
    return batch_size * max(1, min(BLOCK_BATCHES, images // (actors * BLOCKS_PER_ACTOR * batch_size)))


def build_dataset(cfg: JobConfig, plan_files: list[str], *, run: protocol.Run, ckpt: CheckpointInfo, pass_no: int = 1,
                  images: int = 0):
    """plan rows (``images`` of them) -> decoded images -> output rows (+ shard_id) -> part files
    written by the workers: a lazy Ray Dataset of :data:`parts.PART_SCHEMA` rows."""
    import ray

    actors = pool_size(cfg, ray.cluster_resources())
    rows = block_rows(cfg.batch_size, images, actors)
    ds = ray.data.read_parquet(plan_files, filesystem=_pyarrow_fs(run.output))
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=decode_kwargs(cfg, ckpt),
        batch_size=rows,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.max_concurrent_reads),
        max_retries=DECODE_TASK_RETRIES,
        retry_exceptions=False,
    )
    use_gpu = cfg.num_gpus_per_actor > 0
    return ds.map_batches(
        PredictorActor,
        fn_constructor_args=(cfg.weights,),
        fn_constructor_kwargs=actor_kwargs(cfg, ckpt, run),
        batch_size=rows,
        batch_format="numpy",
        num_gpus=cfg.num_gpus_per_actor,
        num_cpus=cfg.num_cpus_per_actor,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_TASK_RETRIES,
        **model_actor_options(actors, overlap=use_gpu),
    ).map_batches(
        write_parts,
        fn_kwargs={"run": run, "pass_no": pass_no},
        batch_size=WRITE_BATCH_ROWS,
        batch_format="pyarrow",
        # serialising and one PUT a part: I/O bound, and never waiting for a CPU the actors hold
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=WRITE_TASKS),
        max_retries=DECODE_TASK_RETRIES,
        retry_exceptions=False,
    )


class RayData:
    """The product's execution: the stages as a Ray Dataset on the cluster (:func:`build_dataset`)."""

    def parts(self, cfg: JobConfig, plan_files: list[str], *, run: protocol.Run, ckpt: CheckpointInfo,
              pass_no: int, images: int) -> Iterator[pa.Table]:
        ds = build_dataset(cfg, plan_files, run=run, ckpt=ckpt, pass_no=pass_no, images=images)
        return ds.iter_batches(batch_format="pyarrow", batch_size=None)

    def finalizer(self):
        """``finalize_shard`` in a Ray task (the rows stay off the driver)."""
        return remote_finalize() or finalize_shard


class InProcess:
    """The same stages in this process, one batch at a time: the model actor is made once per
    run and settings and uses this process's torch threads."""

    def __init__(self):
        self.actors: dict = {}

    def parts(self, cfg: JobConfig, plan_files: list[str], *, run: protocol.Run, ckpt: CheckpointInfo,
              pass_no: int, images: int) -> Iterator[pa.Table]:
        key = (run.run_id, ckpt.sha256, cfg.settings)
        if key not in self.actors:
            self.actors[key] = PredictorActor(cfg.weights, **{**actor_kwargs(cfg, ckpt, run), "num_threads": None})
        actor = self.actors[key]
        for path in plan_files:
            plan = run.output.read_parquet(path)
            for start in range(0, plan.num_rows, cfg.batch_size):
                chunk = plan.slice(start, cfg.batch_size)
                batch = {c: np.array(chunk.column(c).to_pylist(), dtype=object) for c in chunk.column_names}
                yield write_parts(actor(decode_batch(batch, **decode_kwargs(cfg, ckpt))), run=run, pass_no=pass_no)

    def finalizer(self):
        return finalize_shard
