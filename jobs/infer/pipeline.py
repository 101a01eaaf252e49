"""The Ray Data inference job: plan on the driver, decode + model in Ray, commit per shard.

Flow (the same as ``tests/_infer_fake_job.py``, with the model in Ray Data):

1. ``begin_run`` (resumes the same command's unfinished run), fold a killed attempt's commits
   into the state table (``state.fold``), and plan by hash bucket in Ray tasks
   (``planner.make_plan``): the listing and the state meet bucket by bucket, and the plan is
   written as Parquet files of items with their shard (``schema.PLAN_SCHEMA``). The driver
   holds paths and a shard_id -> item count map, never an object or a state row.
2. Shards already staged by a killed attempt are committed at once.
3. ``read_parquet(plan)`` -> ``map_batches(decode_batch)`` (CPU tasks; ``num_cpus``
   differs from the model stage so Ray does not fuse decoding into the actor) ->
   ``map_batches(PredictorActor, compute=ActorPoolStrategy(size=n))`` ->
   ``map_batches(parts.write_parts)`` (tasks writing the rows, by shard, to part files).
4. The driver streams the part rows (``iter_batches``: shard, part file, rows, storage
   failures; never a result row) and, when a shard's parts hold all its images, has a Ray
   task assemble and stage it (``parts.finalize_shard``), then commits it (``protocol.Run``).
   A kill at any point leaves only whole committed shards; the rerun resumes the run and
   plans them out. A shard holding storage failures (``schema.RETRYABLE_ERROR_KINDS``, after
   the reads' own retries) is not committed in the first pass: its good rows are kept in a
   part file, and once the stream ends its failed images go through the pipeline again
   (``JobConfig.passes``); only the last pass commits what still fails, as rows the next run
   plans again. :class:`StorageHealth` watches the parts as they are written and stops the
   run (:class:`StorageOutage`, exit 2) when most reads fail, before any of theirs is committed.
5. Summary (printed, ``_runs/<run_id>/summary.json``), the state folded again (``state.finish_run``:
   it also checks the run holds no image twice and gives the manifest its files), manifest and
   ``_SUCCESS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Optional

from jobs.infer import schema
from jobs.infer.commit import protocol, state
from jobs.infer.commit.lock import WriterLease
from jobs.infer.config import JobConfig
from jobs.infer.errors import InfraError, LockedError, StorageOutage
from jobs.infer.execute.parts import finalize_shard, remote_finalize, write_parts
from jobs.infer.execute.stages import PredictorActor, decode_batch
from jobs.infer.plan.planner import ListingError, make_plan, write_shards_plan
from jobs.infer.schema import SHARD_COLUMN, SourceObject
from jobs.infer.summary import RunSummary
from jobs.storage import describe_error, resolve

log = logging.getLogger(__name__)

# Rows per block between the plan and the model: a plan file reads as one block, which would
# make one decode task feed every actor; blocks of a few batches spread the work over the
# decode tasks and the actor pool, and stay cheap to schedule.
BLOCK_BATCHES = 4
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



class StorageHealth:
    """Watches result rows as they arrive; :meth:`check` raises :class:`StorageOutage` when,
    over the last ``window`` images, at least ``min_failures`` and at least ``fraction`` of
    them failed in storage (``schema.RETRYABLE_ERROR_KINDS``): the store is down or the
    credentials are gone, and the images are not to blame."""

    def __init__(self, window: int = 200, fraction: float = 0.5, min_failures: int = 10):
        if window < 1 or not 0 < fraction <= 1 or min_failures < 1:
            raise ValueError("StorageHealth needs window >= 1, 0 < fraction <= 1, min_failures >= 1")
        self.recent: deque[bool] = deque(maxlen=window)
        self.fraction, self.min_failures = fraction, min_failures
        self.failures, self.example = 0, ""

    def observe(self, images: int, failures: int, example: str | None = None) -> None:
        """``images`` more results, ``failures`` of them failed in storage (``example``: one of those)."""
        for i in range(images):
            failed = i < failures
            if len(self.recent) == self.recent.maxlen:
                self.failures -= self.recent[0]
            self.recent.append(failed)
            self.failures += failed
        if failures and example:
            self.example = example

    def check(self) -> None:
        n = len(self.recent)
        if self.failures >= self.min_failures and self.failures >= self.fraction * n:
            raise StorageOutage(
                f"storage failing: {self.failures} of the last {n} images could not be read ({self.example}); "
                "their rows were not committed: run the same command again once the store answers")


@dataclass(frozen=True)
class CheckpointInfo:
    sha256: str  # the model's identity: the weights file's sha256, or that and its config and names'
    model_name: str
    model_input: tuple[int, int]  # (min_size, max_size) the model resizes images to
    keypoint_names: Optional[tuple[str, ...]] = None  # a keypoint model's, in the order of its outputs
    keypoint_skeleton: Optional[tuple[tuple[int, int], ...]] = None
    class_names: Optional[tuple[str, ...]] = None  # from --class-names: one per label, the background first
    class_names_source: str = "checkpoint"  # where label_name comes from: checkpoint, coco, file or numbered

    def file_metadata(self) -> dict:
        """Key-value metadata of every output file the model's rows go to."""
        out = {}
        if self.keypoint_names is not None:
            out[schema.KEYPOINT_NAMES_KEY] = json.dumps(list(self.keypoint_names)).encode()
        if self.keypoint_skeleton is not None:
            out[schema.KEYPOINT_SKELETON_KEY] = json.dumps([list(p) for p in self.keypoint_skeleton]).encode()
        return out


