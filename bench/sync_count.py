"""Count the host syncs of one Predictor call on CUDA, and say where they come from.

    python3 bench/sync_count.py                    # on the GPU machine, after the extension's CUDA build
    python3 bench/sync_count.py --max-syncs 40     # exit 1 when one call syncs more often

A seeded 91-class ``mrcnn.maskrcnn_resnet50_fpn`` (no weights file; class logits scaled and the
score threshold lowered so that it detects something) in a ``Predictor(device="cuda",
precision="bf16")``, warmed up on two 640x480 images and one 1920x1080 image, then one call of
four images under ``torch.cuda.set_sync_debug_mode("warn")``: every operation that makes the host
wait for the GPU (a copy to the host, ``.item()``, ``nonzero``, a synchronous copy to the device)
warns, and the warnings are counted, per phase (the forward, ``Predictor.start``; the
post-processing, ``Predictor.finish``) and per source line: the line of this repository that
made the call (innermost frame under the repository) and where the warning was raised.

Needs torch and the repository only (no Ray, no pycocotools). Without a CUDA device it prints
"no CUDA device: skipped" and exits 0 (1 with ``--require-cuda``). ``--device cpu`` runs the same
calls on the CPU, without counting (a check of the script itself). Prints one JSON line last.
"""

import argparse
import collections
import json
import linecache
import os
import sys
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says
THIS = os.path.abspath(__file__)


def parse_size(text):
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


class SyncRecorder:
    """Records the sync warnings raised inside the block, each with its call site: the warning's own
    filename:lineno and the innermost frame of this repository's code (the line to change)."""

    def __init__(self):
        self.syncs = []  # (phase, repo site, warning site)
        self.phase = None
        self._catch = None

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every sync, not the first per line
        self._show = warnings.showwarning  # other warnings are shown as usual
        warnings.showwarning = self._record
        return self

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        site = _site(filename, lineno)
        repo = site
        for frame in reversed(traceback.extract_stack()[:-1]):
            if _ours(frame.filename):
                repo = _site(frame.filename, frame.lineno)
                break
        self.syncs.append((self.phase, repo, site))


def _ours(filename):
    """A file of this repository's code (not this script, not a virtualenv's packages)."""
    path = os.path.abspath(filename)
    if not path.startswith(ROOT + os.sep) or path == THIS:
        return False
    parts = os.path.relpath(path, ROOT).split(os.sep)
    return not any(p in (".venv", "venv", "site-packages", "dist-packages") for p in parts)


def _site(filename, lineno):
    path = os.path.abspath(filename)
    if path.startswith(ROOT + os.sep):
        path = os.path.relpath(path, ROOT)
    return f"{path}:{lineno}"


def _source(site):
    path, _, lineno = site.rpartition(":")
    full = path if os.path.isabs(path) else os.path.join(ROOT, path)
    return linecache.getline(full, int(lineno)).strip()


def build_predictor(device, seed):
    import mrcnn
    from mrcnn.predictor import Predictor

    torch.manual_seed(seed)
    model = mrcnn.maskrcnn_resnet50_fpn(num_classes=91)
    with torch.no_grad():  # peaky class scores, and a low threshold: seeded weights then detect something
        model.roi_heads.box_predictor.cls_score.weight.mul_(20)
    model.roi_heads.score_thresh = 0.05
    precision = "bf16" if device == "cuda" else "fp32"
    return Predictor(model, device=device, precision=precision)


def images(rng, sizes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def call(predictor, batch, recorder=None):
    """predictor(batch), in its two phases when the Predictor has them (start: the forward;
    finish: the post-processing)."""
    if not (hasattr(predictor, "start") and hasattr(predictor, "finish")):
        if recorder is not None:
            recorder.phase = "call"
        return predictor(batch)
    if recorder is not None:
        recorder.phase = "forward"
    started = predictor.start(batch)
    if recorder is not None:
        recorder.phase = "post-processing"
    return predictor.finish(started)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-syncs", type=int, default=None, help="exit 1 when one call syncs more than this")
    p.add_argument("--require-cuda", action="store_true", help="exit 1 (not 0) when there is no CUDA device")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: run the calls without counting")
    p.add_argument("--sizes", default="640x480,640x480,1920x1080,1920x1080",
                   help="WxH of the counted call's images (default: four)")
    p.add_argument("--warmup-sizes", default="640x480,640x480;1920x1080",
                   help="warm-up calls, ';' between calls, ',' between images")
    p.add_argument("--top", type=int, default=12, help="source lines to list")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 1 if args.require_cuda else 0
    counting = args.device == "cuda"
    predictor = build_predictor(args.device, args.seed)
    rng = np.random.default_rng(args.seed)
    for sizes in args.warmup_sizes.split(";"):
        call(predictor, images(rng, [parse_size(s) for s in sizes.split(",")]))
    batch = images(rng, [parse_size(s) for s in args.sizes.split(",")])
    if counting:
        torch.cuda.synchronize()
    with SyncRecorder() as recorder:
        if counting:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            results = call(predictor, batch, recorder)
        finally:
            if counting:
                torch.cuda.set_sync_debug_mode(0)

    detections = [len(r["scores"]) for r in results]
    assert len(results) == len(batch) and sum(detections) > 0, f"no detections ({detections}): nothing was post-processed"
    assert all(len(r["masks"]) == n for r, n in zip(results, detections))
    total = len(recorder.syncs)
    phases = collections.Counter(phase for phase, _, _ in recorder.syncs)
    where = collections.Counter((repo, site) for _, repo, site in recorder.syncs)
    print(f"device: {torch.cuda.get_device_name() if counting else 'cpu (not counted)'}, torch {torch.__version__}")
    print(f"images {args.sizes}, detections per image {detections}")
    print(f"host syncs in one Predictor call of {len(batch)} images: {total}"
          + "".join(f", {phase} {n}" for phase, n in phases.items()))
    if where:
        print(f"top {min(args.top, len(where))} source lines (count  line in this repository  [raised at]):")
        for (repo, site), n in where.most_common(args.top):
            raised = "" if site == repo else f"  [{site}]"
            print(f"{n:6d}  {repo}  {_source(repo)}{raised}")
    print(json.dumps({"bench": "sync_count", "device": args.device, "counted": counting, "syncs": total,
                      "phases": dict(phases), "detections": detections,
                      "top": [[f"{repo}", n] for (repo, _), n in where.most_common(args.top)]}))
    if args.max_syncs is not None and total > args.max_syncs:
        print(f"FAIL: {total} host syncs per call, more than --max-syncs {args.max_syncs}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
