"""The whole system on one machine: ``python -m jobs.demo`` (or ``bash scripts/demo.sh``).

1. starts a local S3-compatible endpoint (moto's server on 127.0.0.1) and a local Ray
   cluster with its job server;
2. writes a synthetic shapes archive (COCO format, a seed the shipped model never saw, plus
   two broken files) to a bucket;
3. takes the model: the checkpoint shipped in ``models/`` (trained by the project on
   synthetic shapes), ``--weights FILE``, or, with ``--train-iters N``, N iterations of
   ``jobs.train`` (submitted with ``ray job submit``) fine-tuning the shipped model on the
   archive's train split (``--from-scratch``: from random weights);
4. submits the batch job, ``jobs.infer``, over the bucket, then submits it again to show
   that an incremental run re-processes nothing;
5. evaluates the Parquet output against the archive's ground truth (``jobs.evaluate``; only
   the held-out val split when the demo trained on the rest) and prints mask and box AP;
6. renders overlays (``jobs.render``) and the run report (``jobs.report``), copies the output
   next to the rest (the S3 endpoint lives in memory) and prints where everything is.

The terminal shows one line per step with its time; what the services and jobs print goes to
``WORKDIR/logs/`` (named at the end). Everything lands under ``--workdir`` (default
``out/demo``). The endpoint and the Ray cluster are stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "shapes_r18_fpn3.pt"
BUCKET = "demo"
ARCHIVE_SEED = 2026  # the shipped model was trained on seed 0: this archive is new to it
ARCHIVE_SIZE = "128/160"  # image width/height range of the shipped model's training data
DUMMY_AWS = {  # moto accepts any credentials; these are not secrets
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo",
    "AWS_DEFAULT_REGION": "us-east-1",
}
STEPS = 6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(REPO / "out" / "demo"), help="where results land (default out/demo)")
    p.add_argument("--images", type=int, default=48, help="synthetic images in the archive")
    p.add_argument("--weights", default=None,
                   help=f"run this checkpoint (default: the shipped {SHIPPED_MODEL.relative_to(REPO)})")
    p.add_argument("--train-iters", type=int, default=0,
                   help="first train this many iterations on the archive (fine-tuning --weights or the shipped "
                        "model; a larger value later continues the same run)")
    p.add_argument("--from-scratch", action="store_true", help="with --train-iters: start from random weights")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    return p


# ----------------------------------------------------------------------------- terminal
class Steps:
    """Numbered one-line steps with timings; a live status while a long step runs."""

    def __init__(self, total: int):
        self.total, self.n, self.tty = total, 0, sys.stdout.isatty()
        self.title, self.t0, self.last_status = "", 0.0, 0.0

    def start(self, title: str) -> None:
        self.n += 1
        self.title, self.t0, self.last_status = title, time.time(), 0.0
        if not self.tty:
            print(f"[{self.n}/{self.total}] {title} ...", flush=True)

    def status(self, text: str) -> None:
        """Progress of the running step: rewritten in place on a terminal, every 15 s otherwise."""
        now = time.time()
        if self.tty:
            print(f"\r\033[K[{self.n}/{self.total}] {self.title} ... {text} ({now - self.t0:.0f} s)", end="", flush=True)
        elif now - self.last_status >= 15:
            print(f"      {text} ({now - self.t0:.0f} s)", flush=True)
            self.last_status = now

    def done(self, result: str = "") -> None:
        took = f"{time.time() - self.t0:.1f} s"
        line = f"[{self.n}/{self.total}] {self.title}" + (f": {result}" if result else "") + f"  ({took})"
        print(("\r\033[K" if self.tty else "") + line, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServices:
    """moto's S3 server and a Ray head with its job server, both on 127.0.0.1; logs in ``logs``."""

    def __init__(self, num_cpus: int, logs: Path):
        self.num_cpus, self.logs = num_cpus, logs
        self.bin = Path(sys.executable).parent
        self.moto = None
        self.ray_started = False
        self.env = dict(os.environ)
        # Jobs run `python -m ...` as submitted: the cluster must find this interpreter first.
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def __enter__(self):
        from moto.server import ThreadedMotoServer

        # moto's server logs every request through werkzeug: into a file, not the terminal
        access = logging.getLogger("werkzeug")
        access.handlers[:] = [logging.FileHandler(self.logs / "moto.log")]
        access.setLevel(logging.INFO)
        access.propagate = False
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env.update(DUMMY_AWS, AWS_ENDPOINT_URL=self.endpoint)
        os.environ.update(DUMMY_AWS, AWS_ENDPOINT_URL=self.endpoint)

        self.dashboard = free_port()
        self.env.pop("RAY_ADDRESS", None)
        with open(self.logs / "ray-start.log", "w") as log:
            subprocess.run(
                [str(self.bin / "ray"), "start", "--head", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", f"--port={free_port()}",
                 "--disable-usage-stats"], check=True, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.ray_started = True
        self.address = f"http://127.0.0.1:{self.dashboard}"
        return self

    def submit(self, args: list[str], log_name: str, steps: Steps, progress=None) -> None:
        """Submit ``python ARGS`` as a Ray job (what ``ray job submit`` does), wait for it, keep its
        output in ``logs/LOG_NAME`` and show ``progress(output so far)`` while it runs."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # the SDK's packaging notes: not for the terminal
            logging.getLogger(name).setLevel(logging.ERROR)
        client = JobSubmissionClient(self.address)
        job = client.submit_job(
            entrypoint=" ".join(["python", *args]),
            # the jobs read the checkpoint from its absolute path on this machine: no upload
            runtime_env={"working_dir": str(REPO), "excludes": ["out/", ".venv/", ".git/", "models/"],
                         "env_vars": {**DUMMY_AWS, "AWS_ENDPOINT_URL": self.endpoint}},
        )
        log_path = self.logs / log_name
        while True:
            status = client.get_job_status(job)
            text = client.get_job_logs(job)
            log_path.write_text(text)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            steps.status((progress(text) if progress else None) or str(status).split(".")[-1].lower())
            time.sleep(1)
        if status != JobStatus.SUCCEEDED:
            tail = "\n".join(text.splitlines()[-15:])
            raise RuntimeError(f"job {job} ({args[1]}) ended {status}; its output is in {log_path}; last lines:\n{tail}")

    def __exit__(self, *exc):
        if self.ray_started:
            subprocess.run([str(self.bin / "ray"), "stop", "--force"], cwd=REPO, env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.moto is not None:
            self.moto.stop()


def train_progress(max_iters: int):
    def progress(text: str):
        steps = re.findall(r'"step": (\d+)', text)
        return f"iteration {steps[-1]}/{max_iters}" if steps else None
    return progress


def infer_progress(text: str):
    # jobs.infer prints "jobs.infer: C/M images committed, D done, R images/s, about T left (S s)"
    lines = re.findall(r"jobs\.infer: (\d+/\d+ images committed, .*) \(\d+ s\)", text)
    return lines[-1] if lines else None


def summary_of(text: str) -> dict:
    """The JSON line jobs.infer prints last."""
    for line in reversed(text.splitlines()):
        if line.startswith("{") and '"run_id"' in line:
            return json.loads(line)
    return {}


def merged_gt(s3, prefix: str) -> dict:
    """The archive's ground truth: the train and val splits' COCO files as one document."""
    doc = json.loads(s3.cat_file(f"{prefix}/annotations.json"))
    if s3.exists(f"{prefix}/val/annotations.json"):
        val = json.loads(s3.cat_file(f"{prefix}/val/annotations.json"))
        for img in val["images"]:
            img["file_name"] = "val/" + img["file_name"]
        doc["images"] += val["images"]
        doc["annotations"] += val["annotations"]
    return doc


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_scratch and not args.train_iters:
        build_parser().error("--from-scratch needs --train-iters N")
    weights = args.weights or str(SHIPPED_MODEL)
    if not args.from_scratch and not os.path.exists(weights) and "://" not in weights:
        build_parser().error(f"no checkpoint at {weights}")
    work = Path(args.workdir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = Steps(STEPS + (1 if args.train_iters else 0))
    t0 = time.time()

    steps.start("local S3 endpoint (moto) and Ray cluster")
    with LocalServices(args.num_cpus, logs) as svc:
        from jobs.storage import resolve

        steps.done(f"{svc.endpoint}, Ray dashboard {svc.address}")
        s3, _ = resolve(f"s3://{BUCKET}", {"endpoint_url": svc.endpoint})
        s3.mkdir(BUCKET)

        steps.start("synthetic archive")
        from jobs.synthetic import generate

        archive = f"{BUCKET}/shapes"
        generate(f"s3://{archive}", args.images, seed=ARCHIVE_SEED, size=ARCHIVE_SIZE, val_fraction=0.25)
        # Real archives hold broken files too: each becomes an error row, not a crash.
        s3.pipe(f"{archive}/images/broken-empty.jpg", b"")
        s3.pipe(f"{archive}/images/broken-not-an-image.png", b"this is a text file\n")
        steps.done(f"{args.images} images and 2 broken files in s3://{archive}/")

        if args.train_iters:
            weights = train(svc, steps, args, work, weights, f"s3://{archive}")
        from mrcnn.checkpoint import read_metadata

        meta = read_metadata(weights)

        results = f"s3://{BUCKET}/results"
        infer = ["-m", "jobs.infer", "--input", f"s3://{archive}/", "--output", results, "--weights", weights,
                 "--num-actors", "1", "--batch-size", "4", "--images-per-shard", "8"]  # small shards: visible progress
        steps.start(f"batch job over s3://{archive}/ (ray job submit)")
        svc.submit(infer, "infer-1.log", steps, infer_progress)
        first = summary_of((logs / "infer-1.log").read_text())
        steps.done(_run_line(first))
        steps.start("the same command again: an incremental run")
        svc.submit(infer, "infer-2.log", steps, infer_progress)
        steps.done(_run_line(summary_of((logs / "infer-2.log").read_text())))

        steps.start("evaluation of the Parquet rows against the ground truth")
        from jobs.evaluate import coco_from_dict, evaluate_parquet, format_report

        if args.train_iters:  # the model saw the train split: score the held-out val split only
            gt_name = "the held-out val split"
            gt = coco_from_dict(json.loads(s3.cat_file(f"{archive}/val/annotations.json")))
        else:
            gt_name, gt = "the whole archive", coco_from_dict(merged_gt(s3, archive))
        metrics = evaluate_parquet(gt, results)
        eval_json = work / "evaluation.json"
        eval_json.write_text(json.dumps({k: v for k, v in metrics.items() if k != "tables"}, indent=2))
        (logs / "evaluate.log").write_text(format_report(metrics) + "\n")
        c = metrics["counts"]
        steps.done(f"mask AP {metrics['segm']['AP']:.3f} (AP@0.5 {metrics['segm']['AP50']:.3f}), box AP "
                   f"{metrics['bbox']['AP']:.3f} (AP@0.5 {metrics['bbox']['AP50']:.3f}) over {c['evaluated_images']} "
                   f"images of {gt_name}, {c['detections']} detections")

        steps.start("pictures and run report")
        local_results = work / "results"
        shutil.rmtree(local_results, ignore_errors=True)
        s3.get(f"{BUCKET}/results/", str(local_results), recursive=True)
        from jobs.infer.commit.protocol import list_runs
        from jobs.render import read_latest, render_table
        from jobs.report import write_report

        pictures = work / "pictures"
        shutil.rmtree(pictures, ignore_errors=True)
        rendered, _ = render_table(read_latest(results), str(pictures), limit=8)
        first_run = list_runs(str(local_results))[0].run_id  # the run that processed the archive
        report = write_report(str(local_results), run_id=first_run)
        steps.done(f"{len(rendered.paths)} overlays, report")

    print(f"""
Done in {time.time() - t0:.0f} s.
  model           {weights}{_model_line(meta)}
  results         {local_results}   (copied from {results}; the S3 endpoint is gone now)
  evaluation      {eval_json}   (the full COCO tables: {logs / 'evaluate.log'})
  pictures        {pictures}
  run report      {report}
  logs            {logs}/  (moto.log, ray-start.log, {'train.log, ' if args.train_iters else ''}infer-1.log, infer-2.log, evaluate.log)

Try, with DuckDB (pip's duckdb is in .venv):
  .venv/bin/python -c "import duckdb; print(duckdb.sql(\\"SELECT i.label_name, count(*) AS n FROM (SELECT unnest(instances) AS i FROM read_parquet('{local_results}/run_id=*/part-*.parquet')) WHERE i.score > 0.5 GROUP BY ALL ORDER BY n DESC\\"))"
""")
    return 0


def train(svc: LocalServices, steps: Steps, args, work: Path, weights: str, data: str) -> str:
    """Train (or continue training) on the archive's train split; returns the final model."""
    train_dir = work / ("train-scratch" if args.from_scratch else "train")
    final = train_dir / "model_final.pt"
    done = _trained_iters(train_dir)
    steps.start(f"training {args.train_iters} iterations (ray job submit)")
    if final.exists() and done >= args.train_iters:
        steps.done(f"reusing {final} ({done} iterations)")
        return str(final)
    cmd = ["-m", "jobs.train", "--data", data, "--output", str(train_dir), "--num-workers", "1",
           "--max-iters", str(args.train_iters), "--batch-size", "2", "--checkpoint-every", str(args.train_iters),
           "--eval-every", "0", "--clip-grad-norm", "10.0"]
    # the shipped model's architecture and sizes (models/README.md), so its weights fit
    cmd += ["--arch", "resnet18_fpn_small", "--returned-layers", "1", "2", "3", "--anchor-sizes", "16", "32", "64",
            "128", "--min-size", "128", "144", "160", "--max-size", "240", "--box-batch-size-per-image", "128"]
    # from scratch: the shipped recipe's lr; fine-tuning: a tenth of it
    cmd += ["--lr", "0.02"] if args.from_scratch else ["--weights", weights, "--lr", "0.002"]
    svc.submit(cmd, "train.log", steps, train_progress(args.train_iters))
    steps.done(f"{final}")
    return str(final)


def _model_line(meta: dict) -> str:
    held_out = (meta.get("extra") or {}).get("recipe", {}).get("held_out")
    if not held_out:
        return f"  ({meta.get('architecture')})"
    return (f"\n                  {meta.get('architecture')}; on its own held-out split: mask AP@0.5 "
            f"{held_out['mask_AP50']:.3f}, box AP@0.5 {held_out['box_AP50']:.3f} (models/README.md)")


def _run_line(summary: dict) -> str:
    if not summary:
        return "finished"
    return (f"{summary.get('ok', 0)} ok and {summary.get('error', 0)} error rows, {summary.get('instances', 0)} "
            f"instances, {summary.get('skipped', 0)} images skipped as unchanged")


def _trained_iters(train_dir: Path) -> int:
    try:
        return int(json.loads((train_dir / "final.json").read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