def checkpoint_identity(weights: str, model_config: str | None = None, class_names: str | None = None) -> CheckpointInfo:
    """The model's identity, name and input size; fails fast on missing/corrupt weights, config or
    names. The identity is the weights file's sha256; with a Detectron2 config or a class names
    file, the sha256 of that and of the settings the config resolves to and the names, so that
    a run with another config or other names writes (and the next run plans) other results."""
    from mrcnn.checkpoint import read_metadata
    from mrcnn.coco_categories import COCO_CATEGORY_NAMES

    try:
        fs, path = resolve(weights)
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except FileNotFoundError:
        raise InfraError(f"checkpoint not found: {weights}") from None
    except Exception as e:  # noqa: BLE001  (no access, storage failing)
        raise InfraError(f"cannot load checkpoint {weights}: {' '.join(str(e).split())}") from None
    try:
        meta = read_metadata(weights, model_config)
    except FileNotFoundError as e:  # the model config or one of its _BASE_ files: the message names it
        raise InfraError(" ".join(str(e).split())) from None
    except Exception as e:  # noqa: BLE001  (unreadable, not a checkpoint, a config refused)
        raise InfraError(f"cannot load checkpoint {weights}: {' '.join(str(e).split())}") from None
    names = read_class_names(class_names, int(meta["num_classes"])) if class_names else None
    sha = h.hexdigest()
    if model_config or names:
        described = {"weights": sha, "model": meta.get("builder_kwargs") if model_config else None, "class_names": names}
        sha = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    if names:
        source = "file"
    elif meta.get("class_names"):
        source = meta.get("class_names_source") or "checkpoint"
    else:  # the Predictor's rule: COCO's names for a 91-class model, else the label numbers
        source = "coco" if int(meta.get("num_classes") or 0) == len(COCO_CATEGORY_NAMES) else "numbered"
    kp_names, skeleton = meta.get("keypoint_names"), meta.get("keypoint_skeleton")
    return CheckpointInfo(sha, str(meta.get("architecture")), model_input_size(meta),
                          None if kp_names is None else tuple(str(n) for n in kp_names),
                          None if skeleton is None else tuple((int(a), int(b)) for a, b in skeleton),
                          None if names is None else tuple(names), source)


def read_class_names(uri: str, num_labels: int) -> list[str]:
    """``--class-names``: a text file of one name per line for labels 1, 2, ... (the background,
    label 0, has none), or a JSON list of them; the model's labels and the names must match."""
    try:
        fs, path = resolve(uri)
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise InfraError(f"class names file not found: {uri}") from None
    if text.lstrip().startswith("["):
        try:
            names = [str(n) for n in json.loads(text)]
        except ValueError as e:
            raise InfraError(f"{uri}: not a JSON list of names: {e}") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_labels - 1:
        raise InfraError(f"{uri}: {len(names)} class names, but the model has {num_labels - 1} labels (1.."
                         f"{num_labels - 1}; the background has no name)")
    return ["background"] + names


def model_input_size(meta: dict) -> tuple[int, int]:
    """(min_size, max_size) of GeneralizedRCNNTransform at inference, from checkpoint metadata
    (torchvision's defaults for a plain state_dict)."""
    min_size = meta.get("min_size", 800)
    if isinstance(min_size, (list, tuple)):
        min_size = min_size[-1]  # torchvision uses the last one at inference
    return int(min_size), int(meta.get("max_size", 1333))


def _check_input(uri: str) -> None:
    try:
        fs, path = resolve(uri)
        if not fs.exists(path):
            raise InfraError(f"input not found: {uri}")
    except InfraError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InfraError(f"cannot reach input {uri}: {describe_error(e)}") from None


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


