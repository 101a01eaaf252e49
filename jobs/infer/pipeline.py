"""The batch job's driver: plan, run the stages (Ray Data on the cluster), commit per shard.

Flow:

1. ``begin_run`` (resumes the same command's unfinished run), fold a killed attempt's commits
   into the state table (``state.fold``), and plan by hash bucket in Ray tasks
   (``planner.make_plan``): the listing and the state meet bucket by bucket, and the plan is
   written as Parquet files of items with their shard (``schema.PLAN_SCHEMA``). The driver
   holds paths and a shard_id -> item count map, never an object or a state row.
2. Shards already staged by a killed attempt are committed at once.
3. The execution (``execution.RayData``; ``execution.InProcess`` for tests and benchmarks):
   ``read_parquet(plan)`` -> ``map_batches(decode_batch)`` (CPU tasks; ``num_cpus``
   differs from the model stage so Ray does not fuse decoding into the actor) ->
   ``map_batches(PredictorActor, compute=ActorPoolStrategy(size=n))`` ->
   ``map_batches(parts.write_parts)`` (tasks writing the rows, by shard, to part files).
4. The driver streams the part rows (``iter_batches``: shard, part file, rows, storage
   failures; never a result row) and, when a shard's parts hold all its images, has a Ray
   task assemble and stage it (``parts.finalize_shard``; ``collect.ShardCollector`` says when), then
   commits it (``protocol.Run``).
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
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from jobs.infer import schema
from jobs.infer.collect import ShardCollector
from jobs.infer.commit import protocol, state
from jobs.infer.commit.lock import WriterLease
from jobs.infer.config import JobConfig
from jobs.infer.errors import InfraError, LockedError, StorageOutage
from jobs.infer.execute.parts import Deferred, Incomplete, finalize_shard
from jobs.infer.execution import RayData
from jobs.infer.output import Output
from jobs.infer.plan.planner import ListingError, make_plan, write_shards_plan
from jobs.infer.schema import SHARD_COLUMN
from jobs.infer.summary import RunSummary
from jobs.storage import describe_error, resolve

log = logging.getLogger(__name__)


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


def commit_parts(run: protocol.Run, parts, collector: ShardCollector, summary: RunSummary, *, final: bool = True,
                 pass_no: int = 1, health: StorageHealth | None = None, finalize=finalize_shard,
                 may_commit=lambda: None, progress=None) -> dict[str, Deferred]:
    """Follow the part rows of one pass (batches of :data:`parts.PART_SCHEMA` rows); once a
    shard's parts hold all its images (``collector``), have it assembled and staged (``finalize``:
    in a Ray task when Ray runs) and commit it. Returns the shards deferred to the next pass.

    Unless ``final``, a complete shard with storage failures is not committed but deferred.
    ``health`` sees every part and stops the run on an outage; ``may_commit()`` runs before each
    commit and raises when this run must stop committing (the lease); ``progress(done,
    committed)`` gets the images of each new part and of each commit. The driver sees part rows
    only, never result rows (``summary.part_rows`` counts them).
    """
    deferred: dict[str, Deferred] = {}
    for batch in parts:
        summary.part_rows += batch.num_rows
        for part in batch.to_pylist():
            sid, path, rows = part[SHARD_COLUMN], part["part"], part["rows"]
            if collector.seen(sid, path):
                continue
            if health is not None:
                health.observe(rows, part["storage_failures"], part["failure"])
                health.check()
            if progress is not None:
                progress(rows, 0)
            shard = collector.add(sid, path, rows)
            if shard is None:
                continue
            result = finalize(run, sid, list(shard.parts), shard.images, final=final, pass_no=pass_no, kept=shard.kept)
            if isinstance(result, Incomplete):
                collector.incomplete(sid, result.missing)
                continue
            collector.finished(sid)
            if isinstance(result, Deferred):
                deferred[sid] = result
                summary.deferred += len(result.retry)
                continue
            may_commit()
            run.commit(sid)
            summary.add_shard(result.counts)
            if progress is not None:
                progress(0, result.counts["rows"])
    collector.check_all_done()
    return deferred


def _output_error(output: str, e: Exception) -> InfraError:
    return InfraError(f"cannot write to output {output}: {describe_error(e)}")


def run_job(cfg: JobConfig, progress=None, *, execution=None, on_step: protocol.OnStep = None) -> tuple[RunSummary, dict]:
    """One invocation of the job (starts or resumes a run); returns (summary, manifest).

    ``progress(committed=, done=, total=)`` (images committed, images whose results are written
    in part files, images to process) is called once the plan is made, as parts are written
    and after each committed shard. ``execution`` runs the stages (``execution.RayData()``, the
    default, or ``execution.InProcess()``); ``on_step``: the run's crash points
    (``protocol.Run.on_step``), for tests.

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
    output = Output(cfg.output)  # resolved once in this process (and once in each worker)
    lease = WriterLease(output, f"jobs.infer --input {cfg.input}", break_lock=cfg.break_lock)
    try:
        lease.acquire()
    except LockedError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    try:
        return _run_holding_lease(cfg, output, params, lease, ckpt, execution or RayData(), progress, on_step)
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


def _run_holding_lease(cfg: JobConfig, output: Output, params: dict, lease: WriterLease, ckpt: CheckpointInfo, execution,
                       progress=None, on_step: protocol.OnStep = None):
    try:
        run = protocol.begin_run(output, params, run_id=cfg.run_id, on_step=on_step)
    except (ValueError, RuntimeError):
        raise  # a run id that does not fit these parameters: the message says so
    except Exception as e:  # noqa: BLE001
        raise _output_error(cfg.output, e) from None
    run = dataclasses.replace(run, file_metadata=ckpt.file_metadata())
    lease.info["run"] = run.run_id
    summary = RunSummary(run.run_id, resumed=run.resumed)
    try:
        version = state.fold(output, check_run=run.run_id, on_step=on_step)  # a killed attempt's commits, if any
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
    summary.plan_s = time.time() - summary.started_at
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
    finalize = execution.finalizer()
    held: dict[str, Deferred] = {}
    for pass_no in range(1, max(1, cfg.passes) + 1):
        if not plan_files:
            break
        summary.passes = pass_no
        parts = execution.parts(cfg, plan_files, run=run, ckpt=ckpt, pass_no=pass_no, images=sum(expected.values()))
        with _actor_start_failures():
            held = commit_parts(run, parts, ShardCollector(expected, held), summary, final=pass_no >= cfg.passes, pass_no=pass_no,
                                health=health, finalize=finalize, may_commit=lease.check, progress=committed_more)
        # the next pass reads only the failed items, under their shard's id
        retry_shards = (protocol.Shard(sid, d.retry) for sid, d in held.items())
        plan_files, expected = write_shards_plan(run, retry_shards)
    lease.check()
    summary.finish().write(output)
    extra = {"class_names_source": ckpt.class_names_source}
    if ckpt.keypoint_names:
        extra.update(keypoint_names=list(ckpt.keypoint_names),
                     keypoint_skeleton=[list(p) for p in ckpt.keypoint_skeleton or ()])
    manifest = state.finish_run(run, extra)
    return summary, manifest
