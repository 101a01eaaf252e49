"""The whole system on one machine: ``python -m jobs.demo`` (or ``bash scripts/demo.sh``).

1. starts a local S3-compatible endpoint (moto's server on 127.0.0.1) and a local Ray
   cluster with its job server;
2. writes a synthetic shapes archive (COCO format, train and val splits) to a bucket;
3. trains a small model briefly with ``jobs.train`` (submitted with ``ray job submit``)
   unless a trained checkpoint is already there: later demo runs reuse it, and a larger
   ``--train-iters`` continues the same training run;
4. submits the batch job, ``jobs.infer``, over the bucket with ``ray job submit``, then
   submits it again to show that an incremental run re-processes nothing;
5. evaluates the Parquet output against the validation annotations (``jobs.evaluate``),
   renders overlays (``jobs.render``) and the run report (``jobs.report``);
6. copies the output next to the rest (the S3 endpoint lives in memory) and prints where
   everything is, with a DuckDB query to try.

Everything lands under ``--workdir`` (default ``out/demo``). The endpoint and the Ray
cluster are stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "demo"
DUMMY_AWS = {  # moto accepts any credentials; these are not secrets
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(REPO / "out" / "demo"), help="where results land (default out/demo)")
    p.add_argument("--images", type=int, default=48, help="synthetic images in the archive")
    p.add_argument("--train-iters", type=int, default=40, help="training iterations when no checkpoint exists")
    p.add_argument("--weights", default=None, help="use this checkpoint instead of training one")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    return p


def log(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict | None = None, shown: list[str] | None = None) -> None:
    print("$ " + " ".join(shown or cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


class LocalServices:
    """moto's S3 server and a Ray head with its job server, both on 127.0.0.1."""

    def __init__(self, num_cpus: int):
        self.num_cpus = num_cpus
        self.bin = Path(sys.executable).parent
        self.moto = None
        self.ray_started = False
        self.env = dict(os.environ)
        # Jobs run `python -m ...` as submitted: the cluster must find this interpreter first.
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def __enter__(self):
        from moto.server import ThreadedMotoServer

        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env.update(DUMMY_AWS, AWS_ENDPOINT_URL=self.endpoint)
        os.environ.update(DUMMY_AWS, AWS_ENDPOINT_URL=self.endpoint)

        self.dashboard = free_port()
        self.env.pop("RAY_ADDRESS", None)
        run([str(self.bin / "ray"), "start", "--head", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", f"--port={free_port()}",
             "--disable-usage-stats"], env=self.env)
        self.ray_started = True
        self.address = f"http://127.0.0.1:{self.dashboard}"
        return self

    def submit(self, args: list[str]) -> None:
        """`ray job submit` of a python -m entry point, waiting for it to finish."""
        runtime_env = {"env_vars": {**DUMMY_AWS, "AWS_ENDPOINT_URL": self.endpoint}}
        cmd = [str(self.bin / "ray"), "job", "submit", "--address", self.address, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--", "python", *args]
        shown = [c if not c.startswith("{") else "'{...endpoint and credentials...}'" for c in cmd]
        run(cmd, env=self.env, shown=shown)

    def __exit__(self, *exc):
        if self.ray_started:
            subprocess.run([str(self.bin / "ray"), "stop", "--force"], cwd=REPO, env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.moto is not None:
            self.moto.stop()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with LocalServices(args.num_cpus) as svc:
        import fsspec

        log(f"S3 endpoint {svc.endpoint}, Ray job server {svc.address}")
        s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": svc.endpoint})
        s3.mkdir(BUCKET)

        log("synthetic archive -> s3://demo/shapes")
        from jobs.synthetic import generate

        generate(f"s3://{BUCKET}/shapes", args.images, seed=0, val_fraction=0.25)
        # Real archives hold broken files too: each becomes an error row, not a crash.
        s3.pipe(f"{BUCKET}/shapes/images/broken-empty.jpg", b"")
        s3.pipe(f"{BUCKET}/shapes/images/broken-not-an-image.png", b"this is a text file\n")

        weights = args.weights
        if weights is None:
            train_dir = work / "train"
            weights = str(train_dir / "model_final.pt")
            if (train_dir / "final.json").exists() and _trained_iters(train_dir) >= args.train_iters:
                log(f"reusing the trained checkpoint {weights}")
            else:
                log(f"training for {args.train_iters} iterations (ray job submit)")
                svc.submit(["-m", "jobs.train", "--data", f"s3://{BUCKET}/shapes", "--output", str(train_dir),
                            "--num-workers", "1", "--max-iters", str(args.train_iters), "--batch-size", "2",
                            "--arch", "resnet18_fpn_small",  # trains from scratch in minutes on CPUs
                            "--min-size", "256", "--max-size", "384", "--checkpoint-every", str(args.train_iters),
                            "--eval-every", "0",
                            # From scratch, random heads start with huge mask losses: clip.
                            "--lr", "0.01", "--clip-grad-norm", "1.0"])

        results = f"s3://{BUCKET}/results"
        infer = ["-m", "jobs.infer", "--input", f"s3://{BUCKET}/shapes/", "--output", results, "--weights", weights,
                 "--num-actors", "1", "--batch-size", "4"]
        log("batch job over the bucket (ray job submit)")
        svc.submit(infer)
        log("the same command again: an incremental run, nothing new to process")
        svc.submit(infer)

        log("evaluation against the validation annotations")
        eval_json = work / "evaluation.json"
        run([sys.executable, "-m", "jobs.evaluate", "--gt", f"s3://{BUCKET}/shapes/val/annotations.json",
             "--pred", results, "--out", str(eval_json)], env=svc.env)

        log("pictures and run report")
        local_results = work / "results"
        shutil.rmtree(local_results, ignore_errors=True)
        s3.get(f"{BUCKET}/results/", str(local_results), recursive=True)
        pictures = work / "pictures"
        shutil.rmtree(pictures, ignore_errors=True)
        run([sys.executable, "-m", "jobs.render", "--results", results, "--out", str(pictures), "--limit", "8"],
            env=svc.env)
        from jobs.infer.commit import list_runs
        from jobs.report import write_report

        first_run = list_runs(str(local_results))[0].run_id  # the run that processed the archive
        report = write_report(str(local_results), run_id=first_run)

    wall = time.time() - t0
    log(f"done in {wall:.0f} s")
    if args.weights is None:
        print(f"""
The model was trained for {_trained_iters(work / 'train')} iterations from scratch on 2 CPU cores: expect
few or no confident detections. Train further (training resumes from the checkpoint) with
  bash scripts/demo.sh --train-iters 400
or run over a checkpoint you have with --weights FILE (e.g. torchvision's COCO Mask R-CNN).""")
    print(f"""
  checkpoint      {weights}
  results         {local_results}   (copied from {results}; the S3 endpoint is gone now)
  evaluation      {eval_json}
  pictures        {pictures}
  run report      {report}

Try, with DuckDB (pip's duckdb is in .venv):
  .venv/bin/python -c "import duckdb; print(duckdb.sql(\\"SELECT i.label_name, count(*) AS n FROM (SELECT unnest(instances) AS i FROM read_parquet('{local_results}/run_id=*/part-*.parquet')) WHERE i.score > 0.5 GROUP BY ALL ORDER BY n DESC\\"))"
""")
    return 0


def _trained_iters(train_dir: Path) -> int:
    try:
        return int(json.loads((train_dir / "final.json").read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
