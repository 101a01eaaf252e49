"""The Ray Data inference job: plan on the driver, decode + model in Ray, commit per shard.

Flow (the same as ``tests/_infer_fake_job.py``, with the model in Ray Data):

1. ``begin_run`` (resumes the same command's unfinished run), read the committed state,
   stream the listing through ``plan_work`` and ``make_shards``.
2. Shards already staged by a killed attempt are committed at once. The others' items
   are written, in chunks of ``PLAN_CHUNK_ROWS`` rows, to a plan manifest
   ``_staging/<run_id>/plan-<uuid>/plan-NNNNN.parquet`` (uri, etag, size, error,
   shard_id): the driver never holds the listing in one Python list, only a
   shard_id -> row count map and one chunk.
3. ``read_parquet(plan)`` -> ``map_batches(decode_batch)`` (CPU tasks; ``num_cpus``
   differs from the model stage so Ray does not fuse decoding into the actor) ->
   ``map_batches(PredictorActor, compute=ActorPoolStrategy(size=n))``.
4. The driver streams the result rows (``iter_batches``), collects them per shard and,
   when a shard is complete, stages and commits it (``commit.Run``). A kill at any point
   leaves only whole committed shards; the rerun resumes the run and plans them out.
5. Summary (printed, ``_runs/<run_id>/summary.json``), manifest and ``_SUCCESS``.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import commit
from .decode import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS
from .lock import LockedError, WriterLease
from .model_stage import SHARD_COLUMN, PredictorActor, decode_batch
from .storage import SourceObject, join, list_inputs, resolve
from .summary import RunSummary

log = logging.getLogger(__name__)

PLAN_CHUNK_ROWS = 50_000
# Rows per block between the plan and the model: a plan file reads as one block, which would
# make one decode task feed every actor; blocks of a few batches spread the work over the
# decode tasks and the actor pool, and stay cheap to schedule.
BLOCK_BATCHES = 4
PLAN_SCHEMA = pa.schema(
    [("uri", pa.string()), ("etag", pa.string()), ("size", pa.int64()), ("error", pa.string()), (SHARD_COLUMN, pa.string())]
)


class InfraError(RuntimeError):
    """A failure of the job's environment (storage, weights), not of one image."""


@dataclass
class JobConfig:
    input: str
    output: str
    weights: str
    full: bool = False
    num_actors: int | None = None  # None: sized from the cluster (pool_size)
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    batch_size: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT
    images_per_shard: int = commit.DEFAULT_SHARD_SIZE
    run_id: str | None = None
    decode_cpus: float = 0.5
    break_lock: bool = False


def checkpoint_identity(weights: str) -> tuple[str, str]:
    """(sha256 of the checkpoint file, model name); fails fast on missing/corrupt weights."""
    from mrcnn.checkpoint import read_metadata

    try:
        fs, path = resolve(weights)
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        meta = read_metadata(weights)
    except FileNotFoundError:
        raise InfraError(f"checkpoint not found: {weights}") from None
    except Exception as e:  # noqa: BLE001  (unreadable, not a checkpoint, no access)
        raise InfraError(f"cannot load checkpoint {weights}: {' '.join(str(e).split())}") from None
    return h.hexdigest(), str(meta.get("architecture"))


def _check_input(uri: str) -> None:
    try:
        fs, path = resolve(uri)
        if not fs.exists(path):
            raise InfraError(f"input not found: {uri}")
    except InfraError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InfraError(f"cannot reach input {uri}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def _write_plan(run: commit.Run, shards: Iterator[commit.Shard], summary: RunSummary) -> tuple[list[str], dict[str, int]]:
    """Commit already-staged shards; write the others' items to plan files.

    Returns (plan file paths, shard_id -> item count of the shards to compute).
    """
    fs, root = resolve(run.output_uri)
    plan_dir = join(root, commit.STAGING_DIR, run.run_id, f"plan-{uuid.uuid4().hex[:8]}")
    files: list[str] = []
    expected: dict[str, int] = {}
    cols: dict[str, list] = {k: [] for k in PLAN_SCHEMA.names}

    def flush() -> None:
        if not cols["uri"]:
            return
        path = join(plan_dir, f"plan-{len(files):05d}.parquet")
        table = pa.Table.from_pydict(cols, schema=PLAN_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        commit.write_atomic(fs, path, sink.getvalue().to_pybytes())
        files.append(path)
        for v in cols.values():
            v.clear()

    for shard in shards:
        if run.is_staged(shard):
            summary.add_shard(run.read_staged(shard.shard_id), reused=True)
            run.commit(shard.shard_id)
            continue
        expected[shard.shard_id] = len(shard.items)
        for o in shard.items:
            cols["uri"].append(o.uri)
            cols["etag"].append(o.etag)
            cols["size"].append(-1 if o.size is None else o.size)
            cols["error"].append(o.error)
            cols[SHARD_COLUMN].append(shard.shard_id)
        if len(cols["uri"]) >= PLAN_CHUNK_ROWS:
            flush()
    flush()
    return files, expected


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


def _pyarrow_fs(output_uri: str):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = resolve(output_uri)
    return PyFileSystem(FSSpecHandler(fs))


def build_dataset(cfg: JobConfig, plan_files: list[str], *, run_id: str, checkpoint_sha256: str, model_name: str):
    """plan rows -> decoded images -> output rows (+ shard_id), as a lazy Ray Dataset."""
    import ray

    ds = ray.data.read_parquet(plan_files, filesystem=_pyarrow_fs(cfg.output))
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * BLOCK_BATCHES)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"max_pixels": cfg.max_pixels, "max_aspect": cfg.max_aspect},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
    )
    use_gpu = cfg.num_gpus_per_actor > 0
    return ds.map_batches(
        PredictorActor,
        fn_constructor_args=(cfg.weights,),
        fn_constructor_kwargs={
            "model_name": model_name,
            "checkpoint_sha256": checkpoint_sha256,
            "run_id": run_id,
            "device": "cuda" if use_gpu else "cpu",
            "micro_batch": cfg.batch_size,
            "num_threads": None if use_gpu else max(1, int(cfg.num_cpus_per_actor)),
        },
        compute=ray.data.ActorPoolStrategy(size=pool_size(cfg, ray.cluster_resources()), max_tasks_in_flight_per_actor=2),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=cfg.num_gpus_per_actor,
        num_cpus=cfg.num_cpus_per_actor,
    )


