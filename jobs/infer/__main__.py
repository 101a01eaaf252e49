"""``python -m jobs.infer --input URI --output URI --weights PATH_OR_URI [options]``.

Runs on the Ray cluster named by RAY_ADDRESS (``ray job submit --working-dir . --
python -m jobs.infer ...``) or, without it, on an embedded local Ray. Exit status 0 on
success (per-image failures are error rows, not failures), 2 on an infrastructure or
usage error (storage unreachable, bad credentials, missing or corrupt weights, most reads
failing part-way through: the same command resumes the run), with a one-line message on
stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from jobs.infer.commit.protocol import DEFAULT_SHARD_SIZE
from jobs.infer.execute.decode import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS
from jobs.infer.errors import JobError
from jobs.infer.pipeline import DECODE_MODES, DEFAULT_MAX_CONCURRENT_READS, JobConfig, run_job, settings_of
from jobs.infer.plan.listing import DEFAULT_TARGET_PARTS as DEFAULT_LIST_TASKS
from jobs.storage import RetryPolicy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="image prefix/directory or list file (s3://... or local)")
    p.add_argument("--output", required=True, help="output root (s3://... or local)")
    p.add_argument("--weights", required=True,
                   help="checkpoint path or URI: ours, a torchvision state_dict, or Detectron2's (.pth, zoo .pkl)")
    p.add_argument("--model-config", default=None,
                   help="a Detectron2 checkpoint's YAML config, _BASE_ files included (default: Detectron2's "
                        "defaults); its test sizes, anchors, thresholds, pixel mean/std and input format apply")
    p.add_argument("--class-names", default=None,
                   help="file of class names for labels 1, 2, ... (one a line, or a JSON list), for a model "
                        "whose file does not name its classes (default: the checkpoint's, COCO's for a COCO "
                        "model, else the label numbers)")
    p.add_argument("--full", action="store_true", help="process every image, not only new or changed ones")
    p.add_argument("--num-actors", type=int, default=None,
                   help="model actors (default: as many as the cluster's GPUs, or CPUs, hold)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per actor; 0 = CPU actors")
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0,
                   help="CPUs per actor (torch threads on CPU; one replica per core outruns one replica on many)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="keep instances scoring above this (default: the checkpoint's own threshold)")
    p.add_argument("--max-instances", type=int, default=None,
                   help="instances kept per image, the highest scores (default: the checkpoint's own)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="the model's arithmetic (default: bf16 on GPU actors, fp32 on CPU actors; bf16 on CPU "
                        "actors needs AVX512_BF16 or AMX, fp16 a GPU). Like the three flags here, changing it "
                        "gives every image a new result: the next run reprocesses all")
    p.add_argument("--decode", choices=DECODE_MODES, default="sized",
                   help="sized (default): a JPEG over twice the model's input is decoded DCT-downscaled to at "
                        "least that input (rows and masks stay full-size); full: every image at full size; "
                        "device: the model actor decodes JPEGs on its device (nvJPEG on GPU actors) and the "
                        "CPU tasks only read bytes. An output setting like --precision")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT)
    p.add_argument("--images-per-shard", type=int, default=DEFAULT_SHARD_SIZE, help="target rows per output file")
    p.add_argument("--read-attempts", type=int, default=RetryPolicy.attempts,
                   help="tries per read, listing page and stat while the store answers as unavailable "
                        "(throttling, 5xx, timeouts, connection errors)")
    p.add_argument("--read-backoff", type=float, default=RetryPolicy.base_s,
                   help="seconds: retry i waits a random time up to min(%(default)s * 2**i, 30)")
    p.add_argument("--list-tasks", type=int, default=DEFAULT_LIST_TASKS,
                   help="list an S3 prefix split on its common prefixes into about this many parts, and an "
                        "inventory's data files one per part, in Ray tasks; 0 lists the whole input in one task")
    p.add_argument("--max-concurrent-reads", type=int, default=DEFAULT_MAX_CONCURRENT_READS,
                   help="decode tasks at once, cluster-wide: each reads one object at a time, so this caps the "
                        "GETs in flight (the default stays within S3's 5,500 GET/s of a partitioned prefix "
                        "at 100 ms per GET)")
    p.add_argument("--passes", type=int, default=JobConfig.passes,
                   help="passes over the images whose reads still failed in storage; the last pass "
                        "commits them as error rows that the next run plans again")
    p.add_argument("--run-id", default=None, help="resume or create this run id")
    p.add_argument("--break-lock", action="store_true",
                   help="take the output's writer lease over at once (only when the run holding it is gone)")
    p.add_argument("--report", action="store_true",
                   help="when the run finishes, write its HTML report to OUTPUT/_runs/<run_id>/report.html")
    return p


def parse_args(argv=None) -> JobConfig:
    p = build_parser()
    return _config(p, p.parse_args(argv))


def _config(p: argparse.ArgumentParser, a: argparse.Namespace) -> JobConfig:
    # --report is not part of the run's parameters: adding it to a rerun still resumes the run.
    for name in ("num_actors", "batch_size", "images_per_shard", "max_pixels", "read_attempts", "passes",
                 "max_concurrent_reads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.list_tasks < 0:
        p.error("--list-tasks must be >= 0")
    if a.num_gpus_per_actor < 0 or a.num_cpus_per_actor <= 0:
        p.error("--num-gpus-per-actor must be >= 0 and --num-cpus-per-actor > 0")
    if a.read_backoff < 0:
        p.error("--read-backoff must be >= 0")
    cfg = JobConfig(
        input=a.input, output=a.output, weights=a.weights, model_config=a.model_config, class_names=a.class_names,
        full=a.full, num_actors=a.num_actors,
        num_gpus_per_actor=a.num_gpus_per_actor, num_cpus_per_actor=a.num_cpus_per_actor,
        batch_size=a.batch_size, max_pixels=a.max_pixels, max_aspect=a.max_aspect,
        images_per_shard=a.images_per_shard, run_id=a.run_id, break_lock=a.break_lock,
        read_retry=RetryPolicy(attempts=a.read_attempts, base_s=a.read_backoff), passes=a.passes,
        max_concurrent_reads=a.max_concurrent_reads, list_tasks=a.list_tasks,
        score_thresh=a.score_thresh, max_instances=a.max_instances, precision=a.precision,
        decode=a.decode,
    )
    try:
        settings_of(cfg)  # the output settings' checks, as usage errors before Ray starts
    except ValueError as e:
        p.error(str(e))
    return cfg


def embedded_num_cpus() -> int:
    """Logical CPUs of the embedded Ray: one more than the machine's cores, so the pool holds
    one single-threaded model actor per core and the light decode tasks still find a slot."""
    return len(os.sched_getaffinity(0)) + 1


def init_ray() -> None:
    """Connect to RAY_ADDRESS (``ray job submit`` sets it) or start an embedded local Ray.

    Ray's start-up banner, Ray Data's execution logs and its per-operator progress bars stay
    in Ray's log files (warnings still show): the job shows its own progress in images
    (:class:`Progress`), one line redrawn on a terminal, lines in a log.
    """
    import ray

    quiet = {"logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        try:
            ray.init(num_cpus=embedded_num_cpus(), **quiet)
        except ValueError:  # a local cluster started with `ray start` was found: use it as it is
            ray.init(**quiet)
    import ray.data  # configures its loggers when imported: adjust them after that

    # Ray Data draws bars when stdout is a terminal (off: Progress draws the job's line there),
    # else logs progress at INFO: on the console only warnings, while its log files
    # (ray-data*.log) keep everything
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    # Ray Data's note that a tiny input keeps some of the pool's actors idle
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")


class Progress:
    """The run's progress for a person: images committed and done (their results written in part
    files, not yet committed), the rate and the time left, as
    ``jobs.infer: 24/50 images committed, 36 done, 3.1 images/s, about 5 s left (12 s)``.

    On a terminal one line redrawn in place (Ray Data's bars are off then, ``init_ray``); in a
    log (a file, ``ray job submit``) a line after each commit and at most every ``every_s``
    seconds while images get done."""

    def __init__(self, stream=None, *, every_s: float = 10.0, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.every_s = 0.5 if self.tty else every_s
        self.t0 = time.time()
        self.first_done = None  # (time, done) when the first results came: the rate counts from there,
        # not from the plan (the model actors' start would weigh on it for the whole run)
        self.last = (-1, -1)  # (committed, done) last shown
        self.last_t = 0.0

    def __call__(self, *, committed: int, done: int, total: int) -> None:
        now = time.time()
        if self.first_done is None and done:
            self.first_done = (now, done)
        if committed == self.last[0] and (done == self.last[1] or now - self.last_t < self.every_s):
            return
        self.last, self.last_t = (committed, done), now
        rate = None
        if self.first_done is not None and now > self.first_done[0] and done > self.first_done[1]:
            rate = (done - self.first_done[1]) / (now - self.first_done[0])
        line = self.line(committed, done, total, now - self.t0, rate)
        if self.tty:
            end = "\n" if committed >= total else ""
            print(f"\r\x1b[K{line}", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    @staticmethod
    def line(committed: int, done: int, total: int, elapsed: float, rate: float | None) -> str:
        """``rate``: images done a second since the first results (None: not known yet)."""
        if done >= total:
            rest = ""
        elif rate:
            rest = f", about {_duration((total - done) / rate)} left"
        else:
            rest = ", starting" if not done else ""
        speed = f", {rate:.1f} images/s" if rate else ""
        return f"jobs.infer: {committed}/{total} images committed, {done} done{speed}{rest} ({elapsed:.0f} s)"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def _reason(e: JobError) -> str:
    """The error's own message on one line; for one raised in a Ray task, without Ray's traceback."""
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError's
    return " ".join(str(cause if isinstance(cause, JobError) else e).split())


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = _config(p, args)
    import ray

    started = False
    if not ray.is_initialized():
        init_ray()
        started = True
    try:
        summary, manifest = run_job(cfg, progress=Progress())
    except JobError as e:  # the contract's errors; anything else is a bug: its traceback, exit 1
        print(f"jobs.infer: error: {_reason(e)}", file=sys.stderr)
        return 2
    finally:
        if started:
            ray.shutdown()
    print(summary.format())
    if args.report:
        from jobs.report import write_report

        try:
            print(f"report: {write_report(cfg.output, run_id=summary.run_id)}")
        except Exception as e:  # the rows are committed; a report failure must not fail the job
            print(f"jobs.infer: report not written: {' '.join(str(e).split())}", file=sys.stderr)
    print(json.dumps({"run_id": summary.run_id, "rows": manifest["rows"], **summary.to_dict()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