def build_dataset(cfg: JobConfig, plan_files: list[str], *, run: protocol.Run, ckpt: CheckpointInfo, pass_no: int = 1):
    """plan rows -> decoded images -> output rows (+ shard_id) -> part files written by the
    workers: a lazy Ray Dataset of :data:`parts.PART_SCHEMA` rows."""
    import ray

    ds = ray.data.read_parquet(plan_files, filesystem=_pyarrow_fs(cfg.output))
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * BLOCK_BATCHES)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=decode_kwargs(cfg, ckpt),
        batch_size=cfg.batch_size,
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
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=cfg.num_gpus_per_actor,
        num_cpus=cfg.num_cpus_per_actor,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_TASK_RETRIES,
        **model_actor_options(pool_size(cfg, ray.cluster_resources()), overlap=use_gpu),
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


@dataclass
class Deferred:
    """A complete shard held back from commit because some of its reads failed in storage:
    ``kept`` are the part files of its final rows (``kept_rows`` of them), ``retry`` the items
    the next pass reads again."""

    kept: list[str]
    kept_rows: int
    retry: tuple[SourceObject, ...]


def _commit_results(run: protocol.Run, parts, expected: dict[str, int], summary: RunSummary, *,
                    final: bool = True, pass_no: int = 1, health: StorageHealth | None = None,
                    held: dict[str, Deferred] | None = None, finalize=finalize_shard,
                    may_commit=lambda: None, progress=None) -> dict[str, Deferred]:
    """Follow the part files the workers write (batches of :data:`parts.PART_SCHEMA` rows); once a
    shard's parts hold all its images, have it assembled and staged (``finalize``) and commit it.

    ``expected``: shard_id -> images to come in this pass; ``held``: the shards deferred by the
    previous pass, whose kept rows complete the ones this pass computes again. Unless ``final``,
    a complete shard with storage failures is not committed but returned, by shard_id, for
    another pass. ``health`` sees every part as it is written and stops the run on an outage.
    ``may_commit()`` runs before each commit and raises when this run must stop committing;
    ``progress(done, committed)`` gets the images of each new part (done) and of each commit.
    The driver sees part rows only, never result rows (``summary.part_rows`` counts them).
    """
    held = held or {}
    parts_of: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    done: set[str] = set()
    deferred: dict[str, Deferred] = {}
    for batch in parts:
        summary.part_rows += batch.num_rows
        for part in batch.to_pylist():
            sid = part[SHARD_COLUMN]
            if sid in done or part["part"] in parts_of.get(sid, ()):
                continue  # a re-executed task writing a part again
            if sid not in expected:
                raise RuntimeError(f"result part for unknown shard {sid}")
            if health is not None:
                health.observe(part["rows"], part["storage_failures"], part["failure"])
                health.check()
            parts_of.setdefault(sid, []).append(part["part"])
            counts[sid] = counts.get(sid, 0) + part["rows"]
            if progress is not None:
                progress(part["rows"], 0)
            if counts[sid] < expected[sid]:
                continue
            h = held.get(sid)
            kept_rows = h.kept_rows if h else 0
            result = finalize(run, sid, parts_of[sid], expected[sid] + kept_rows, final=final, pass_no=pass_no,
                              kept=h.kept if h else ())
            if "missing" in result:  # parts of a re-executed task overlap: more are to come
                counts[sid] = expected[sid] - result["missing"]
                continue
            expected.pop(sid)
            del counts[sid], parts_of[sid]
            done.add(sid)
            if "deferred" in result:
                deferred[sid] = Deferred(result["deferred"], result["kept_rows"], result["retry"])
                summary.deferred += len(result["retry"])
                continue
            may_commit()
            run.commit(sid)
            summary.add_shard(result["counts"])
            if progress is not None:
                progress(0, result["counts"]["rows"])
    if expected:
        raise RuntimeError(f"{len(expected)} shards got no complete results: {sorted(expected)[:3]}...")
    return deferred


def _output_error(output: str, e: Exception) -> InfraError:
    return InfraError(f"cannot write to output {output}: {describe_error(e)}")