def _commit_results(run: commit.Run, batches, expected: dict[str, int], summary: RunSummary,
                    may_commit=lambda: None, progress=None) -> None:
    """Group streamed result rows by shard; stage + commit each shard once it is complete.

    ``may_commit()`` runs before each commit and raises when this run must stop committing;
    ``progress(images committed, images to commit)`` after each commit.
    """
    total, committed = sum(expected.values()), 0
    pending: dict[str, list[pa.Table]] = {}
    counts: dict[str, int] = {}
    done: set[str] = set()
    for batch in batches:
        sids = batch.column(SHARD_COLUMN)
        for sid in set(sids.to_pylist()):
            if sid in done:
                continue  # a re-executed block repeating rows of a committed shard
            if sid not in expected:
                raise RuntimeError(f"result row for unknown shard {sid}")
            part = batch.filter(pc.equal(sids, sid)).drop_columns([SHARD_COLUMN])
            pending.setdefault(sid, []).append(part)
            counts[sid] = counts.get(sid, 0) + part.num_rows
            if counts[sid] >= expected[sid]:
                table = pa.concat_tables(pending.pop(sid))
                if table.num_rows > expected[sid]:
                    # A retried task must not give an image two rows: keep the first.
                    seen: set[str] = set()
                    keep = [not (u in seen or seen.add(u)) for u in table.column("image_uri").to_pylist()]
                    table = table.filter(pa.array(keep))
                items = tuple(
                    SourceObject(u, e, s)
                    for u, e, s in zip(*(table.column(c).to_pylist() for c in ("image_uri", "source_etag", "source_size")))
                )
                shard = commit.Shard(sid, items)
                run.stage(shard, table)
                may_commit()
                run.commit(sid)
                summary.add_shard(table)
                committed += expected.pop(sid)
                del counts[sid]
                done.add(sid)
                if progress is not None:
                    progress(committed, total)
    if expected:
        raise RuntimeError(f"{len(expected)} shards got no complete results: {sorted(expected)[:3]}...")


def _output_error(output: str, e: Exception) -> InfraError:
    return InfraError(f"cannot write to output {output}: {type(e).__name__}: {' '.join(str(e).split())}")


def run_job(cfg: JobConfig, progress=None) -> tuple[RunSummary, dict]:
    """One invocation of the job (starts or resumes a run); returns (summary, manifest).

    ``progress(images committed, images to process)`` is called once the plan is made and
    after each committed shard.

    The run holds the output's writer lease (``lock.WriterLease``) from before it picks its
    run id until it has finished: a second run on the same output stops with LockedError.
    """
    checkpoint_sha256, model_name = checkpoint_identity(cfg.weights)
    _check_input(cfg.input)
    params = {
        "input": cfg.input,
        "checkpoint_sha256": checkpoint_sha256,
        "model": model_name,
        "full": cfg.full,
        "max_pixels": cfg.max_pixels,
        "max_aspect": cfg.max_aspect,
    }
    lease = WriterLease(cfg.output, f"jobs.infer --input {cfg.input}", break_lock=cfg.break_lock)
    try:
        lease.acquire()
    except LockedError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    try:
        return _run_holding_lease(cfg, params, lease, checkpoint_sha256, model_name, progress)
    finally:
        lease.release()


def _run_holding_lease(cfg: JobConfig, params: dict, lease: WriterLease, checkpoint_sha256: str, model_name: str,
                       progress=None):
    try:
        run = commit.begin_run(cfg.output, params, run_id=cfg.run_id)
    except (ValueError, RuntimeError):
        raise  # a run id that does not fit these parameters: the message says so
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    lease.info["run"] = run.run_id
    summary = RunSummary(run.run_id, resumed=run.resumed)
    stats = commit.PlanStats()
    state = commit.committed_state(cfg.output, run_id=run.run_id)
    items = commit.plan_work(list_inputs(cfg.input), state, checkpoint_sha256, cfg.full, run_id=run.run_id, stats=stats)
    shards = commit.make_shards(items, checkpoint_sha256=checkpoint_sha256, target_size=cfg.images_per_shard)
    plan_files, expected = _write_plan(run, shards, summary)
    summary.add_plan(stats)
    if progress is not None:
        progress(0, sum(expected.values()))
    if plan_files:
        ds = build_dataset(cfg, plan_files, run_id=run.run_id, checkpoint_sha256=checkpoint_sha256, model_name=model_name)
        _commit_results(run, ds.iter_batches(batch_format="pyarrow", batch_size=None), expected, summary, lease.check,
                        progress)
    lease.check()
    summary.finish().write(cfg.output)
    manifest = run.finish()
    return summary, manifest
