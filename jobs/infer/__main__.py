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

from jobs.infer.config import JobConfig
from jobs.infer.errors import JobError
from jobs.infer.pipeline import run_job


def build_parser() -> argparse.ArgumentParser:
    """The flags of every :class:`JobConfig` setting (``config.py`` declares them), and
    ``--report``, which is not part of the run's parameters: adding it to a rerun still resumes
    the run."""
    p = JobConfig.add_arguments(argparse.ArgumentParser(prog="python -m jobs.infer",
                                                        description=__doc__.splitlines()[0]))
    p.add_argument("--report", action="store_true",
                   help="when the run finishes, write its HTML report to OUTPUT/_runs/<run_id>/report.html")
    return p


def parse_args(argv=None) -> JobConfig:
    p = build_parser()
    return JobConfig.from_arguments(p, p.parse_args(argv))


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
    cfg = JobConfig.from_arguments(p, args)
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