def run_job(cfg: JobConfig, progress=None) -> tuple[RunSummary, dict]:
    """One invocation of the job (starts or resumes a run); returns (summary, manifest).

    ``progress(committed=, done=, total=)`` (images committed, images whose results are written
    in part files, images to process) is called once the plan is made, as parts are written
    and after each committed shard.

    The run holds the output's writer lease (``lock.WriterLease``) from before it picks its
    run id until it has finished: a second run on the same output stops with LockedError.
    """
    settings = cfg.settings
    ckpt = checkpoint_identity(cfg.weights, cfg.model_config, cfg.class_names)
    _check_input(cfg.input)
    params = {
        "input": cfg.input,
        "checkpoint_sha256": ckpt.sha256,
        "model": ckpt.model_name,
        "full": cfg.full,
        "max_pixels": cfg.max_pixels,
        "max_aspect": cfg.max_aspect,
    }
    for name in ("model_config", "class_names"):  # only when given: the resume of runs without them is unchanged
        if getattr(cfg, name):
            params[name] = getattr(cfg, name)
    if settings is not None:  # runs without settings keep the parameters (and so the resume) of before
        params["settings"] = settings
    lease = WriterLease(cfg.output, f"jobs.infer --input {cfg.input}", break_lock=cfg.break_lock)
    try:
        lease.acquire()
    except LockedError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    try:
        return _run_holding_lease(cfg, params, lease, ckpt, progress)
    finally:
        lease.release()


@contextlib.contextmanager
def _actor_start_failures():
    """A model actor that cannot start (no GPU, an extension without CUDA kernels, weights it
    cannot read) fails the run with its reason in one line, not with Ray's traceback."""
    from ray.exceptions import RayActorError

    try:
        yield
    except RayActorError as e:
        if not e.actor_init_failed:
            raise
        lines = [line.strip() for line in str(e.error_msg or "").splitlines() if line.strip()]
        raise InfraError(f"the model actors could not start: {lines[-1] if lines else e}") from None


def _run_holding_lease(cfg: JobConfig, params: dict, lease: WriterLease, ckpt: CheckpointInfo, progress=None):
    try:
        run = protocol.begin_run(cfg.output, params, run_id=cfg.run_id)
    except (ValueError, RuntimeError):
        raise  # a run id that does not fit these parameters: the message says so
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    run = dataclasses.replace(run, file_metadata=ckpt.file_metadata())
    lease.info["run"] = run.run_id
    summary = RunSummary(run.run_id, resumed=run.resumed)
    try:
        version = state.fold(cfg.output, check_run=run.run_id)  # a killed attempt's commits, if any
    except RuntimeError:
        raise  # an image committed twice in this run: the message says so
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    try:
        plan = make_plan(run, cfg.input, version, checkpoint_sha256=ckpt.sha256, full=cfg.full,
                         settings=cfg.settings, target_size=cfg.images_per_shard, list_tasks=cfg.list_tasks,
                         retry=cfg.read_retry)
    except ListingError as e:
        raise InfraError(f"input not found: {e}" if e.missing else f"cannot list input {cfg.input}: {e}") from None
    for sid, counts in plan.staged.items():  # staged by a killed attempt: committed as they are
        summary.add_shard(counts, reused=True)
        run.commit(sid)
    plan_files, expected = plan.files, plan.expected
    summary.add_plan(plan.stats)
    total, committed, done = sum(expected.values()), 0, 0

    def committed_more(more_done: int, more_committed: int) -> None:
        nonlocal committed, done
        committed += more_committed
        # a read retried in a later pass is done twice: never more than all
        done = min(total, max(done + more_done, committed))
        if progress is not None:
            progress(committed=committed, done=done, total=total)

    if progress is not None:
        progress(committed=0, done=0, total=total)
    health = StorageHealth(cfg.outage_window, cfg.outage_fraction, cfg.outage_min_failures)
    finalize = remote_finalize() or finalize_shard  # in a Ray task when Ray runs: rows stay off the driver
    held: dict[str, Deferred] = {}
    for pass_no in range(1, max(1, cfg.passes) + 1):
        if not plan_files:
            break
        summary.passes = pass_no
        ds = build_dataset(cfg, plan_files, run=run, ckpt=ckpt, pass_no=pass_no)
        with _actor_start_failures():
            held = _commit_results(run, ds.iter_batches(batch_format="pyarrow", batch_size=None), expected, summary,
                                   final=pass_no >= cfg.passes, pass_no=pass_no, health=health, held=held,
                                   finalize=finalize, may_commit=lease.check, progress=committed_more)
        # the next pass reads only the failed items, under their shard's id
        retry_shards = (protocol.Shard(sid, d.retry) for sid, d in held.items())
        plan_files, expected = write_shards_plan(run, retry_shards)
    lease.check()
    summary.finish().write(cfg.output)
    extra = {"class_names_source": ckpt.class_names_source}
    if ckpt.keypoint_names:
        extra.update(keypoint_names=list(ckpt.keypoint_names),
                     keypoint_skeleton=[list(p) for p in ckpt.keypoint_skeleton or ()])
    manifest = state.finish_run(run, extra)
    return summary, manifest
