"""Writes tests/data/detectron2/<arch>.json: what Detectron2's own DefaultPredictor returns for
the seeded weights of tests/_detectron2_fixture.py on its images.

Run beside the project, with Detectron2 importable (its repository on PYTHONPATH; it runs on
CPU without its C++ extension for these models) and this repository's packages too:

    python tests/data/detectron2/make_fixtures.py [ARCH ...]

It writes each checkpoint in both layouts (.pth as DetectionCheckpointer saves, zoo .pkl),
lets Detectron2 load each through its own DetectionCheckpointer, checks that both loads hold
exactly the recipe's weights and give identical detections, and records those detections.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
import _detectron2_fixture as fx  # noqa: E402

import detectron2  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402


def run(arch: str, weights: str, sd: dict) -> dict:
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(fx.HERE, fx.ARCHS[arch][1]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(cfg)
    loaded = predictor.model.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), f"{weights}: {k} differs after Detectron2's load"
    missing = [k for k in loaded if k not in sd and not k.endswith(("pixel_mean", "pixel_std"))]
    assert not missing, f"{weights}: Detectron2 weights the recipe lacks: {missing[:5]}"
    out = {}
    for name, rgb in fx.images().items():
        inst = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"]  # DefaultPredictor takes BGR
        masks = inst.pred_masks.numpy()
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        out[name] = {
            "size": list(rgb.shape[:2]),
            "classes": inst.pred_classes.tolist(),
            "boxes": inst.pred_boxes.tensor.tolist(),
            "scores": inst.scores.tolist(),
            "masks": [r["counts"].decode("ascii") for r in rles],
        }
    return out


def main(archs):
    commit = subprocess.run(["git", "-C", os.path.dirname(os.path.dirname(detectron2.__file__)), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    for arch in archs:
        sd = fx.detectron2_state_dict(arch)
        with tempfile.TemporaryDirectory() as d:
            pth, pkl = os.path.join(d, "model_final.pth"), os.path.join(d, "model_final.pkl")
            fx.write_pth(sd, pth)
            fx.write_pkl(sd, pkl)
            results = run(arch, pth, sd)
            assert run(arch, pkl, sd) == results, f"{arch}: the .pkl gives other detections than the .pth"
        record = {"arch": arch, "config": fx.ARCHS[arch][1], "detectron2_commit": commit,
                  "torch": torch.__version__, "images": results}
        with open(os.path.join(fx.HERE, f"{arch}.json"), "w") as f:
            json.dump(record, f)
        print(arch, {k: len(v["classes"]) for k, v in results.items()})


if __name__ == "__main__":
    main(sys.argv[1:] or list(fx.ARCHS))
